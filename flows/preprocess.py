"""Flow ``preprocess``: W/index.parquet -> W/shards/*.parquet, manifest, W/quarantine.parquet.

One Dask task per shard; each returns paths and counts, never pixels. Shards already
complete for the same inputs and settings are skipped, so a stopped run resumes.
Every run ends by checking that every indexed image is accounted for:
index rows = shard rows + quarantined + missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cxr_miner.flows.api import prefect_api
from cxr_miner.flows.dask import dask_task_runner, local_worker_config
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import check_preprocess
from cxr_miner.flows.tasks import collect, failure_text
from cxr_miner.storage.inputs.files import not_regular
from cxr_miner.storage.inputs.images import DEFAULT_MAX_PIXELS
from cxr_miner.storage.stages.index import INDEX_FILE, read_index, read_ingest_report
from cxr_miner.storage.stages.provenance import code_version
from cxr_miner.storage.stages.shard_manifest import (
    MANIFEST,
    MAX_LOST,
    QUARANTINE_FILE,
    check_losses,
    quarantine_records,
    remove_stale,
    write_manifest,
    write_quarantine,
)
from cxr_miner.storage.stages.shards import (
    CARRIED_COLUMNS,
    SHARD_DIR,
    ShardResult,
    ShardSettings,
    ShardSpec,
    build_shard,
    completed_shard,
    plan_shards,
)
from cxr_miner.storage.vocab.errors import InputError


class PreprocessIncomplete(RuntimeError):
    """Some shards failed; the finished ones are kept and a rerun resumes."""


@task(cache_policy=NO_CACHE)
def write_shard(
    spec: ShardSpec, root: str, shard_dir: str, settings: ShardSettings, allow_outside_links: bool
) -> ShardResult:
    return build_shard(
        spec, Path(root), Path(shard_dir), settings, before_commit=maybe_fail, allow_outside_links=allow_outside_links
    )


def check_sources(
    work: Path, root: Path, rows: list[dict], absent: list[dict], readable: list[dict], max_lost: float
) -> None:
    """Refuse, before any shard is touched, an index whose image files are not there: none has a
    path (a --metadata-only ingest that found no images), or more than ``max_lost`` are gone.
    ``absent``: loss records (image_id, reason) of the rows without a file at ingest."""
    if not rows:
        raise InputError(work / INDEX_FILE, "lists no images; run `cxr-miner ingest` on the collection first")
    if not readable:
        raise InputError(
            work / INDEX_FILE,
            f"none of its {len(rows)} images has a file to read (an ingest --metadata-only before the "
            f"images were there?): run `cxr-miner ingest ROOT --workdir {work}` once they are below ROOT",
        )
    # A stat per file (0.04 s for 6,000); links out of ROOT are caught by the workers, before opening.
    gone = [
        {"image_id": row["image_id"], "reason": f"{row['source_path']}: {reason}"}
        for row in readable
        if (reason := not_regular(root / row["source_path"]))
    ]
    check_losses(
        work / INDEX_FILE,
        len(rows),
        [*gone, *absent],
        max_lost,
        f"are not readable files below {root}; no shard was touched",
    )


@flow(name="preprocess", log_prints=True)
@writes_into("workdir")
def preprocess(
    workdir: str,
    size: int = 512,
    shard_size: int = 256,
    encoding: str = "raw",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    root: str | None = None,
    max_lost: float = MAX_LOST,
) -> dict[str, Any]:
    """Letterbox every indexed image to ``size`` px and write Parquet shards (see module doc).

    More than ``max_lost`` of the indexed images missing or unreadable is an error: refused
    before any shard is touched when the files are not there, else after the run is recorded."""
    check_preprocess(size, shard_size, encoding, max_lost, max_pixels)
    logger = get_run_logger()
    work = Path(workdir)
    settings = ShardSettings(size=size, encoding=encoding, max_pixels=max_pixels)
    index = read_index(work / INDEX_FILE)
    ingest_report = read_ingest_report(work)
    source_root = Path(root or ingest_report["root"])
    allow_outside_links = ingest_report.get("allow_outside_links", False)
    rows = index.select([*CARRIED_COLUMNS, "file_present"]).to_pylist()
    readable, absent = readable_rows(rows)
    missing = len(absent)
    check_sources(work, source_root, rows, absent, readable, max_lost)
    specs = plan_shards(readable, shard_size)
    shard_dir = work / SHARD_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    (shard_dir / MANIFEST).unlink(missing_ok=True)  # the manifest marks a complete run
    logger.info("%d images in %d shards (%d missing files excluded)", len(rows) - missing, len(specs), missing)

    ordered = build_shards(specs, source_root, shard_dir, settings, allow_outside_links)
    quarantined = write_quarantine(work / QUARANTINE_FILE, ordered)
    lost = [*quarantine_records(ordered), *absent]
    removed = remove_stale(shard_dir, {spec.name for spec in specs})
    manifest = write_manifest(
        shard_dir,
        ordered,
        settings,
        index_rows=len(rows),
        missing=missing,
        index_sha256=ingest_report.get("index_sha256"),
        code_version=code_version(),
        removed=removed,
    )
    built, skipped, images = manifest["run"]["built"], manifest["run"]["skipped"], manifest["counts"]["shard_rows"]
    logger.info(
        "%d shards (%d built, %d already complete): %d images, %d quarantined, %d missing -> %s",
        *(len(ordered), built, skipped, images, quarantined, missing, shard_dir),
    )
    check_losses(
        work / QUARANTINE_FILE, len(rows), lost, max_lost, "are quarantined or missing (all of them are listed there)"
    )
    return manifest


def readable_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The index rows with a file to read, and the lost record of each one without (missing at ingest)."""
    readable = [row for row in rows if row["file_present"] is not False and row["source_path"]]
    absent = [
        {"image_id": row["image_id"], "reason": "missing at ingest"}
        for row in rows
        if row["file_present"] is False or not row["source_path"]
    ]
    return readable, absent


def build_shards(
    specs: list[ShardSpec], source_root: Path, shard_dir: Path, settings: ShardSettings, allow_outside_links: bool
) -> list[ShardResult]:
    """Every shard of ``specs``, in their order: the complete ones as they are (not submitted: a
    rerun with nothing to build starts no Dask cluster), the others by one write_shard task each,
    the largest first (partial shards fill the tail); PreprocessIncomplete naming the failed ones."""
    complete = {spec.name: done for spec in specs if (done := completed_shard(spec, source_root, shard_dir, settings))}
    todo = sorted((s for s in specs if s.name not in complete), key=lambda spec: -len(spec.rows))
    futures = [
        write_shard.submit(spec, str(source_root), str(shard_dir), settings, allow_outside_links) for spec in todo
    ]
    results, failures = collect(
        "preprocess",
        futures,
        [s.name for s in todo],
        {s.name: len(s.rows) for s in specs},
        already_done=sum(len(s.rows) for s in specs if s.name in complete),
    )
    results |= complete
    if failures:
        raise PreprocessIncomplete(
            f"{failure_text(failures, len(specs))}; the other {len(results)} are kept: rerun to resume"
        )
    return [results[spec.name] for spec in specs]


@writes_into("workdir")
def run_preprocess(
    workdir: str, *, workers: int | None = None, dask_address: str | None = None, **options: Any
) -> dict[str, Any]:
    """The flow on a Dask cluster: local processes by default, or an existing scheduler.

    The API URL is set explicitly for the run, so that the workers report to the same
    API instead of each starting an ephemeral server of its own.
    """
    runner = dask_task_runner(workers=workers, address=dask_address)
    with prefect_api(), local_worker_config():
        return preprocess.with_options(task_runner=runner)(workdir=workdir, **options)
