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
from cxr_miner.miner.metrics import AUCAccumulator, mean_auc
from cxr_miner.miner.training import (
    EpochStats,
    LossFn,
    Network,
    TrainConfig,
    make_optimizer,
    predict,
    set_trunk_trainable,
    train_epoch,
    uses_bf16,
)
from cxr_miner.storage.stages.batches import RowGroup
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import FINDINGS


def validation_aucs(model: Network, loader, config: TrainConfig, device: torch.device) -> dict[str, float]:
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
    run: RunFolder,
    name: str,
    model: Network,
    loss_fn: LossFn,
    train_groups: list[RowGroup],
    val_groups: list[RowGroup],
    config: TrainConfig,
    device: torch.device,
    schedule: Schedule,
    keep_best: bool,
    logger: logging.LoggerAdapter | logging.Logger,
    record: dict[str, Any] | None = None,
    targets: Targets | None = None,
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
    optimizer, scheduler = make_optimizer(
        model,
        config,
        schedule.lr,
        epochs,
        steps_per_epoch,
        schedule.optimizer,
        schedule.decay_epochs,
        schedule.warmup_steps,
    )
    state: dict[str, Any] = {"epoch": 0, "history": [], "best": -math.inf}
    if last.exists():
        state = resume_into(last, model, optimizer, scheduler)["state"]
        logger.info("%s: resuming after epoch %d from %s", name, state["epoch"], last)
    train_loader = training_loader(train_groups, config, schedule.seed, state["epoch"], device, targets)
    val_loader = shard_loader(val_groups, config.batch_size, shuffle=False, workers=config.loader_workers)
    compute = f"{'bf16' if uses_bf16(device, config.precision) else 'fp32'} on {device}"
    epoch_of = EpochRunner(name, model, train_loader, loss_fn, optimizer, scheduler, config, device, epochs)
    for epoch in range(state["epoch"], epochs):
        if schedule.freeze_epochs:
            set_trunk_trainable(model, epoch >= schedule.freeze_epochs)
        stats = epoch_of(epoch, sum(g.rows for g in train_groups))
        aucs = validation_aucs(model, val_loader, config, device) if val_groups else {f: math.nan for f in FINDINGS}
        row = epoch_row(epoch, stats, aucs)
        state["history"].append(row)
        state["epoch"] = epoch + 1
        logger.info(
            "%s epoch %d: loss %.4f, %.1f images/s (%s), validation mean AUC %.3f",
            *(name, epoch + 1, stats.loss, stats.images_per_second, compute, row["mean_auc"]),
        )
        saved = {"config": config.to_dict(), "compute": compute, **(record or {}), "metrics": row}
        score = row["mean_auc"] if not math.isnan(row["mean_auc"]) else -stats.loss
        if not keep_best or score > state["best"]:
            state["best"] = score
            save_checkpoint(pending, model, saved)
        save_checkpoint(last, model, {**saved, "state": state}, optimizer, scheduler)
        run.record_metrics(name, state["history"])
    if pending.exists():
        pending.replace(run.checkpoint(name))
    return {"step": name, "epochs": state["epoch"], "history": state["history"]}


def training_loader(
    groups: list[RowGroup],
    config: TrainConfig,
    seed: int,
    start_epoch: int,
    device: torch.device,
    targets: Targets | None,
) -> Any:
    """The shuffled loader of the training row groups, in the order of an unbroken run from ``start_epoch`` on."""
    return shard_loader(
        groups,
        config.batch_size,
        shuffle=True,
        workers=config.loader_workers,
        seed=seed,
        start_epoch=start_epoch,
        pin_memory=device.type == "cuda",
        targets=targets,
    )


@dataclass
class EpochRunner:
    """One training epoch of checkpoint ``name``'s model, with a progress bar and the fault points
    ``train-<name>-epoch<e>-batch<b>`` (flows.faults)."""

    name: str
    model: Network
    loader: Any
    loss_fn: LossFn
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    device: torch.device
    epochs: int

    def __call__(self, epoch: int, images: int) -> EpochStats:
        with progress_bar(f"{self.name} epoch {epoch + 1}/{self.epochs}", images) as advance:
            batches = itertools.count(1)

            def on_batch(n: int, loss: float) -> None:
                advance(n, status=f"loss {loss:.4f}")
                maybe_fail(f"train-{self.name}-epoch{epoch + 1}-batch{next(batches)}")

            return train_epoch(
                self.model,
                self.loader,
                self.loss_fn,
                self.optimizer,
                self.scheduler,
                self.config,
                self.device,
                on_batch,
            )


def epoch_row(epoch: int, stats: EpochStats, aucs: dict[str, float]) -> dict[str, Any]:
    """metrics.json's row of epoch ``epoch`` (0-based): the loss and its parts, the speed, the
    validation AUCs and their mean over the findings where defined."""
    return {
        "epoch": epoch + 1,
        "loss": stats.loss,
        **{f"loss_{k}": v for k, v in stats.parts.items()},
        "images_per_second": stats.images_per_second,
        "seconds": stats.seconds,
        "mean_auc": mean_auc(aucs),
        "auc": aucs,
    }
