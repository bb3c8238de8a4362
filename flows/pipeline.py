"""Flow ``run``: the whole chain, ingest -> preprocess -> train -> evaluate -> harvest -> release
(-> with ``detector_check``, the detector check of the release, published as a further version).

Evaluate chooses, per finding on box-val, the method variant, box rule, confidence and operating
point (tuning.json) that the harvest then applies (``method`` ``auto``).

Every stage skips the work whose output already exists for the same inputs, so a scheduled
run on an unchanged collection retrains nothing and reharvests nothing, and still publishes
a release (with no changes against the previous one). ``serve`` serves this flow as a Prefect
deployment on a cron schedule.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cxr_miner.flows.detector_check import run_detector_check
from cxr_miner.flows.evaluate import evaluate, is_evaluated
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.harvest import AUTO, run_harvest
from cxr_miner.flows.ingest import ingest
from cxr_miner.flows.preprocess import run_preprocess
from cxr_miner.flows.release import release
from cxr_miner.flows.train import train


@flow(name="run", log_prints=True)
@writes_into("workdir", "out", creates=("workdir", "out"))
def run(
    root: str,
    workdir: str,
    out: str,
    preset: str = "cpu-small",
    config_file: str | None = None,
    run: str | None = None,
    size: int = 512,
    shard_size: int = 256,
    method: str = "am",
    all_findings: bool = False,
    min_score: float = 0.5,
    workers: int | None = None,
    dask_address: str | None = None,
    gpus: int | None = None,
    detector_check: bool = False,
    private: bool = False,
) -> dict[str, Any]:
    """Ingest ROOT, preprocess, train run ``run`` (default: the preset's name) for ``method``, evaluate,
    harvest with what evaluate chose per finding, release."""
    logger = get_run_logger()
    ingest(root=root, workdir=workdir)
    run_preprocess(workdir, workers=workers, dask_address=dask_address, size=size, shard_size=shard_size)
    trained = train(workdir=workdir, preset=preset, config_file=config_file, run=run, method=method)
    if is_evaluated(workdir, trained["run"]):
        logger.info("evaluate: run %s was evaluated with these checkpoints, boxes and shards; kept", trained["run"])
    else:
        evaluate(workdir=workdir, run=trained["run"])
    run_harvest(
        workdir,
        trained["run"],
        workers=workers,
        dask_address=dask_address,
        gpus=gpus,
        method=AUTO,
        all_findings=all_findings,
        min_score=min_score,
    )
    published = release(workdir=workdir, out=out, root=root, private=private)
    logger.info("release %s -> %s", published["version"], published["path"])
    if detector_check:
        published["detector_check"] = run_detector_check(
            published["path"], workdir, out, workers=workers, dask_address=dask_address, gpus=gpus
        )
    return published


def serve(cron: str, name: str = "cxr-miner-release", **parameters: Any) -> None:
    """Serve ``run`` as a deployment with a cron schedule until stopped (needs a Prefect server)."""
    run.serve(name=name, cron=cron, parameters=parameters, pause_on_shutdown=False)
