"""Flows ``train`` and ``mine-attention``: W/shards -> W/models/<run>/.

Step 1 trains the classifier (the CAM baseline); steps 2..T fine-tune it with attention
mining and knowledge preservation (miner.attention). Files of a run:

- ``config.json``: the TrainConfig and the identity of the shards it trains on;
- ``step<t>.safetensors``: the model of step t (step 1: best mean validation AUC);
- ``step<t>-last.safetensors``: the resumable state after the last finished epoch;
- ``metrics.json``: per-epoch loss, throughput and validation AUCs of every step.

A stopped run resumes from its last finished epoch when started again with the same
``--run``; a finished step is skipped. A different config under the same run is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from cxr_miner.flows.engine.checkpoints import load_model, resume_into, save_checkpoint, trunk_weights
from cxr_miner.flows.engine.loader import shard_loader
from cxr_miner.flows.progress import progress_bar
from cxr_miner.miner.attention import attention_mining_loss
from cxr_miner.miner.metrics import AUCAccumulator
from cxr_miner.miner.models import CamClassifier, create_model
from cxr_miner.miner.training import (
    TrainConfig, init_branch_bias, make_optimizer, pick_device, plain_loss, predict, preset, set_trunk_trainable, train_epoch,
)
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.batches import RowGroup, label_prevalence, list_row_groups
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader

RUNS_DIR = "models"


def run_dir(workdir: str | Path, run: str) -> Path:
    return Path(workdir) / RUNS_DIR / run


def step_file(directory: Path, step: int, last: bool = False) -> Path:
    return directory / f"step{step}{'-last' if last else ''}.safetensors"


def shards_identity(workdir: str | Path) -> str:
    entries = sorted((s["file"], s["sha256"]) for s in ShardReader(Path(workdir) / SHARD_DIR).shards)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def shard_paths(workdir: str | Path, splits: tuple[str, ...]) -> list[Path]:
    return [path for split in splits for path in ShardReader(Path(workdir) / SHARD_DIR, split).paths]


def row_groups(workdir: str | Path, splits: tuple[str, ...], boxed_from: tuple[str, ...] = ()) -> list[RowGroup]:
    """Row groups of the shards of ``splits``, plus the boxed images of ``boxed_from`` splits."""
    return list_row_groups(shard_paths(workdir, splits)) + list_row_groups(shard_paths(workdir, boxed_from), only_boxed=True)


def start_run(workdir: str, run: str, config: TrainConfig) -> Path:
    """Create the run folder with its config, or check that a resumed run has the same one."""
    directory = run_dir(workdir, run)
    record = {"config": config.to_dict(), "shards": shards_identity(workdir)}
    path = directory / "config.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != json.loads(json.dumps(record)):
            raise ValueError(
                f"{path}: run {run!r} was started with other settings or shards; "
                f"pass another --run, or delete {directory} to start it again"
            )
    else:
        write_json(path, record)
    return directory


def read_config(directory: Path) -> TrainConfig:
    path = directory / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such training run")
    return TrainConfig.from_dict(json.loads(path.read_text())["config"])


def mean_auc(aucs: dict[str, float]) -> float:
    finite = [v for v in aucs.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def validation_aucs(model: CamClassifier, loader, config: TrainConfig, device: torch.device) -> dict[str, float]:
    aucs = AUCAccumulator()
    aucs.accumulate(*(t.numpy() for t in predict(model, loader, config, device)))
    return aucs.compute()


def record_metrics(directory: Path, step: int, history: list[dict[str, Any]]) -> None:
    path = directory / "metrics.json"
    metrics = json.loads(path.read_text()) if path.exists() else {}
    metrics[f"step{step}"] = history
    write_json(path, metrics)


def fit(
    directory: Path, step: int, model: CamClassifier, loss_fn, train_groups: list[RowGroup], val_groups: list[RowGroup],
    config: TrainConfig, device: torch.device, epochs: int, lr: float, keep_best: bool,
) -> dict[str, Any]:
    """The epoch loop shared by step 1 and the AM steps: resume, train, validate, checkpoint."""
    logger = get_run_logger()
    last = step_file(directory, step, last=True)
    pending = step_file(directory, step).with_suffix(".pending")  # becomes step<t>.safetensors when the step ends
    steps_per_epoch = max(1, math.ceil(sum(g.rows for g in train_groups) / config.batch_size))
    optimizer, scheduler = make_optimizer(model, config, lr, epochs, steps_per_epoch)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": -math.inf}
    if last.exists():
        state = resume_into(last, model, optimizer, scheduler)["state"]
        logger.info("step %d: resuming after epoch %d from %s", step, state["epoch"], last)
    train_loader = shard_loader(train_groups, config.batch_size, shuffle=True, workers=config.loader_workers,
                                seed=config.seed + step, start_epoch=state["epoch"], pin_memory=device.type == "cuda")
    val_loader = shard_loader(val_groups, config.batch_size, shuffle=False, workers=config.loader_workers)
    images = sum(g.rows for g in train_groups)
    for epoch in range(state["epoch"], epochs):
        if step == 1:
            set_trunk_trainable(model, epoch >= config.freeze_trunk_epochs)
        with progress_bar(f"step {step} epoch {epoch + 1}/{epochs}", images) as advance:
            stats = train_epoch(
                model, train_loader, loss_fn, optimizer, scheduler, config, device,
                on_batch=lambda n, loss: advance(n, status=f"loss {loss:.4f}"),
            )
        aucs = validation_aucs(model, val_loader, config, device) if val_groups else {f: math.nan for f in FINDINGS}
        row = {"epoch": epoch + 1, "loss": stats.loss, **{f"loss_{k}": v for k, v in stats.parts.items()},
               "images_per_second": stats.images_per_second, "mean_auc": mean_auc(aucs), "auc": aucs}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        logger.info("step %d epoch %d: loss %.4f, %.1f images/s, validation mean AUC %.3f",
                    step, epoch + 1, stats.loss, stats.images_per_second, row["mean_auc"])
        record = {"config": config.to_dict(), "step": step, "metrics": row}
        score = row["mean_auc"] if not math.isnan(row["mean_auc"]) else -stats.loss
        if not keep_best or score > state["best"]:
            state["best"] = score
            save_checkpoint(pending, model, record)
        save_checkpoint(last, model, {**record, "state": state}, optimizer, scheduler)
        record_metrics(directory, step, state["history"])
    if pending.exists():
        pending.replace(step_file(directory, step))
    return {"step": step, "epochs": state["epoch"], "history": state["history"]}


def step_done(directory: Path, step: int, epochs: int) -> bool:
    """A step is finished when its model exists and its last state says all epochs ran."""
    if not step_file(directory, step).exists() or not step_file(directory, step, last=True).exists():
        return False
    return read_checkpoint_record(step_file(directory, step, last=True))["state"]["epoch"] >= epochs


@task(cache_policy=NO_CACHE)
def train_classifier(workdir: str, run: str) -> dict[str, Any]:
    """Step 1: multi-label BCE training on the train split, best model by validation mean AUC."""
    directory = run_dir(workdir, run)
    config = read_config(directory)
    if step_done(directory, 1, config.epochs):
        return {"step": 1, "skipped": True}
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    model = create_model(config.model, trunk_weights(config.weights, config.model.trunk))
    train_groups, val_groups = row_groups(workdir, ("train",)), row_groups(workdir, ("val",))
    if not train_groups:
        raise ValueError(f"{workdir}: no training images in the shards")
    init_branch_bias(model, torch.from_numpy(label_prevalence(train_groups)).float())
    model = model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    return fit(directory, 1, model, plain_loss, train_groups, val_groups, config, device, config.epochs, config.lr, keep_best=True)


@task(cache_policy=NO_CACHE)
def attention_step(workdir: str, run: str, step: int) -> dict[str, Any]:
    """AM step t >= 2: fine-tune step t-1's model on X * M_{t-1} (Eq. 1-3) with KP (Eq. 4-6)."""
    directory = run_dir(workdir, run)
    config = read_config(directory)
    if step_done(directory, step, config.am_epochs):
        return {"step": step, "skipped": True}
    device = pick_device(config.device)
    torch.manual_seed(config.seed + step)
    chain = [load_model(step_file(directory, s), device)[0] for s in range(1, step)]
    for frozen in chain:
        frozen.requires_grad_(False)
    model, _ = load_model(step_file(directory, step - 1), device)
    boxed_from = ("val", "test") if config.am_include_boxed else ()
    train_groups, val_groups = row_groups(workdir, ("train",), boxed_from), row_groups(workdir, ("val",))

    def loss_fn(model, images, labels):
        loss = attention_mining_loss(model, chain, images, labels, config.kp, config.kp_lambda, config.erased_fraction)
        return loss.total, {"cls": float(loss.cls), "kp": float(loss.kp)}

    return fit(directory, step, model, loss_fn, train_groups, val_groups, config, device, config.am_epochs, config.am_lr,
               keep_best=False)


def artifact_key(run: str) -> str:
    return "auc-" + re.sub(r"[^a-z0-9-]+", "-", run.lower()).strip("-")


def publish_aucs(directory: Path, run: str) -> list[dict[str, Any]]:
    """Per-finding validation AUC of every step's final epoch, as a Prefect table artifact."""
    metrics = json.loads((directory / "metrics.json").read_text())
    rows = []
    for finding in FINDINGS:
        row: dict[str, Any] = {"finding": finding}
        for step, history in sorted(metrics.items()):
            value = history[-1]["auc"][finding] if history else math.nan
            row[step] = None if math.isnan(value) else round(value, 4)
        rows.append(row)
    create_table_artifact(rows, key=artifact_key(run), description=f"Validation ROC AUC per finding, run {run}")
    return rows


def resolve_config(preset_name: str, config_file: str | None) -> TrainConfig:
    config = preset(preset_name)
    if config_file:
        path = Path(config_file)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            overrides = json.loads(path.read_text())
        except ValueError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
        config = config.updated(overrides)
    return config


@flow(name="train", log_prints=True)
def train(workdir: str, preset: str = "cpu-small", config_file: str | None = None, run: str | None = None,
          attention: bool = True) -> dict[str, Any]:
    """Step 1 (classifier, the CAM baseline) and, unless ``attention`` is off, AM steps 2..T."""
    config = resolve_config(preset, config_file)
    run = run or preset
    directory = start_run(workdir, run, config)
    steps = [train_classifier(workdir, run)]
    if attention:
        steps += [attention_step(workdir, run, t) for t in range(2, config.am_steps + 1)]
    rows = publish_aucs(directory, run)
    summary = {"run": run, "directory": str(directory), "steps": [s["step"] for s in steps], "auc": rows}
    write_json(directory / "summary.json", summary)
    return summary


@flow(name="mine-attention", log_prints=True)
def mine_attention(workdir: str, run: str) -> dict[str, Any]:
    """AM steps 2..T of an existing run whose step 1 is trained."""
    directory = run_dir(workdir, run)
    config = read_config(directory)
    if not step_file(directory, 1).exists():
        raise FileNotFoundError(f"{step_file(directory, 1)}: train step 1 first (`cxr-miner train --run {run}`)")
    steps = [attention_step(workdir, run, t) for t in range(2, config.am_steps + 1)]
    publish_aucs(directory, run)
    return {"run": run, "steps": [s["step"] for s in steps]}
