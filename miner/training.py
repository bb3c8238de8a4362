"""The loops of one epoch, losses, devices and precision (no files, no orchestration); the
configuration and presets are miner.settings's (re-exported here).

Batches are dicts of tensors from a loader: ``images`` uint8 (B, S, S) shard pixels and
``labels`` (B, C) in {0, 1}. Images move to the device as uint8 and are resized there to
``input_size`` (bilinear, antialiased), so the host never handles float pixels.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from cxr_miner.miner.attention import (
    attention_mining_loss,
    classification_loss,
    weighted_classification_loss,
)
from cxr_miner.miner.mil import PatchModel, mil_loss
from cxr_miner.miner.models import CamClassifier, create_model, normalize_input
from cxr_miner.miner.settings import OPTIMIZERS as OPTIMIZERS
from cxr_miner.miner.settings import PRECISIONS as PRECISIONS
from cxr_miner.miner.settings import PRESETS as PRESETS
from cxr_miner.miner.settings import ModelConfig as ModelConfig
from cxr_miner.miner.settings import TrainConfig as TrainConfig
from cxr_miner.miner.settings import checked_settings as checked_settings
from cxr_miner.miner.settings import preset as preset
from cxr_miner.storage.vocab.errors import SettingError

Network = CamClassifier | PatchModel  # images (N, 1, S, S) normalised -> logits (N, C)
NetworkT = TypeVar("NetworkT", CamClassifier, PatchModel)


def pick_device(setting: str) -> torch.device:
    """``auto``: CUDA when present, else CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingError(f"device {setting!r} asked for, but CUDA is not available")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX. Elsewhere
    torch emulates it: a ResNet-18 training step in bf16 autocast took 11x fp32's on a 2-core AVX2
    EPYC (BENCHMARKS.md, "The host changed")."""
    return device.type == "cuda" or (device.type == "cpu" and _cpu_has_native_bf16())


@functools.cache
def _cpu_has_native_bf16() -> bool:
    # asked once per process: autocast() asks on every batch
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether ``precision`` (a TrainConfig.precision) computes in bf16 autocast on ``device``."""
    if precision == "bf16-native":
        return native_bf16(device)
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str):
    """bf16 autocast where uses_bf16, else nothing (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if uses_bf16(device, precision) else nullcontext()


def prepare_images(images: torch.Tensor, input_size: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, S, S) -> normalised float (B, 1, input_size, input_size) on ``device``."""
    x = normalize_input(images.to(device, non_blocking=True))
    if x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False, antialias=True)
    return x.contiguous(memory_format=torch.channels_last)


def to_device(model: NetworkT, device: torch.device) -> NetworkT:
    """``model`` on ``device``, channels-last (as prepare_images gives its images): on a GPU for its
    tensor cores; on a CPU oneDNN's convolutions are faster so too (cpu-small's training 14.1 against
    15.9 images/s on a 2-core AVX2 EPYC, BENCHMARKS.md "The suite cut back on the AVX2 host")."""
    return model.to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's overloads omit it


def make_optimizer(
    model: torch.nn.Module,
    config: TrainConfig,
    lr: float,
    epochs: int,
    steps_per_epoch: int,
    kind: str | None = None,
    decay_epochs: int = 0,
    warmup_steps: int = 0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """(optimizer, scheduler): ``kind`` (default config.optimizer: SGD, AdamW, or Adam with L2 in
    the loss) over trainable parameters; cosine decay per step, or with ``decay_epochs`` x0.1
    every that many epochs (Li et al. 2018, section 4). ``warmup_steps``: the cosine schedule's
    rate rises linearly from 0.001 of it over that many first steps (torchvision's detection
    reference: a detector trained from scratch diverges without)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kind = kind or config.optimizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    elif kind == "adam":
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    if decay_epochs:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=decay_epochs * steps_per_epoch, gamma=0.1)
    elif warmup_steps:
        total = max(1, epochs * steps_per_epoch)

        def factor(step: int) -> float:
            warm = 0.001 + (1 - 0.001) * min(1.0, step / warmup_steps)
            return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * steps_per_epoch))
    return optimizer, scheduler


def set_trunk_trainable(model: Network, trainable: bool) -> None:
    for p in model.trunk.parameters():
        p.requires_grad_(trainable)


def init_branch_bias(model: CamClassifier, prevalence: torch.Tensor) -> None:
    """Start each branch at its finding's log prior odds, so early epochs do not spend
    themselves learning the (large) class imbalance."""
    p = prevalence.clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        model.branches.bias.copy_(torch.log(p / (1 - p)))


NETWORKS = ("classifier", "patch")  # the CAM classifier (steps of cam/am) and the MIL patch model


def create_patch_model(config: TrainConfig, trunk_weights: dict[str, torch.Tensor] | None = None) -> PatchModel:
    """The run's MIL patch model: the classifier's trunk, mil_* settings."""
    return PatchModel(
        config.model.trunk,
        config.model.num_classes,
        config.mil_grid,
        config.model.stages,
        config.mil_head_channels,
        trunk_weights,
    )


def create_network(
    config: TrainConfig, network: str = "classifier", trunk_weights: dict[str, torch.Tensor] | None = None
) -> Network:
    """The run's ``classifier`` (config.model) or its MIL ``patch`` model (same trunk, mil_* settings)."""
    if network == "patch":
        return create_patch_model(config, trunk_weights)
    if network != "classifier":
        raise ValueError(f"unknown network {network!r}; known: {NETWORKS}")
    return create_model(config.model, trunk_weights)


# loss_fn(model, images, labels, **targets) -> (loss, parts); targets: what the loader adds (MIL's patch labels)
LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def plain_loss(
    model: CamClassifier, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 2-3 with M all ones: BCE of the unerased logits."""
    loss = classification_loss(model(images), labels)
    return loss, {"cls": float(loss.detach())}


def weighted_plain_loss(
    model: CamClassifier, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Step 1 with W-CEL (Wang et al. 2017, Eq. 1) in place of Eq. 3's BCE."""
    loss = weighted_classification_loss(model(images), labels)
    return loss, {"cls": float(loss.detach())}


def step1_loss(config: TrainConfig) -> LossFn:
    return STEP1_LOSSES[config.step1_loss]


def am_classification_loss(config: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """L_cls of an AM step (logits, labels -> loss): the loss step 1 learnt by, unless ``am_cls_loss`` is bce."""
    kind = config.step1_loss if config.am_cls_loss == "step1" else "bce"
    return {"bce": classification_loss, "w-cel": weighted_classification_loss}[kind]


STEP1_LOSSES: dict[str, LossFn] = {"bce": plain_loss, "w-cel": weighted_plain_loss}


def am_step_loss(config: TrainConfig, chain: Sequence[CamClassifier]) -> LossFn:
    """An AM step's loss (miner.attention.attention_mining_loss: L_cls on the erased images, Eq.
    1-3, plus lambda L_KP, Eq. 4-6) for the model after ``chain`` (steps 1..t-1, frozen); KP's
    reference network N_A is step 1's or step t-1's (``kp_reference``)."""
    cls_loss = am_classification_loss(config)
    reference = chain[0] if config.kp_reference == "step1" else chain[-1]

    def loss_fn(
        model: CamClassifier, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss = attention_mining_loss(
            model,
            chain,
            images,
            labels,
            config.kp,
            config.kp_lambda,
            config.erased_fraction,
            cls_loss,
            reference,
            config.kp_norm,
        )
        return loss.total, {"cls": float(loss.cls), "kp": float(loss.kp)}

    return loss_fn


def patch_loss(config: TrainConfig) -> LossFn:
    """Eq. 4 on the patch model's logits, with the batch's patch labels (miner.mil.patch_targets)."""

    def loss_fn(
        model: PatchModel, images: torch.Tensor, labels: torch.Tensor, positive: torch.Tensor, boxed: torch.Tensor
    ):
        loss = mil_loss(
            model.patches(images).float(),
            labels,
            positive,
            boxed,
            config.mil_lambda_bbox,
            rescaled=config.mil_products == "rescaled",
        )
        return loss, {"mil": float(loss.detach()), "boxed_pairs": float(boxed.sum()) / max(len(labels), 1)}

    return loss_fn


class EpochStats(NamedTuple):
    loss: float
    images: int
    seconds: float
    parts: dict[str, float]

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else math.nan


def train_epoch(
    model: Network,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    config: TrainConfig,
    device: torch.device,
    on_batch: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``; ``on_batch(images, loss)`` after each step (progress)."""
    model.train()
    total = count = 0.0
    sums: dict[str, float] = {}
    start = time.perf_counter()
    for batch in batches:
        images = prepare_images(batch["images"], config.input_size, device)
        labels = batch["labels"].to(device, non_blocking=True).float()
        targets = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("images", "labels")}
        with autocast(device, config.precision):
            loss, parts = loss_fn(model, images, labels, **targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss became {float(loss)}; lower the learning rate (now {scheduler.get_last_lr()})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        value, n = float(loss.detach()), len(labels)
        total += value * n
        count += n
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + v * n
        if on_batch is not None:
            on_batch(n, value)
    seconds = time.perf_counter() - start
    return EpochStats(total / max(count, 1), int(count), seconds, {k: v / max(count, 1) for k, v in sums.items()})


@torch.no_grad()
def predict(
    model: Network, batches: Iterable[dict[str, torch.Tensor]], config: TrainConfig, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores (N, C) float32 and labels (N, C) bool on the CPU, in batch order."""
    model.eval()
    scores, labels = [], []
    for batch in batches:
        with autocast(device, config.precision):
            logits = model(prepare_images(batch["images"], config.input_size, device))
        scores.append(torch.sigmoid(logits.float()).cpu())
        labels.append(batch["labels"].bool())
    if not scores:
        classes = config.model.num_classes  # a PatchModel has no config of its own
        return torch.zeros(0, classes), torch.zeros(0, classes, dtype=torch.bool)
    return torch.cat(scores), torch.cat(labels)
