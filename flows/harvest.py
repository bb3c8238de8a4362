"""Flow ``harvest``: mined boxes for every image of the shards -> ``W/harvest/parts/<shard>.parquet``.

One Dask task per shard. Each worker process loads the run's models once and keeps them
(``_MODELS``); on CUDA, one worker per core, the GPUs dealt among them, bf16. Every finding is
boxed as the run's ``tuning.json`` says (flow ``evaluate``, miner.methods.tuned): with ``method`` ``auto``, by the
variant chosen for it on box-val (the CAM baseline, AM at some t, or MIL); with ``am``, ``cam`` or
``mil``, by that method, with the box rule, confidence and operating point tuned for it. MIL boxes
come from ``mil-all``, the patch model that learnt from every box (evaluate scored ``mil``, which
learnt from box-val's only; its tuned choices are applied to ``mil-all``). Without a tuning
(no boxed image to tune on) the boxes come from the method (``auto``: the run's AM over all its
steps) by the paper's rule, with no confidence.

Modes: mining (default) boxes every finding an image is labelled with; discovery
(``all_findings``) boxes every finding whose classifier probability is >= ``min_score``.

Each part is written atomically and carries its harvest key, so a rerun keeps the parts made
with the same model, method, mode and shard, and redoes the rest. A task lost with a killed
worker is rerun by Dask, and the part it writes is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cxr_miner.flows.api import prefect_api
from cxr_miner.flows.dask import (
    dask_task_runner,
    default_workers,
    local_gpus,
    local_worker_config,
    worker_device,
    worker_threads,
)
from cxr_miner.flows.engine.checkpoints import load_models, read_config
from cxr_miner.flows.engine.mining import labelled, scored_at_least, shard_rows
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import check_harvest
from cxr_miner.flows.tasks import collect, failure_text
from cxr_miner.miner.methods import (
    FindingChoice,
    TunedLocalizer,
    check_method,
    choices_from_tuning,
    create_method,
    harvest_fallback,
)
from cxr_miner.miner.training import TrainConfig
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.evaluation import read_tuning
from cxr_miner.storage.stages.harvest import (
    harvest_key,
    harvest_summary,
    harvest_summary_file,
    part_key,
    part_path,
    parts_dir,
    remove_stale_parts,
    tuning_identity,
    write_part,
)
from cxr_miner.storage.stages.index import GT_BOXES_FILE, SPLITS, read_gt_boxes
from cxr_miner.storage.stages.provenance import model_identity
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader
from cxr_miner.storage.vocab.errors import MissingInput

# Per worker process: (model id, device) -> models, loaded once and kept. The model id hashes
# the checkpoint files, so a run retrained under the same name is loaded again.
_MODELS: dict[tuple[str, str], list] = {}


class HarvestIncomplete(RuntimeError):
    """Some shards failed; the finished parts are kept and a rerun resumes."""


def worker_models(run: str, names: tuple[str, ...], model_id: str, device: torch.device) -> list:
    key = (model_id, str(device))
    if key not in _MODELS:
        _MODELS.clear()  # one run's models at a time
        _MODELS[key] = load_models(RunFolder(Path(run)), names, device)
    return _MODELS[key]


@task(cache_policy=NO_CACHE)
def harvest_shard(shard: str, run: str, target: str, key: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Harvest one shard into its part; returns its name, image and box counts."""
    torch.set_num_threads(settings.get("threads") or worker_threads())
    method = TunedLocalizer.from_choices(TrainConfig.from_dict(settings["config"]), settings["choices"])
    device = worker_device(method.config.device)
    models = worker_models(run, method.checkpoints(), settings["model_id"], device)
    select_for = scored_at_least(settings["min_score"]) if settings["mode"] == "discovery" else labelled
    overlap = device.type == "cuda" if settings.get("overlap") is None else settings["overlap"]
    rows, images = shard_rows(
        method, models, Path(shard), select_for, settings["batch_size"], settings["model_id"], overlap
    )
    maybe_fail(Path(shard).stem, images)
    boxes = write_part(Path(target), rows, key, images)
    return {"shard": Path(shard).stem, "images": images, "boxes": boxes}


AUTO = "auto"


def check_harvest_method(method: str) -> None:
    if method != AUTO:
        check_method(method)


def harvest_localizer(folder: RunFolder, method: str) -> TunedLocalizer:
    """How each finding is boxed (module doc); ValueError for an unknown method."""
    check_harvest_method(method)
    config, tuning = read_config(folder), read_tuning(folder)
    if method == AUTO:
        default = harvest_fallback(config, lambda names: not folder.missing(names))
        return TunedLocalizer(
            config, choices_from_tuning(tuning, None), FindingChoice(default.variant, default.paper_rule)
        )
    chosen = create_method(method, config)
    if missing := folder.missing(chosen.release_checkpoints()):
        raise MissingInput(
            f"{folder.directory}: method {method!r} needs {', '.join(missing)} "
            f"(train the run with --method {method} first)"
        )
    return TunedLocalizer(
        config, choices_from_tuning(tuning, chosen.variant), FindingChoice(chosen.variant, chosen.paper_rule)
    )


def why_untuned(work: Path, folder: RunFolder) -> str:
    """Why a harvest has no tuning to apply, as it is: evaluate has not run, or there was nothing to tune on."""
    boxed = len(read_gt_boxes(work / GT_BOXES_FILE)) if (work / GT_BOXES_FILE).exists() else 0
    if not boxed:
        return "no tuning: the collection has no image with a ground-truth box"
    if not folder.evaluation_json.exists():
        return (
            f"no tuning: evaluate has not run, though {boxed} images have ground-truth boxes (run `cxr-miner evaluate "
            f"--workdir {work} --run {folder.name}`, then harvest again: a release refuses a harvest made without "
            "its run's tuning)"
        )
    return "no tuning: evaluate found no boxed image among the harvested ones"


@flow(name="harvest", log_prints=True)
@writes_into("workdir")
def harvest(
    workdir: str,
    run: str,
    method: str = AUTO,
    all_findings: bool = False,
    min_score: float = 0.5,
    batch_size: int = 32,
    splits: tuple[str, ...] = SPLITS,
    threads: int | None = None,
    gpu_tasks: bool = False,
    overlap: bool | None = None,
) -> dict[str, Any]:
    """Boxes for every image of ``splits`` (see module doc); writes W/harvest/harvest.json.

    ``gpu_tasks``: each task asks Dask for one unit of the workers' ``GPU`` resource.
    ``overlap``: box each batch in a thread while the next batch's forward passes run (default:
    on a GPU; on a CPU the two contend for the same cores).
    """
    logger = get_run_logger()
    check_harvest(min_score, batch_size)
    work, folder = Path(workdir), RunFolder.of(workdir, run)
    localizer = checked_localizer(work, folder, method)
    model_id, digests = model_identity(run, [folder.checkpoint(n) for n in localizer.checkpoints()])
    mode = "discovery" if all_findings else "mining"
    shards = [s for s in ShardReader(work / SHARD_DIR).shards if s["split"] in splits]
    if not shards:
        raise MissingInput(f"{work / SHARD_DIR}: no shards of splits {', '.join(splits)} (run preprocess first)")
    identity: dict[str, Any] = {"model_id": model_id, "checkpoints": digests, "method": method, "mode": mode}
    identity |= {"min_score": min_score if all_findings else None, "input_size": localizer.config.input_size}
    base_key = harvest_key(identity, localizer.choices_record(), tuning_identity(folder.tuning_json))
    settings = {"config": localizer.config.to_dict(), "mode": mode, "min_score": min_score, "batch_size": batch_size}
    settings |= {"threads": threads, "choices": localizer.choices_record(), "model_id": model_id, "overlap": overlap}
    parts_dir(work).mkdir(parents=True, exist_ok=True)
    harvest_summary_file(work).unlink(missing_ok=True)  # the summary marks a complete harvest
    keys = {s["name"]: {**base_key, "shard": s["sha256"]} for s in shards}
    todo = [s for s in shards if part_key(part_path(work, s["file"])) != keys[s["name"]]]
    done = len(shards) - len(todo)
    logger.info("harvest %s (%s, %s): %d shards to do, %d already done", model_id, method, mode, len(todo), done)
    harvest_parts(work, folder, shards, todo, keys, settings, gpu_tasks)
    removed = remove_stale_parts(parts_dir(work), [s["name"] for s in shards])
    summary = harvest_summary(work, shards, base_key, run, built=len(todo), removed=removed)
    write_json(harvest_summary_file(work), summary)
    images, boxes = summary["images"], summary["boxes"]
    logger.info("%d images, %d boxes (%d shards built, %d kept) -> %s", images, boxes, len(todo), done, parts_dir(work))
    return summary


def checked_localizer(work: Path, folder: RunFolder, method: str) -> TunedLocalizer:
    """harvest_localizer, its checkpoints all there and readable (a damaged one is the user's to
    mend: said once, before any worker starts); an untuned run is warned of."""
    localizer = harvest_localizer(folder, method)
    if not localizer.choices:
        get_run_logger().warning(
            "%s: %s: every finding is boxed by %s with the paper's rule, and no box has a confidence",
            folder.directory,
            why_untuned(work, folder),
            localizer.default.variant,
        )
    if missing := folder.missing(localizer.checkpoints()):
        raise MissingInput(f"{folder.directory}: method {method!r} needs {', '.join(missing)} (train the run first)")
    for name in localizer.checkpoints():
        read_checkpoint_record(folder.checkpoint(name))
    return localizer


def harvest_parts(
    work: Path,
    folder: RunFolder,
    shards: list[dict[str, Any]],
    todo: list[dict[str, Any]],
    keys: dict[str, dict[str, Any]],
    settings: dict[str, Any],
    gpu_tasks: bool,
) -> None:
    """One harvest_shard task per shard of ``todo`` (each asking for a GPU with ``gpu_tasks``);
    HarvestIncomplete naming the failed ones (or one that boxed fewer images than its shard holds)."""
    rows = {s["name"]: s["rows"] for s in shards}
    with dask.annotate(**({"resources": {"GPU": 1}} if gpu_tasks else {})):
        futures = [
            harvest_shard.submit(
                str(work / SHARD_DIR / s["file"]),
                str(folder.directory),
                str(part_path(work, s["file"])),
                keys[s["name"]],
                settings,
            )
            for s in todo
        ]
    names = [s["name"] for s in todo]
    done = sum(rows.values()) - sum(rows[n] for n in names)
    results, failures = collect(f"harvest {settings['model_id']}", futures, names, rows, already_done=done)
    failures |= {
        n: f"harvested {r['images']} images of {rows[n]}" for n, r in results.items() if r["images"] != rows[n]
    }
    if failures:
        raise HarvestIncomplete(f"{failure_text(failures, len(shards))}; the other parts are kept: rerun to resume")


def local_layout(workers: int | None) -> tuple[int, int]:
    """(worker processes, torch threads each) of a local harvest cluster: ``workers``, else one
    per core, with or without GPUs. On CUDA the GPUs are dealt to the workers round-robin
    (flows.dask.worker_device): a GPU makes heatmaps faster than one core decodes and boxes
    them (BENCHMARKS.md, "The harvest's CPU side"), so every core feeds one, each worker with
    its own copy of the models."""
    count = workers or default_workers()
    return count, max(1, default_workers() // count)


@writes_into("workdir")
def run_harvest(
    workdir: str,
    run: str,
    *,
    workers: int | None = None,
    dask_address: str | None = None,
    gpus: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The flow on a Dask cluster: local processes by default (:func:`local_layout`; on CUDA each
    holds a ``GPU`` resource), or an existing scheduler (with ``gpus``, its workers must offer
    the ``GPU`` resource: tasks ask for one)."""
    check_harvest_method(options.get("method", AUTO))  # before a cluster starts
    gpus = local_gpus(gpus, dask_address)
    if not dask_address:
        workers, threads = local_layout(workers)
        options.setdefault("threads", threads)
    options["gpu_tasks"] = bool(gpus)
    runner = dask_task_runner(
        workers=None if dask_address else workers,
        address=dask_address,
        resources={"GPU": 1} if gpus and not dask_address else None,
    )
    with prefect_api(), local_worker_config():
        return harvest.with_options(task_runner=runner)(workdir=workdir, run=run, **options)
