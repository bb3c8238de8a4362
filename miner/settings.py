"""A training run's settings and the presets: plain dataclasses, no torch.

Everything a run depends on is a field here, written into every checkpoint. The command line
reads and checks these (a preset's name, a settings file) before it imports torch or starts
anything, so a bad value is refused at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from cxr_miner.storage.vocab.errors import SettingError

KP_MODES = ("none", "vanilla", "kp")
ERASED_FRACTION = 0.125  # n / N of section 2.2
KP_LAMBDA = 0.5  # lambda of Eq. 6
MODEL_NAMES = ("baseline", "msa", "msa-deconv")  # miner.models.MODELS builds them
TRUNK_NAMES = ("resnet10", "resnet18", "resnet34", "resnet50")  # miner.models.TRUNKS builds them


@dataclass(frozen=True)
class ModelConfig:
    name: str = "msa"  # baseline | msa | msa-deconv
    trunk: str = "resnet50"  # resnet10 | resnet18 | resnet34 | resnet50 (the paper's)
    num_classes: int = 14
    msa_channels: tuple[int, int] = (512, 256)  # 1x1 reductions of the last and penultimate bottleneck
    # ResNet stages kept: 4 (the paper's); 3 drops the last stage, so that X comes at half the
    # stride (MSA: 8 instead of 16) for a quarter less work: small findings at small inputs (issue 11).
    stages: int = 4

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise SettingError(f"unknown model {self.name!r}; known: {list(MODEL_NAMES)}")
        if self.trunk not in TRUNK_NAMES:
            raise SettingError(f"unknown trunk {self.trunk!r}; known: {sorted(TRUNK_NAMES)}")
        if self.stages not in (3, 4):
            raise SettingError(f"model stages must be 3 or 4 (ResNet stages kept), got {self.stages}")

    def to_dict(self) -> dict:
        return asdict(self)


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
