"""Classifiers that expose their feature maps: the CAM baseline and ResNet-MSA (Cai et al. 2018).

Every model maps grayscale images ``(N, 1, S, S)`` (float, normalised by :func:`normalize_input`)
to a :class:`Features` record: the trunk's 3rd and 4th bottleneck outputs, the feature map
``X (N, D, h, w)`` on which CAMs and attention mining work, and the logits ``(N, C)``.
The classifier on ``X`` is global average pooling followed by C per-class binary branches
``w_c (D,)`` (Eq. 2), held together as one ``(C, D)`` weight so that all branches run at once.

Registry (timm style): ``create_model(ModelConfig(name=...))`` with ``name`` one of
``MODELS``; an unknown name raises ValueError listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv

from cxr_miner.miner.cam import class_activation_maps, erased_logits
from cxr_miner.miner.registration import RegisteredUpsample
from cxr_miner.miner.settings import MODEL_NAMES, TRUNK_NAMES
from cxr_miner.miner.settings import ModelConfig as ModelConfig
from cxr_miner.storage.vocab.errors import SettingError


def resnet10(weights: None = None) -> tv.ResNet:
    """ResNet-18 with one basic block per stage instead of two: half the receptive field of each
    stage (layer3: 99 px against 211), for small inputs on CPUs; there are no ImageNet weights."""
    return tv.ResNet(tv.resnet.BasicBlock, [1, 1, 1, 1])


TRUNKS: dict[str, tuple[Callable[..., tv.ResNet], tv.WeightsEnum | None]] = {
    "resnet10": (resnet10, None),
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv.resnet50, tv.ResNet50_Weights.IMAGENET1K_V2),
}
if tuple(TRUNKS) != TRUNK_NAMES:
    raise ImportError(f"miner.settings.TRUNK_NAMES {TRUNK_NAMES} must list the trunks built here, {tuple(TRUNKS)}")
# ImageNet statistics averaged over RGB: the input of the grayscale stem (see adapt_stem).
GRAY_MEAN, GRAY_STD = 0.449, 0.226


class Features(NamedTuple):
    """One forward pass. Shapes for input (N, 1, S, S) and a ResNet trunk of 4 stages (stride 32):

    layer3 (N, D3, S/16, S/16), layer4 (N, D4, S/32, S/32), features X (N, D, h, w) where
    h = S/32 (baseline) or S/16 (MSA), logits (N, C) from unerased X. With 3 stages the trunk's
    last two stages are ResNet's layer2 and layer3, and every stride is halved.
    """

    layer3: torch.Tensor
    layer4: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


def normalize_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, S, S) or (N, 1, S, S) -> float (N, 1, S, S): [0, 255] to ImageNet-gray standard scores."""
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, S, S) or (N, 1, S, S), got {tuple(images.shape)}")
    return (images.float() / 255.0 - GRAY_MEAN) / GRAY_STD


def adapt_stem(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1-channel copy of an RGB stem convolution whose weights are summed over RGB.

    For an image replicated into three channels this gives the RGB stem's response, so
    ImageNet weights carry over to grayscale input without tripling the first layer's work.
    """
    # torch annotates a Conv2d's kernel_size, stride and padding as tuple[int, ...], takes tuple[int, int]
    geometry = conv.kernel_size, conv.stride, conv.padding
    gray = nn.Conv2d(1, conv.out_channels, *geometry, bias=conv.bias is not None)  # type: ignore[arg-type]
    with torch.no_grad():
        gray.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
        if conv.bias is not None and gray.bias is not None:
            gray.bias.copy_(conv.bias)
    return gray


class Trunk(nn.Module):
    """A torchvision ResNet without its pooling and fc, grayscale stem; returns the outputs of its
    last two stages: (layer3, layer4), or (layer2, layer3) with ``stages`` = 3."""

    def __init__(self, name: str, state_dict: dict[str, torch.Tensor] | None = None, stages: int = 4) -> None:
        super().__init__()
        if name not in TRUNKS:
            raise SettingError(f"unknown trunk {name!r}; known: {sorted(TRUNKS)}")
        resnet = TRUNKS[name][0](weights=None)
        if state_dict is not None:
            load_trunk_weights(resnet, state_dict, name)
        resnet.conv1 = adapt_stem(resnet.conv1)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.layer4 = resnet.layer4 if stages == 4 else None
        outputs = [
            [m for m in layer.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
            for layer in (resnet.layer2, resnet.layer3, resnet.layer4)
        ]
        self.channels = (outputs[stages - 3], outputs[stages - 2])  # (D3, D4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x2 = self.layer2(self.layer1(self.stem(x)))
        x3 = self.layer3(x2)
        return (x3, self.layer4(x3)) if self.layer4 is not None else (x2, x3)


def load_trunk_weights(resnet: tv.ResNet, state_dict: dict[str, torch.Tensor], name: str) -> None:
    """Load a torchvision ResNet state dict (RGB stem; ``fc.*`` ignored); ValueError on mismatch."""
    state = {
        k.removeprefix("module."): v for k, v in state_dict.items() if not k.removeprefix("module.").startswith("fc.")
    }
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise SettingError(f"weights do not fit a torchvision {name}: {str(error).splitlines()[1].strip()}") from error
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise SettingError(
            f"weights do not fit a torchvision {name}: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


class MultiScaleAggregation(nn.Module):
    """Section 2.3 (ResNet-MSA): [up2(conv1x1(X_k)), conv1x1(X_{k-1})] -> (N, 512 + 256, 2h, 2w).

    ``upsample`` is "bilinear" (the paper's choice) or "deconv" (a learned 3x3 transposed
    convolution with stride 2). Both keep cell j of the last stage on cell 2j of the one before,
    where the trunk's strided layers put it (miner.registration). The paper leaves the activation open; a ReLU after the
    concatenation keeps X non-negative, so that erasing (zeroing) a region removes its evidence.
    """

    def __init__(self, in_channels: tuple[int, int], out_channels: tuple[int, int], upsample: str) -> None:
        super().__init__()
        (d3, d4), (c_last, c_prev) = in_channels, out_channels
        self.reduce_last = nn.Conv2d(d4, c_last, kernel_size=1)
        self.reduce_prev = nn.Conv2d(d3, c_prev, kernel_size=1)
        if upsample == "bilinear":
            self.upsample: nn.Module = RegisteredUpsample(2)  # cell j of layer4 onto cell 2j of layer3
        elif upsample == "deconv":
            self.upsample = nn.ConvTranspose2d(c_last, c_last, kernel_size=3, stride=2, padding=1, output_padding=1)
        else:
            raise SettingError(f"unknown MSA upsampling {upsample!r}; known: bilinear, deconv")
        self.channels = c_last + c_prev

    def forward(self, layer3: torch.Tensor, layer4: torch.Tensor) -> torch.Tensor:
        last = self.upsample(self.reduce_last(layer4))
        return F.relu(torch.cat([last, self.reduce_prev(layer3)], dim=1))


class CamClassifier(nn.Module):
    """Trunk -> (optional MSA) -> X -> GAP -> per-class branches. See the module docstring.

    ``branches.weight`` is ``(C, D)``: row c is w_c of Eq. 2. The bias b_c is a per-class
    constant that Eq. 2 leaves out; it shifts logits only, so CAMs after the [0, 1]
    normalisation of section 3.2 and the erasure of Eq. 1-3 are the same with or without it.
    """

    def __init__(self, config: ModelConfig, trunk_weights: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.config = config
        self.trunk = Trunk(config.trunk, trunk_weights, config.stages)
        self.msa = (
            None
            if config.name == "baseline"
            else MultiScaleAggregation(
                self.trunk.channels, config.msa_channels, "bilinear" if config.name == "msa" else "deconv"
            )
        )
        channels = self.trunk.channels[1] if self.msa is None else self.msa.channels
        self.branches = nn.Linear(channels, config.num_classes)

    @property
    def stride(self) -> int:
        """Input pixels per feature-map pixel."""
        return (32 if self.msa is None else 16) // (2 ** (4 - self.config.stages))

    @property
    def kp_layers(self) -> tuple[str, ...]:
        """Features fields that KP (Eq. 5) compares: 3rd and 4th bottleneck, MSA (when there is
        one: the baseline's X is its 4th bottleneck) and the classification layer."""
        return ("layer3", "layer4", "logits") if self.msa is None else ("layer3", "layer4", "features", "logits")

    def forward_features(self, images: torch.Tensor) -> Features:
        """images (N, 1, S, S) normalised -> Features (see there)."""
        layer3, layer4 = self.trunk(images)
        x = layer4 if self.msa is None else self.msa(layer3, layer4)
        logits = self.branches(x.mean(dim=(2, 3)))
        return Features(layer3, layer4, x, logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 1, S, S) normalised -> logits (N, C)."""
        return self.forward_features(images).logits

    def cams(self, features: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 7: (N, D, h, w), masks (N, C, h, w) or None -> CAMs (N, C, h, w)."""
        return class_activation_maps(features, self.branches.weight, masks)

    def erased_logits(self, features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Eq. 1-2: logits (N, C) of each class's branch on its own erased map X * M_c."""
        return erased_logits(features, self.branches.weight, self.branches.bias, masks)


MODELS = MODEL_NAMES


def create_model(config: ModelConfig, trunk_weights: dict[str, torch.Tensor] | None = None) -> CamClassifier:
    """Build a registered model; ``trunk_weights`` a torchvision ResNet state dict or None (random)."""
    if config.name not in MODELS:
        raise SettingError(f"unknown model {config.name!r}; known: {list(MODELS)}")
    return CamClassifier(config, trunk_weights)


def imagenet_weights(trunk: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for ``trunk`` (downloads to the torch hub cache).

    Without network, pass a local weights file instead (TrainConfig.weights: a file path).
    """
    if trunk not in TRUNKS:
        raise SettingError(f"unknown trunk {trunk!r}; known: {sorted(TRUNKS)}")
    weights = TRUNKS[trunk][1]
    if weights is None:
        raise SettingError(f"trunk {trunk!r} has no ImageNet weights; use weights random or a local file")
    try:
        return weights.get_state_dict(progress=False)
    except OSError as error:  # URLError is an OSError
        raise SettingError(
            f"cannot download {weights} ({error}); download it elsewhere and pass the file as --weights PATH"
        ) from error
