"""The epoch loop of every training step: resume, train, validate, checkpoint, keep the best.

Files: the run folder's ``<step>-last.safetensors`` (resumable state after each epoch),
``<step>.pending`` (the best or last model so far) renamed to ``<step>.safetensors`` when the
step ends, and ``metrics.json``. A stopped step resumes after its last finished epoch.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from cxr_miner.flows.engine.checkpoints import resume_into, save_checkpoint
from cxr_miner.flows.engine.loader import Targets, shard_loader
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.progress import progress_bar
from cxr_miner.miner.metrics import AUCAccumulator
from cxr_miner.miner.training import TrainConfig, make_optimizer, predict, set_trunk_trainable, train_epoch
from cxr_miner.storage.stages.batches import RowGroup
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import FINDINGS


def mean_auc(aucs: dict[str, float]) -> float:
    """Mean over the findings whose AUC is defined (NaN when none is)."""
    finite = [v for v in aucs.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def validation_aucs(model: torch.nn.Module, loader, config: TrainConfig, device: torch.device) -> dict[str, float]:
    aucs = AUCAccumulator()
    aucs.accumulate(*(t.numpy() for t in predict(model, loader, config, device)))
    return aucs.compute()


def step_done(run: RunFolder, name: str, epochs: int) -> bool:
    """A step (checkpoint ``name``) is finished when its model exists and its last state says all epochs ran."""
    if not run.checkpoint(name).exists() or not run.checkpoint(name, last=True).exists():
        return False
    return read_checkpoint_record(run.checkpoint(name, last=True))["state"]["epoch"] >= epochs


@dataclass(frozen=True)
class Schedule:
    """How a step trains: ``epochs`` from learning rate ``lr`` (make_optimizer's ``optimizer`` and
    ``decay_epochs``), the trunk frozen for the first ``freeze_epochs``, shuffled from ``seed``."""

    epochs: int
    lr: float
    seed: int
    optimizer: str | None = None
    decay_epochs: int = 0
    freeze_epochs: int = 0
    warmup_steps: int = 0


def fit(
    run: RunFolder, name: str, model: torch.nn.Module, loss_fn, train_groups: list[RowGroup], val_groups: list[RowGroup],
    config: TrainConfig, device: torch.device, schedule: Schedule, keep_best: bool, logger: logging.LoggerAdapter | logging.Logger,
    record: dict[str, Any] | None = None, targets: Targets | None = None,
) -> dict[str, Any]:
    """Train ``model`` as the run's checkpoint ``name`` (see module doc); returns the step's history.

    ``loss_fn(model, images, labels, **targets(batch)) -> (loss, parts)``; with ``keep_best`` the
    model of the best validation mean AUC (else the last) becomes the step's checkpoint, whose
    record holds the config, the epoch's metrics and ``record``.
    """
    epochs = schedule.epochs
    last = run.checkpoint(name, last=True)
    pending = run.checkpoint(name).with_suffix(".pending")
    steps_per_epoch = max(1, math.ceil(sum(g.rows for g in train_groups) / config.batch_size))
    optimizer, scheduler = make_optimizer(model, config, schedule.lr, epochs, steps_per_epoch, schedule.optimizer, schedule.decay_epochs,
                                          schedule.warmup_steps)
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": -math.inf}
    if last.exists():
        state = resume_into(last, model, optimizer, scheduler)["state"]
        logger.info("%s: resuming after epoch %d from %s", name, state["epoch"], last)
    train_loader = shard_loader(train_groups, config.batch_size, shuffle=True, workers=config.loader_workers,
                                seed=schedule.seed, start_epoch=state["epoch"], pin_memory=device.type == "cuda", targets=targets)
    val_loader = shard_loader(val_groups, config.batch_size, shuffle=False, workers=config.loader_workers)
    images = sum(g.rows for g in train_groups)
    for epoch in range(state["epoch"], epochs):
        if schedule.freeze_epochs:
            set_trunk_trainable(model, epoch >= schedule.freeze_epochs)
        with progress_bar(f"{name} epoch {epoch + 1}/{epochs}", images) as advance:
            batches = itertools.count(1)

            def on_batch(n: int, loss: float) -> None:
                advance(n, status=f"loss {loss:.4f}")
                maybe_fail(f"train-{name}-epoch{epoch + 1}-batch{next(batches)}")

            stats = train_epoch(model, train_loader, loss_fn, optimizer, scheduler, config, device, on_batch=on_batch)
        aucs = validation_aucs(model, val_loader, config, device) if val_groups else {f: math.nan for f in FINDINGS}
        row = {"epoch": epoch + 1, "loss": stats.loss, **{f"loss_{k}": v for k, v in stats.parts.items()},
               "images_per_second": stats.images_per_second, "seconds": stats.seconds, "mean_auc": mean_auc(aucs), "auc": aucs}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        logger.info("%s epoch %d: loss %.4f, %.1f images/s, validation mean AUC %.3f",
                    name, epoch + 1, stats.loss, stats.images_per_second, row["mean_auc"])
        saved = {"config": config.to_dict(), **(record or {}), "metrics": row}
        score = row["mean_auc"] if not math.isnan(row["mean_auc"]) else -stats.loss
        if not keep_best or score > state["best"]:
            state["best"] = score
            save_checkpoint(pending, model, saved)
        save_checkpoint(last, model, {**saved, "state": state}, optimizer, scheduler)
        run.record_metrics(name, state["history"])
    if pending.exists():
        pending.replace(run.checkpoint(name))
    return {"step": name, "epochs": state["epoch"], "history": state["history"]}
