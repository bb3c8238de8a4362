"""Flow ``harvest``: mined boxes for every image of the shards -> ``W/harvest/parts/<shard>.parquet``.

One Dask task per shard. Each worker process loads the run's models once and keeps them
(``_MODELS``); on CUDA, one worker per GPU, bf16. Heatmaps are made, upsampled and boxed on
the device (miner.localize); only the boxes come back, mapped to source pixels.

Modes: mining (default) boxes every finding an image is labelled with; discovery
(``all_findings``) boxes every finding whose classifier probability is >= ``min_score``.
Methods: ``am`` (Eq. 8 over all T steps of the run) or ``cam`` (step 1 alone).

Each part is written atomically and carries its harvest key, so a rerun keeps the parts made
with the same model, method, mode and shard, and redoes the rest. A task lost with a killed
worker is rerun by Dask, and the part it writes is the same.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import dask
import torch
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from cxr_miner.flows.api import prefect_api
from cxr_miner.flows.engine.checkpoints import load_model
from cxr_miner.flows.dask import dask_task_runner, default_workers, local_worker_config
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.preprocess import code_version
from cxr_miner.flows.progress import progress_bar
from cxr_miner.flows.train import read_config, run_dir, step_file
from cxr_miner.miner.boxes import DEFAULT_THRESHOLDS
from cxr_miner.miner.localize import localize, mined_heatmaps
from cxr_miner.miner.training import TrainConfig, autocast, pick_device, prepare_images
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.batches import batch_stream, list_row_groups
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.stages.harvest import (
    HARVEST_DIR, SUMMARY_FILE, finding_counts, part_key, part_path, parts_dir, read_part, remove_stale_parts, write_part,
)
from cxr_miner.storage.stages.index import SPLITS
from cxr_miner.storage.vocab.letterbox import Letterbox
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader, file_sha256

METHODS = ("am", "cam")
PLANNED_METHODS = {"mil": "the MIL miner (Li et al. 2018) is not built yet"}

# Per worker process: (checkpoint files, device) -> models, loaded once and kept.
_MODELS: dict[tuple[tuple[str, ...], str], list] = {}


class HarvestIncomplete(RuntimeError):
    """Some shards failed; the finished parts are kept and a rerun resumes."""


def check_method(method: str) -> None:
    if method in PLANNED_METHODS:
        raise ValueError(f"method {method!r}: {PLANNED_METHODS[method]}; known: {', '.join(METHODS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def method_steps(directory: Path, config: TrainConfig, method: str) -> list[Path]:
    """The checkpoints a method uses: step 1 for cam, steps 1..T for am (all of them must exist)."""
    wanted = 1 if method == "cam" else config.am_steps
    files = [step_file(directory, s) for s in range(1, wanted + 1)]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise FileNotFoundError(f"{directory}: method {method!r} needs {', '.join(missing)} (train the run first)")
    return files


def worker_device(setting: str) -> torch.device:
    """The configured device; on CUDA without an index, GPU (worker number mod GPU count)."""
    device = pick_device(setting)
    if device.type != "cuda" or device.index is not None:
        return device
    try:
        from distributed import get_worker

        number = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        number = 0
    return torch.device("cuda", number % torch.cuda.device_count())


def worker_threads() -> int:
    """The Dask worker's thread count (a torch thread per worker thread), else torch's default."""
    try:
        from distributed import get_worker

        return get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        return torch.get_num_threads()


def worker_models(files: tuple[str, ...], device: torch.device) -> list:
    key = (files, str(device))
    if key not in _MODELS:
        _MODELS.clear()  # one run's models at a time
        _MODELS[key] = [load_model(Path(f), device)[0] for f in files]
    return _MODELS[key]


def shard_boxes(
    models: list, config: TrainConfig, device: torch.device, shard: Path, settings: dict[str, Any]
) -> tuple[list[dict[str, Any]], int]:
    """Boxes (PART_SCHEMA rows) of every image of one shard, and how many images it has."""
    rows: list[dict[str, Any]] = []
    images = 0
    for batch in batch_stream(list_row_groups([shard]), settings["batch_size"]):
        x = prepare_images(torch.from_numpy(batch.images), config.input_size, device)
        labels = torch.from_numpy(batch.labels)

        def select(logits: torch.Tensor) -> torch.Tensor:
            if settings["mode"] == "discovery":
                return torch.sigmoid(logits.float()) >= settings["min_score"]
            return labels

        with torch.no_grad(), autocast(device, config.precision):
            heatmaps, logits = mined_heatmaps(models, x, select)
        probability = torch.sigmoid(logits.float()).cpu().numpy()
        wanted = select(logits).cpu().numpy()
        letterboxes = [Letterbox.from_record({k: v[i] for k, v in batch.meta.items()}) for i in range(len(batch))]
        found = localize(heatmaps, wanted, config.input_size, letterboxes)
        for i, image_id in enumerate(batch.meta["image_id"]):
            for c, loc in sorted(found[i].items()):
                for rank, (box, score) in enumerate(zip(loc.boxes, loc.scores), start=1):
                    rows.append({
                        "image_id": image_id, "finding": FINDINGS[c], "rank": rank,
                        "x_min": box[0], "y_min": box[1], "x_max": box[2], "y_max": box[3],
                        "score": score, "probability": probability[i, c],
                        "method": settings["method"], "model_id": settings["model_id"],
                    })
        images += len(batch)
    return rows, images


@task(cache_policy=NO_CACHE)
def harvest_shard(shard: str, files: tuple[str, ...], target: str, key: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """Harvest one shard into its part; returns its name, image and box counts."""
    torch.set_num_threads(settings.get("threads") or worker_threads())
    config = TrainConfig.from_dict(settings["config"])
    device = worker_device(config.device)
    models = worker_models(files, device)
    rows, images = shard_boxes(models, config, device, Path(shard), settings)
    maybe_fail(Path(shard).stem, images)
    boxes = write_part(Path(target), rows, key, images)
    return {"shard": Path(shard).stem, "images": images, "boxes": boxes}


def model_identity(run: str, files: list[Path]) -> tuple[str, list[str]]:
    """``<run>@<12 hex>`` from the sha256 of the checkpoints used, and those sha256s."""
    digests = [file_sha256(f) for f in files]
    return f"{run}@{hashlib.sha256(''.join(digests).encode()).hexdigest()[:12]}", digests


@flow(name="harvest", log_prints=True)
def harvest(
    workdir: str,
    model: str,
    method: str = "am",
    all_findings: bool = False,
    min_score: float = 0.5,
    batch_size: int = 32,
    splits: tuple[str, ...] = SPLITS,
    threads: int | None = None,
    gpu_tasks: bool = False,
) -> dict[str, Any]:
    """Boxes for every image of ``splits`` (see module doc); writes W/harvest/harvest.json.

    ``gpu_tasks``: each task asks Dask for one unit of the workers' ``GPU`` resource.
    """
    logger = get_run_logger()
    check_method(method)
    if not 0 <= min_score <= 1:
        raise ValueError(f"--min-score must lie in [0, 1], got {min_score}")
    work, directory = Path(workdir), run_dir(workdir, model)
    config = read_config(directory)
    files = method_steps(directory, config, method)
    model_id, digests = model_identity(model, files)
    mode = "discovery" if all_findings else "mining"
    settings = {"config": config.to_dict(), "mode": mode, "min_score": min_score, "batch_size": batch_size, "threads": threads,
                "method": method, "model_id": model_id}
    shards = ShardReader(work / SHARD_DIR).shards
    shards = [s for s in shards if s["split"] in splits]
    if not shards:
        raise FileNotFoundError(f"{work / SHARD_DIR}: no shards of splits {', '.join(splits)} (run preprocess first)")
    base_key = {"model_id": model_id, "checkpoints": digests, "method": method, "mode": mode,
                "min_score": min_score if all_findings else None, "input_size": config.input_size,
                "thresholds": list(DEFAULT_THRESHOLDS)}
    out = parts_dir(work)
    out.mkdir(parents=True, exist_ok=True)
    (work / HARVEST_DIR / SUMMARY_FILE).unlink(missing_ok=True)  # the summary marks a complete harvest

    todo, done = [], {}
    for shard in shards:
        key = {**base_key, "shard": shard["sha256"]}
        target = part_path(work, shard["file"])
        if part_key(target) == key:
            done[shard["name"]] = None
        else:
            todo.append((shard, key, target))
    logger.info("harvest %s (%s, %s): %d shards to do, %d already done", model_id, method, mode, len(todo), len(done))
    with dask.annotate(**({"resources": {"GPU": 1}} if gpu_tasks else {})):
        futures = [
            harvest_shard.submit(str(work / SHARD_DIR / s["file"]), tuple(map(str, files)), str(t), k, settings)
            for s, k, t in todo
        ]
    names = {id(f): s["name"] for f, (s, _, _) in zip(futures, todo)}
    rows = {s["name"]: s["rows"] for s in shards}
    failures: dict[str, str] = {}
    with progress_bar(f"harvest {model_id}", sum(rows.values())) as advance:
        advance(sum(rows[name] for name in done))
        for future in as_completed(futures):
            name = names[id(future)]
            outcome = future.result(raise_on_failure=False)
            if isinstance(outcome, dict):
                if outcome["images"] != rows[name]:
                    failures[name] = f"harvested {outcome['images']} images of {rows[name]}"
            else:
                failures[name] = f"{type(outcome).__name__}: {outcome}"
            advance(rows[name])
    if failures:
        detail = "; ".join(f"{name}: {error}" for name, error in sorted(failures.items()))
        raise HarvestIncomplete(f"{len(failures)} of {len(shards)} shards failed ({detail}); the other parts are kept: rerun to resume")

    removed = remove_stale_parts(out, [s["name"] for s in shards])
    summary = summarize(work, shards, base_key, model, built=len(todo), removed=removed)
    write_json(work / HARVEST_DIR / SUMMARY_FILE, summary)
    logger.info("%d images, %d boxes (%d shards built, %d kept) -> %s",
                summary["images"], summary["boxes"], len(todo), len(done), out)
    return summary


def summarize(work: Path, shards: list[dict[str, Any]], key: dict[str, Any], run: str, built: int, removed: list[str]) -> dict[str, Any]:
    """harvest.json: the key, the run, and per finding the boxes and images covered (read from the parts)."""
    totals = {f: {"boxes": 0, "images": 0} for f in FINDINGS}
    for shard in shards:  # a part at a time; an image lies in one shard, so its counts add up
        for finding, counts in finding_counts(read_part(part_path(work, shard["file"]))).items():
            for name, n in counts.items():
                totals[finding][name] += n
    return {
        "key": key, "run": run, "code_version": code_version(),
        "shards": [s["name"] for s in shards], "images": sum(s["rows"] for s in shards),
        "boxes": sum(c["boxes"] for c in totals.values()),
        "boxes_per_finding": {f: c["boxes"] for f, c in totals.items()},
        "images_per_finding": {f: c["images"] for f, c in totals.items()},
        "built": built, "removed": removed,
    }


def run_harvest(
    workdir: str, model: str, *, workers: int | None = None, dask_address: str | None = None, gpus: int | None = None, **options: Any
) -> dict[str, Any]:
    """The flow on a Dask cluster: local processes by default (one per core on CPU, each with
    one torch thread; one per GPU on CUDA, each holding a ``GPU`` resource), or an existing
    scheduler (with ``gpus``, its workers must offer the ``GPU`` resource: tasks ask for one)."""
    check_method(options.get("method", "am"))  # before a cluster starts
    if gpus is None and not dask_address and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
    if not dask_address:
        workers = workers or gpus or default_workers()
        options.setdefault("threads", max(1, default_workers() // workers))
    options["gpu_tasks"] = bool(gpus)
    runner = dask_task_runner(workers=None if dask_address else workers, address=dask_address,
                              resources={"GPU": 1} if gpus and not dask_address else None)
    with prefect_api(), local_worker_config():
        return harvest.with_options(task_runner=runner)(workdir=workdir, model=model, **options)
