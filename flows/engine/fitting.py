"""The epoch loop of every training step: resume, train, validate, checkpoint, keep the best.

Files: the run folder's ``<step>-last.safetensors`` (resumable state after each epoch),
``<step>.pending`` (the best or last model so far) renamed to ``<step>.safetensors`` when the
step ends, and ``metrics.json``. A stopped step resumes after its last finished epoch.
"""

from __future__ import annotations

import itertools
import logging
import math
from typing import Any

import torch

from cxr_miner.flows.engine.checkpoints import resume_into, save_checkpoint
from cxr_miner.flows.engine.loader import shard_loader
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.progress import progress_bar
from cxr_miner.miner.metrics import AUCAccumulator
from cxr_miner.miner.models import CamClassifier
from cxr_miner.miner.training import TrainConfig, make_optimizer, predict, set_trunk_trainable, train_epoch
from cxr_miner.storage.stages.batches import RowGroup
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import FINDINGS


def mean_auc(aucs: dict[str, float]) -> float:
    """Mean over the findings whose AUC is defined (NaN when none is)."""
    finite = [v for v in aucs.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def validation_aucs(model: CamClassifier, loader, config: TrainConfig, device: torch.device) -> dict[str, float]:
    aucs = AUCAccumulator()
    aucs.accumulate(*(t.numpy() for t in predict(model, loader, config, device)))
    return aucs.compute()


def step_done(run: RunFolder, step: int, epochs: int) -> bool:
    """A step is finished when its model exists and its last state says all epochs ran."""
    if not run.step(step).exists() or not run.step(step, last=True).exists():
        return False
    return read_checkpoint_record(run.step(step, last=True))["state"]["epoch"] >= epochs


def fit(
    run: RunFolder, step: int, model: CamClassifier, loss_fn, train_groups: list[RowGroup], val_groups: list[RowGroup],
    config: TrainConfig, device: torch.device, epochs: int, lr: float, keep_best: bool, logger: logging.LoggerAdapter | logging.Logger,
) -> dict[str, Any]:
    """Train ``model`` as step ``step`` for ``epochs`` (see module doc); returns the step's history.

    ``loss_fn(model, images, labels) -> (loss, parts)``; with ``keep_best`` the model of the
    best validation mean AUC (else the last) becomes the step's checkpoint.
    """
    last = run.step(step, last=True)
    pending = run.step(step).with_suffix(".pending")
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
            batches = itertools.count(1)

            def on_batch(n: int, loss: float) -> None:
                advance(n, status=f"loss {loss:.4f}")
                maybe_fail(f"train-step{step}-epoch{epoch + 1}-batch{next(batches)}")

            stats = train_epoch(model, train_loader, loss_fn, optimizer, scheduler, config, device, on_batch=on_batch)
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
        run.record_metrics(step, state["history"])
    if pending.exists():
        pending.replace(run.step(step))
    return {"step": step, "epochs": state["epoch"], "history": state["history"]}
