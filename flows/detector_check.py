"""Flow ``detector-check``: does a detector trained on a release's boxes learn to find lesions?

For the release R (a folder under the releases folder) of the workdir W, four Faster R-CNN
detectors (miner.detector) are trained the same way, for the same number of steps (``epochs``
epochs of the largest set; a smaller set takes more epochs), on four sets of boxes
(storage.releases.detector_sets: mined boxes at the operating point, all mined boxes, box-val's
ground truth, and a prior of mean boxes), each on a Dask worker (one per GPU on CUDA, bf16), and
each runs over the box-test images. COCOeval scores them on box-test's ground truth
(miner.detection_metrics). The result is published as a new release version: R's files plus
``detector-check.json`` and a report page (storage.releases.detector_check).

Work files: ``W/detector-check/<R>-<settings hash>/<set>/`` holds each detector's checkpoints
(resumable after each epoch, skipped when done), its training set and its ``detections.json``
(COCO results in source pixels), so a rerun with the same settings trains nothing again.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
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
from cxr_miner.flows.engine.detection import DETECTOR, detections, load_detector, train_detector
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.tasks import artifact_key, collect, failure_text
from cxr_miner.miner.detection_metrics import detection_figures, undefined_figures
from cxr_miner.miner.detector import DetectorConfig
from cxr_miner.storage.releases.detector_check import check_markdown, check_record, publish_checked
from cxr_miner.storage.releases.detector_sets import (
    DETECTIONS_FILE,
    TRAINING_SETS,
    CheckPlan,
    plan_check,
    read_detections,
    read_mined_boxes,
    read_training_set,
    write_detections,
    write_training_set,
)
from cxr_miner.storage.releases.release import BOXES_FILE, harvested_images, read_manifest, release_file
from cxr_miner.storage.stages.batches import split_row_groups
from cxr_miner.storage.stages.box_splits import BOX_VAL_FRACTION
from cxr_miner.storage.stages.evaluation import read_evaluation
from cxr_miner.storage.stages.index import (
    GT_BOXES_FILE,
    INDEX_FILE,
    REPORT_FILE,
    SPLITS,
    image_sizes,
    read_gt_boxes,
    read_index,
    read_ingest_report,
)
from cxr_miner.storage.stages.provenance import settings_digest
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import InputError
from cxr_miner.storage.vocab.findings import FINDINGS

CHECK_DIR = "detector-check"


class DetectorCheckIncomplete(RuntimeError):
    """Some detectors failed; the finished ones are kept and a rerun resumes."""


def checked_release(release: Path, work: Path) -> dict[str, Any]:
    """The manifest of release folder ``release``, checked to come from the workdir's index."""
    manifest = read_manifest(release)
    release_file(release, BOXES_FILE)
    index_sha = read_ingest_report(work).get("index_sha256") if (work / REPORT_FILE).exists() else None
    if manifest.get("index_sha256") != index_sha:
        raise InputError(
            release,
            f"was made from another index than {work / INDEX_FILE} "
            f"({manifest.get('index_sha256')} != {index_sha}): pass the workdir the release came from",
        )
    return manifest


def box_val_fraction_of(work: Path, manifest: dict[str, Any]) -> float:
    """The box-val fraction the release's run was evaluated with (its tuning chose on that half)."""
    run = RunFolder.of(work, manifest["model"]["run"])
    return (
        read_evaluation(run).get("box_val_fraction", BOX_VAL_FRACTION)
        if run.evaluation_json.exists()
        else BOX_VAL_FRACTION
    )


def make_plan(
    work: Path, release: Path, box_val_fraction: float, background_ratio: float
) -> tuple[CheckPlan, dict[str, tuple[int, int]]]:
    images = harvested_images(work, ("image_id", "patient_id", "split", *FINDINGS))
    sizes = image_sizes(read_index(work / INDEX_FILE))
    mined = read_mined_boxes(release)
    plan = plan_check(images, sizes, read_gt_boxes(work / GT_BOXES_FILE), mined, box_val_fraction, background_ratio)
    return plan, sizes


def detector_config(
    name: str, epochs: int | None, size: int | None, weights: str, settings: dict[str, Any]
) -> DetectorConfig:
    """The DetectorConfig of the command's options and a settings object; InputError naming a bad setting."""
    known = set(DetectorConfig.__dataclass_fields__) - {"name", "weights", "epochs", "size"}
    if unknown := sorted(set(settings) - known):
        raise InputError("detector settings", f"unknown {unknown}; known: {sorted(known)}")
    given = {k: v for k, v in (("epochs", epochs), ("size", size)) if v is not None}
    try:
        return DetectorConfig(name=name, weights=weights, **settings, **given)
    except (TypeError, ValueError) as error:
        raise InputError("detector settings", str(error)) from None


def equal_steps(epochs: int, images: dict[str, int]) -> dict[str, int]:
    """Epochs per training set such that every detector takes about as many steps as ``epochs`` epochs
    of the largest set: the detectors differ in their boxes, not in how long they learnt."""
    largest = max(images.values(), default=0)
    return {name: max(1, math.ceil(epochs * largest / n)) for name, n in images.items()}


def settings_id(config: DetectorConfig, background_ratio: float, seed: int) -> str:
    return settings_digest({"detector": config.to_dict(), "background_ratio": background_ratio, "seed": seed})


@task(cache_policy=NO_CACHE)
def detector_task(
    workdir: str, folder: str, name: str, config: dict[str, Any], test_images: list[str], settings: dict[str, Any]
) -> dict[str, Any]:
    """Train the detector of training set ``name`` (its boxes in ``folder``/training-set.json), run it
    over the box-test images, and write ``folder``/detections.json; returns its counts and speed."""
    torch.set_num_threads(settings.get("threads") or worker_threads())
    detector = DetectorConfig(**config)
    device = worker_device(settings["device"])
    run = RunFolder(Path(folder))
    boxes = read_training_set(run.directory)
    groups = split_row_groups(workdir, SPLITS, images=boxes)
    history = train_detector(
        run, detector, groups, boxes, device, get_run_logger(), {"training_set": name}, seed=settings["seed"]
    )
    model, _ = load_detector(run.checkpoint(DETECTOR), device)
    found = detections(model, detector, split_row_groups(workdir, SPLITS, images=test_images), device)
    write_detections(run.directory, found)
    epochs = history.get("history") or run.metrics().get(DETECTOR, [])
    speed = [row["images_per_second"] for row in epochs]
    return {
        "set": name,
        "detections": len(found),
        "images_per_second": sum(speed) / len(speed) if speed else None,
        "train_seconds": sum(row.get("seconds", 0.0) for row in epochs),
    }


@flow(name="detector-check", log_prints=True)
@writes_into("workdir", "out", creates=("out",))
def detector_check(
    release: str,
    workdir: str,
    out: str,
    detector: str = "fasterrcnn-mobilenet",
    epochs: int | None = None,
    size: int | None = None,
    weights: str = "random",
    settings: dict[str, Any] | None = None,
    background_ratio: float = 1.0,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    gpu_tasks: bool = False,
) -> dict[str, Any]:
    """Check release ``release`` (module doc) and publish the checked copy under ``out``; ``settings``:
    more DetectorConfig fields (batch_size, lr, rois_per_image, box_head, ...)."""
    logger = get_run_logger()
    work, source = Path(workdir), Path(release).resolve()
    manifest = checked_release(source, work)
    config = detector_config(detector, epochs, size, weights, settings or {})
    plan, sizes = make_plan(work, source, box_val_fraction_of(work, manifest), background_ratio)
    if not plan.findings or not plan.test:
        raise InputError(
            work / GT_BOXES_FILE,
            "no finding has ground-truth boxes on both box-val and box-test images; the detector check needs them",
        )
    base = work / CHECK_DIR / f"{source.name}-{settings_id(config, background_ratio, seed)}"
    for name, training_set in plan.sets.items():
        write_training_set(base / name, training_set.boxes)
    options = {"device": device, "seed": seed, "threads": threads}
    trained, set_epochs, results = train_detectors(workdir, source.name, base, plan, config, options, gpu_tasks)
    figures = {
        name: detection_figures(plan.test, sizes, read_detections(base / name), plan.findings)
        if name in trained
        else undefined_figures(plan.findings)
        for name in plan.sets
    }
    speeds = {
        name: {k: results.get(name, {}).get(k) for k in ("images_per_second", "train_seconds")} for name in plan.sets
    }
    check = check_record(source.name, config.to_dict(), background_ratio, seed, plan, set_epochs, speeds, figures)
    target = publish_checked(Path(out), source, check)
    markdown = check_markdown(check)
    create_markdown_artifact(
        markdown,
        key=artifact_key(source.name, "detector-check"),
        description=f"detector check of release {source.name}",
    )
    logger.info(
        "detector check of %s -> release %s (%s)", source.name, target.name, target / "report" / "detector-check.html"
    )
    return {
        "version": target.name,
        "path": str(target),
        "checked_release": source.name,
        "check": check,
        "markdown": markdown,
        "work": str(base),
        "detections": {name: str(base / name / DETECTIONS_FILE) for name in trained},
    }


def train_detectors(
    workdir: str,
    release: str,
    base: Path,
    plan: CheckPlan,
    config: DetectorConfig,
    options: dict[str, Any],
    gpu_tasks: bool,
) -> tuple[list[str], dict[str, int], dict[str, Any]]:
    """One detector_task per training set with a box (each asking for a GPU with ``gpu_tasks``),
    all for about as many steps (equal_steps): the sets trained, their epochs, their results;
    DetectorCheckIncomplete naming the failed ones."""
    logger = get_run_logger()
    sets = ", ".join(f"{n} ({s.positives} + {s.background} images)" for n, s in plan.sets.items())
    logger.info("detector check of %s: %s on %s", release, config.name, sets)
    trained = [name for name, s in plan.sets.items() if s.positives]  # a set without a box trains nothing
    if empty := sorted(set(plan.sets) - set(trained)):
        logger.warning("no image to learn from in %s: not trained, not scored", ", ".join(empty))
    images = {name: s.positives + s.background for name, s in plan.sets.items()}
    set_epochs = equal_steps(config.epochs, {name: images[name] for name in trained})
    with dask.annotate(**({"resources": {"GPU": 1}} if gpu_tasks else {})):
        futures = [
            detector_task.submit(
                workdir,
                str(base / name),
                name,
                replace(config, epochs=set_epochs[name]).to_dict(),
                sorted(plan.test),
                options,
            )
            for name in trained
        ]
    results, failures = collect(f"detector check {release}", futures, trained, images)
    if failures:
        raise DetectorCheckIncomplete(
            f"{failure_text(failures, len(trained), 'detectors')}; finished detectors are kept: rerun to resume"
        )
    return trained, set_epochs, results


@writes_into("workdir")
def run_detector_check(
    release: str,
    workdir: str,
    out: str | None = None,
    *,
    workers: int | None = None,
    dask_address: str | None = None,
    gpus: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The flow on a Dask cluster as harvest runs (flows.harvest.run_harvest): one worker per GPU on
    CUDA, else local processes (at most one per training set), or an existing scheduler.
    ``out``: the releases folder to publish into (default: the checked release's)."""
    checked_release(Path(release).resolve(), Path(workdir))  # before a cluster starts
    detector_config(
        options.get("detector", "fasterrcnn-mobilenet"),
        options.get("epochs"),
        options.get("size"),
        options.get("weights", "random"),
        options.get("settings") or {},
    )
    out = out or str(Path(release).resolve().parent)
    gpus = local_gpus(gpus, dask_address)
    if not dask_address:
        workers = workers or gpus or min(len(TRAINING_SETS), default_workers())
        options.setdefault("threads", max(1, default_workers() // workers))
    options["gpu_tasks"] = bool(gpus)
    runner = dask_task_runner(
        workers=None if dask_address else workers,
        address=dask_address,
        resources={"GPU": 1} if gpus and not dask_address else None,
    )
    with prefect_api(), local_worker_config():
        return detector_check.with_options(task_runner=runner)(release=release, workdir=workdir, out=out, **options)
