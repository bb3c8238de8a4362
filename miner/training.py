"""Training configuration, presets and the loops of one epoch (no files, no orchestration).

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
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from cxr_miner.miner.attention import (
    ERASED_FRACTION,
    KP_LAMBDA,
    KP_MODES,
    attention_mining_loss,
    classification_loss,
    weighted_classification_loss,
)
from cxr_miner.miner.mil import PatchModel, mil_loss
from cxr_miner.miner.models import CamClassifier, ModelConfig, create_model, normalize_input
from cxr_miner.storage.vocab.errors import SettingError

Network = CamClassifier | PatchModel  # images (N, 1, S, S) normalised -> logits (N, C)
NetworkT = TypeVar("NetworkT", CamClassifier, PatchModel)

OPTIMIZERS = ("sgd", "adamw", "adam")
PRECISIONS = ("auto", "bf16-native", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written into every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    weights: str = "random"  # random | imagenet | path to a .safetensors or .pth torchvision ResNet
    input_size: int = 512  # side of the network input; shard images are resized to it
    batch_size: int = 64  # section 3.1: 64 at 512 px, 32 at 1024 px
    epochs: int = 50  # section 3.1: 50 epochs
    optimizer: str = "sgd"  # sgd | adamw | adam (L2 in the loss: Adam's weight_decay)
    lr: float = 0.1  # section 3.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    freeze_trunk_epochs: int = 0  # section 3.1 tunes the MSA layers alone for 10 epochs first
    am_steps: int = 3  # T of section 3.2; step 1 is the trained classifier (the CAM baseline)
    am_epochs: int = 2  # fine-tuning epochs in each AM step t >= 2
    am_lr: float = 0.01
    am_warmup_steps: int = 0  # an AM step's rate rises linearly over its first steps (its optimiser starts afresh)
    kp: str = "kp"  # none | vanilla | kp (section 2.2)
    kp_lambda: float = KP_LAMBDA
    erased_fraction: float = ERASED_FRACTION
    am_include_boxed: bool = True  # section 3: the boxed images join AM training, labels only
    step1_loss: str = "bce"  # bce (Eq. 3) | w-cel (Wang et al. 2017's weighted cross entropy, for rare findings)
    kp_reference: str = "step1"  # N_A of Eq. 4: previous (step t-1's model) | step1 (the network before any AM update)
    # N_A's BatchNorm in Eq. 4: batch (the batch's statistics, as N_B's in training: the two start identical,
    # as section 2.2 has them) | running (its running statistics: L_KP starts at the gap between the two modes)
    kp_norm: str = "batch"
    am_cls_loss: str = "step1"  # L_cls of the AM steps' Eq. 6: step1 (the loss step 1 learnt by) | bce (Eq. 3 always)
    # the AM steps' optimiser: step1 (``optimizer``) | sgd | adamw | adam. SGD after cpu-demo's AdamW step 1
    # forgot more, not less (BENCHMARKS.md, issue 23, third pass)
    am_optimizer: str = "step1"
    # The MIL patch model (Li et al. 2018, method ``mil``): its trunk is model.trunk/stages/weights.
    mil_grid: int = 16  # P of section 3.1 (the paper picks it from {12, 16, 20})
    mil_head_channels: int = 512  # c* of section 3.1
    mil_lambda_bbox: float = 5.0  # Eq. 4
    mil_products: str = "log"  # log (Eq. 1-2 in log space) | rescaled (section 3.4: p to [0.98, 1])
    mil_epochs: int = 25  # section 4: 500k iterations of batch 5 over ~90k images
    mil_optimizer: str = "adam"  # section 4: Adam with L2 regularisation in the loss
    mil_lr: float = 1e-3  # section 4
    mil_lr_decay_epochs: int = 10  # section 4: x0.1 every 10 epochs; 0: cosine decay as the other steps
    box_fraction: float = 1.0  # of the boxed images MIL may learn from, by patient (section 4.2's 0% to 80%)
    box_folds: int = 0  # >= 2: K-fold cross-validation over the boxed images (section 4.2); 0: box-val/box-test
    loader_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto: bf16 on CUDA, fp32 on CPU | bf16-native: bf16 where the device computes it natively (native_bf16),
    # fp32 elsewhere | bf16 | fp32
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kp not in KP_MODES:
            raise SettingError(f"kp must be one of {KP_MODES}, got {self.kp!r}")
        if self.step1_loss not in ("bce", "w-cel"):
            raise SettingError(f"step1_loss must be bce or w-cel, got {self.step1_loss!r}")
        if self.kp_reference not in ("previous", "step1"):
            raise SettingError(f"kp_reference must be previous or step1, got {self.kp_reference!r}")
        if self.kp_norm not in ("batch", "running"):
            raise SettingError(f"kp_norm must be batch or running, got {self.kp_norm!r}")
        if self.am_cls_loss not in ("step1", "bce"):
            raise SettingError(f"am_cls_loss must be step1 or bce, got {self.am_cls_loss!r}")
        if self.am_optimizer not in ("step1", *OPTIMIZERS):
            raise SettingError(f"am_optimizer must be step1 or one of {OPTIMIZERS}, got {self.am_optimizer!r}")
        for name in ("optimizer", "mil_optimizer"):
            if getattr(self, name) not in OPTIMIZERS:
                raise SettingError(f"{name} must be one of {OPTIMIZERS}, got {getattr(self, name)!r}")
        if self.mil_products not in ("log", "rescaled"):
            raise SettingError(f"mil_products must be log or rescaled, got {self.mil_products!r}")
        if not 0 <= self.box_fraction <= 1 or self.box_folds == 1 or self.box_folds < 0:
            raise SettingError(
                f"need box_fraction in [0, 1] and box_folds 0 or >= 2: {self.box_fraction}, {self.box_folds}"
            )
        if self.mil_grid < 1 or self.mil_epochs < 1:
            raise SettingError(f"need mil_grid and mil_epochs >= 1: {self.mil_grid}, {self.mil_epochs}")
        if self.precision not in PRECISIONS:
            raise SettingError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.am_steps < 1 or self.epochs < 1 or self.batch_size < 1 or self.input_size < 32:
            raise SettingError(f"need am_steps, epochs, batch_size >= 1 and input_size >= 32: {self}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Settings from JSON-shaped data; an unknown name or a value of the wrong type raises ValueError."""
        data = dict(checked_settings(data, cls(), "training settings"))
        model = checked_settings(data.pop("model", {}), ModelConfig(), "model settings")
        return cls(model=ModelConfig(**model), **data)

    def updated(self, overrides: dict[str, Any]) -> TrainConfig:
        """A copy with ``overrides`` (same shape as to_dict, ``model`` may be partial)."""
        merged = self.to_dict()
        merged["model"] = {
            **merged["model"],
            **checked_settings(overrides.get("model", {}), self.model, "model settings"),
        }
        merged.update({k: v for k, v in overrides.items() if k != "model"})
        return TrainConfig.from_dict(merged)


def checked_settings(data: Any, defaults: Any, what: str) -> dict[str, Any]:
    """``data`` checked against the fields of the dataclass instance ``defaults``: known names only,
    each value of its default's type (an int is a float too; a list of ints is a tuple of ints)."""
    if not isinstance(data, dict):
        raise SettingError(f"{what} must be a JSON object of name: value, got {type(data).__name__} {data!r}")
    known = list(defaults.__dataclass_fields__)
    if unknown := sorted(set(data) - set(known)):
        raise SettingError(f"unknown {what} {unknown}; known: {sorted(known)}")
    checked = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            checked[name] = value  # nested settings: checked by their own class
            continue
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if not _same_kind(value, default):
            raise SettingError(f"{what}: {name} must be {_kind(default)}, got {type(value).__name__} {value!r}")
        checked[name] = value
    return checked


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, tuple):
        return (
            isinstance(value, tuple)
            and len(value) == len(default)
            and all(_same_kind(v, d) for v, d in zip(value, default))
        )
    return isinstance(value, type(default))


def _kind(default: Any) -> str:
    if isinstance(default, tuple):
        return f"a list of {len(default)} {_kind(default[0])}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), type(default).__name__
    )


PRESETS = {
    # Cai et al. 2018 section 3.1: ResNet-50 from ImageNet, 512 px, batch 64, lr 0.1, 50 epochs; for
    # MIL, Li et al. 2018 section 4: 512 px, P = 16, lambda_bbox = 5, Adam from lr 0.001 x0.1 every
    # 10 epochs (the mil_* defaults). Their batch of 5 was a memory limit of 2017 GPUs: batch 64 here.
    "paper": TrainConfig(model=ModelConfig(name="msa", trunk="resnet50"), weights="imagenet", loader_workers=8),
    # Minutes on 2 CPU cores on demo data: a small trunk from scratch at 128 px.
    "cpu-small": TrainConfig(
        model=ModelConfig(name="msa", trunk="resnet18"),
        input_size=128,
        batch_size=32,
        epochs=12,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        am_epochs=2,
        am_lr=5e-4,
        loader_workers=1,
        mil_grid=8,
        mil_head_channels=128,
        mil_epochs=12,
        mil_optimizer="adamw",
        mil_lr=2e-3,
        mil_lr_decay_epochs=0,
    ),
    # `make demo`: localises the phantoms' findings on 2 CPU cores in minutes (issue 11, BENCHMARKS.md
    # "Demo preset"): at 128 px a ResNet-18's receptive field spans the whole image and its CAMs
    # cannot point at a small finding; 256 px, a 3-stage ResNet-10 (X at stride 8, half the
    # receptive field) and bf16 autocast where the CPU computes bf16 natively (AVX512-BF16, AMX) keep it in
    # budget; on a CPU without (an AVX2 EPYC), emulated bf16 trains 11x slower than fp32, so fp32 there.
    "cpu-demo": TrainConfig(
        model=ModelConfig(name="msa", trunk="resnet10", stages=3),
        input_size=256,
        batch_size=32,
        epochs=10,
        optimizer="adamw",
        lr=2e-3,
        weight_decay=1e-4,
        am_epochs=1,
        am_lr=5e-4,
        loader_workers=1,
        precision="bf16-native",
        # each finding is on ~6% of images: BCE leaves Nodule unlearned in 12 epochs (AUC 0.56 vs 0.93)
        step1_loss="w-cel",
        mil_grid=16,
        mil_head_channels=128,
        mil_epochs=10,
        mil_optimizer="adamw",
        mil_lr=2e-3,
        mil_lr_decay_epochs=0,
    ),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise SettingError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


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
