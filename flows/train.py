"""Flows ``train`` and ``mine-attention``: W/shards -> W/models/<run>/ (storage.stages.runs).

Step 1 trains the classifier (the CAM baseline); steps 2..T fine-tune it with attention
mining and knowledge preservation (miner.attention). A run trains the checkpoints its
method needs (``cam``: step 1; ``am``: steps 1..T; ``mil``: the patch model of Li et al. 2018,
miner.mil). One run may hold both families: they share the config. A stopped run resumes from its last
finished epoch when started again with the same ``--run``; a finished step is skipped. A
different config under the same run is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from cxr_miner.flows.engine.checkpoints import load_classifier, read_config, trunk_weights
from cxr_miner.flows.engine.fitting import Schedule, fit, step_done
from cxr_miner.flows.engine.loader import shard_loader
from cxr_miner.flows.engine.mil_training_set import mil_training_set
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import box_options, check_folds, resolve_config
from cxr_miner.flows.tasks import artifact_key
from cxr_miner.miner.forgetting import change_intervals, forgetting_report
from cxr_miner.miner.methods import TRAINERS, TrainingStep, box_learners, check_method, create_method
from cxr_miner.miner.mil import PatchLabels, init_patch_bias
from cxr_miner.miner.models import CamClassifier, create_model
from cxr_miner.miner.training import (
    TrainConfig,
    am_step_loss,
    create_patch_model,
    init_branch_bias,
    patch_loss,
    pick_device,
    predict,
    step1_loss,
    to_device,
)
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.batches import RowGroup, label_prevalence, split_row_groups
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import InputError, MissingInput, SettingError
from cxr_miner.storage.vocab.findings import FINDINGS


@task(cache_policy=NO_CACHE)
def train_classifier(workdir: str, run: str) -> dict[str, Any]:
    """Step 1: multi-label BCE training on the train split, best model by validation mean AUC."""
    folder = RunFolder.of(workdir, run)
    config = read_config(folder)
    if step_done(folder, "step1", config.epochs):
        return {"step": 1, "skipped": True}
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, trunk_weights(config.weights, config.model.trunk))
    train_groups, val_groups = split_row_groups(workdir, ("train",)), split_row_groups(workdir, ("val",))
    if not train_groups:
        raise InputError(workdir, "no training images in the shards")
    init_branch_bias(model, torch.from_numpy(label_prevalence(train_groups)).float())
    model = to_device(model, device)
    schedule = Schedule(config.epochs, config.lr, config.seed + 1, freeze_epochs=config.freeze_trunk_epochs)
    return fit(
        folder,
        "step1",
        model,
        step1_loss(config),
        train_groups,
        val_groups,
        config,
        device,
        schedule,
        keep_best=True,
        logger=get_run_logger(),
        record={"step": 1},
    )


@task(cache_policy=NO_CACHE)
def attention_step(workdir: str, run: str, step: int) -> dict[str, Any]:
    """AM step t >= 2: fine-tune step t-1's model on X * M_{t-1} (Eq. 1-3) with KP (Eq. 4-6)."""
    folder = RunFolder.of(workdir, run)
    config = read_config(folder)
    if step_done(folder, f"step{step}", config.am_epochs):
        return {"step": step, "skipped": True}
    device = pick_device(config.device)
    torch.manual_seed(config.seed + step)
    chain = [load_classifier(folder.step(s), device) for s in range(1, step)]
    for frozen in chain:
        frozen.requires_grad_(False)
    model = load_classifier(folder.step(step - 1), device)
    boxed_from = ("val", "test") if config.am_include_boxed else ()
    train_groups = split_row_groups(workdir, ("train",)) + split_row_groups(workdir, boxed_from, only_boxed=True)
    val_groups = split_row_groups(workdir, ("val",))
    result = fit(
        folder,
        f"step{step}",
        model,
        am_step_loss(config, chain),
        train_groups,
        val_groups,
        config,
        device,
        am_schedule(config, step),
        keep_best=False,
        logger=get_run_logger(),
        record={"step": step},
    )
    intervals = validation_change_intervals(chain[0], model, val_groups, config, device) if val_groups else {}
    record_forgetting(folder, f"step{step}", get_run_logger(), intervals)
    return result


def am_schedule(config: TrainConfig, step: int) -> Schedule:
    """How AM step ``step`` trains: am_epochs at am_lr by ``am_optimizer`` (step 1's optimiser by default)."""
    optimizer = None if config.am_optimizer == "step1" else config.am_optimizer
    return Schedule(
        config.am_epochs, config.am_lr, config.seed + step, optimizer=optimizer, warmup_steps=config.am_warmup_steps
    )


def validation_change_intervals(
    step1: CamClassifier, model: CamClassifier, val_groups: list[RowGroup], config: TrainConfig, device: torch.device
) -> dict[str, list[float]]:
    """miner.forgetting.change_intervals of ``model``'s validation AUCs against step 1's model's,
    both predicted on the val split."""
    loader = shard_loader(val_groups, config.batch_size, shuffle=False, workers=config.loader_workers)
    first, labels = predict(step1, loader, config, device)
    now, _ = predict(model, loader, config, device)
    return change_intervals(first.numpy(), now.numpy(), labels.numpy(), FINDINGS)


def record_forgetting(
    folder: RunFolder, name: str, logger: Any, intervals: dict[str, list[float]] | None = None
) -> list[str]:
    """AM step ``name``'s validation AUC per finding against the kept step 1's (miner.forgetting),
    into its last epoch's row of metrics.json (``auc_against_step1`` with each change's ``interval``
    where ``intervals`` gives it, ``auc_change_interval``, ``forgotten``); a warning per forgotten
    finding. Returns the warnings."""
    history = folder.metrics()[name]
    report = forgetting_report(
        {"step1": read_checkpoint_record(folder.step(1))["metrics"]["auc"], name: history[-1]["auc"]},
        intervals={name: intervals or {}},
    )
    step = report["steps"][name]
    history[-1] = {
        **history[-1],
        "auc_against_step1": step["changes"],
        "forgotten": step["forgotten"],
        **({"auc_change_interval": intervals} if intervals else {}),
    }
    folder.record_metrics(name, history)
    for line in report["warnings"]:
        logger.warning("attention mining forgot: %s", line)
    return report["warnings"]


@task(cache_policy=NO_CACHE)
def patch_model_step(workdir: str, run: str, name: str) -> dict[str, Any]:
    """The MIL patch model ``name`` (``mil``, ``mil-fold<k>``, ``mil-all``): Eq. 4 on every unboxed
    training image and the boxed images of its pool, with the boxes of its box subset
    (flows.engine.mil_training_set); best model by validation mean AUC of Eq. 2's scores."""
    folder = RunFolder.of(workdir, run)
    config = read_config(folder)
    if step_done(folder, name, config.mil_epochs):
        return {"step": name, "skipped": True}
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    plan = mil_training_set(Path(workdir), config, name)
    train_groups = split_row_groups(workdir, ("train",), images=plan.train_images) + plan.pool_groups
    val_groups = split_row_groups(workdir, ("val",))
    model = create_patch_model(config, trunk_weights(config.weights, config.model.trunk))
    init_patch_bias(model, torch.from_numpy(label_prevalence(train_groups)).float())
    model = to_device(model, device)
    get_run_logger().info(
        "%s: %d images, %d of them with the boxes they have (%s)",
        name,
        sum(g.rows for g in train_groups),
        len(plan.boxes),
        plan.description,
    )
    schedule = Schedule(
        config.mil_epochs, config.mil_lr, config.seed + 100, config.mil_optimizer, config.mil_lr_decay_epochs
    )
    return fit(
        folder,
        name,
        model,
        patch_loss(config),
        train_groups,
        val_groups,
        config,
        device,
        schedule,
        keep_best=True,
        logger=get_run_logger(),
        record={"step": name, "network": "patch", "boxes": plan.record()},
        targets=PatchLabels(plan.boxes, config.input_size, config.mil_grid),
    )


def publish_aucs(folder: RunFolder) -> list[dict[str, Any]]:
    """Per-finding validation AUC of every step's final epoch, as a Prefect table artifact."""
    metrics = folder.metrics()
    rows = []
    for finding in FINDINGS:
        row: dict[str, Any] = {"finding": finding}
        for step, history in sorted(metrics.items()):
            value = history[-1]["auc"][finding] if history else None  # None: undefined (metrics.json's null)
            row[step] = None if value is None or math.isnan(value) else round(value, 4)
        rows.append(row)
    create_table_artifact(
        rows, key=artifact_key(folder.name), description=f"Validation ROC AUC per finding, run {folder.name}"
    )
    return rows


def train_config(
    workdir: str,
    preset: str,
    config_file: str | None,
    method: str,
    box_fraction: float | None = None,
    folds: int | None = None,
) -> tuple[TrainConfig, str | None]:
    """The run's config from the preset, the config file and the MIL options, checked (InputError
    naming the bad setting) against the collection's boxed patients; and a warning, if any."""
    check_method(method)
    config = resolve_config(preset, config_file)  # the method after torch: methods registered from outside too
    try:
        config = config.updated(box_options(box_fraction, folds, method, box_learners()))
    except SettingError as error:
        raise InputError("--box-fraction/--folds", str(error)) from None
    return config, check_folds(Path(workdir), config.box_folds)


@flow(name="train", log_prints=True)
@writes_into("workdir")
def train(
    workdir: str,
    preset: str = "cpu-small",
    config_file: str | None = None,
    run: str | None = None,
    method: str = "am",
    box_fraction: float | None = None,
    folds: int | None = None,
    for_release: bool = True,
) -> dict[str, Any]:
    """Train the checkpoints of ``method``'s training plan (LocalizationMethod.training_plan: e.g.
    step 1, the classifier, then AM steps 2..T; or the MIL patch model evaluate scores and, with
    ``for_release``, the one harvest uses), each by its trainer's task."""
    config, warning = train_config(workdir, preset, config_file, method, box_fraction, folds)
    if warning:
        get_run_logger().warning(warning)
    plan = create_method(method, config).training_plan(for_release)
    run = run or preset
    folder = RunFolder.of(workdir, run)
    folder.start(config.to_dict(), workdir, defaults=TrainConfig().to_dict())
    steps = [run_training_step(workdir, run, step) for step in plan]
    rows = publish_aucs(folder)
    summary = {"run": run, "directory": str(folder.directory), "steps": [s["step"] for s in steps], "auc": rows}
    write_json(folder.summary_file, summary)
    return summary


# The task of each trainer a training plan names (miner.methods.TRAINERS): (workdir, run, step) -> summary.
TRAINING_TASKS: dict[str, Callable[[str, str, TrainingStep], dict[str, Any]]] = {
    "classifier": lambda workdir, run, step: train_classifier(workdir, run),
    "attention": lambda workdir, run, step: attention_step(workdir, run, step.step),
    "patch": lambda workdir, run, step: patch_model_step(workdir, run, step.checkpoint),
}


def run_training_step(workdir: str, run: str, step: TrainingStep) -> dict[str, Any]:
    """One step of a method's training plan, by its trainer's task."""
    if step.trainer not in TRAINING_TASKS:
        raise ValueError(f"no task trains {step.trainer!r}; trainers: {TRAINERS}")
    return TRAINING_TASKS[step.trainer](workdir, run, step)


@flow(name="mine-attention", log_prints=True)
@writes_into("workdir")
def mine_attention(workdir: str, run: str) -> dict[str, Any]:
    """AM steps 2..T of an existing run whose step 1 is trained."""
    folder = RunFolder.of(workdir, run)
    config = read_config(folder)
    if not folder.step(1).exists():
        raise MissingInput(f"{folder.step(1)}: train step 1 first (`cxr-miner train --run {run}`)")
    steps = [attention_step(workdir, run, t) for t in range(2, config.am_steps + 1)]
    publish_aucs(folder)
    return {"run": run, "steps": [s["step"] for s in steps]}
