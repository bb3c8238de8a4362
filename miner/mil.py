"""The MIL patch model of Li et al. 2018 ("Thoracic Disease Identification and Localization with
Limited Supervision"): patch grid, patch labels from boxes, image probabilities (Eq. 1, 2), the
loss (Eq. 4) and the patch region's boxes (section 3.3).

Shapes: images (N, 1, S, S); trunk features (N, D, h, w); the patch grid P x P divides the input
into equal patches, patch (r, c) covering input pixels [c S/P, (c + 1) S/P) x [r S/P, (r + 1) S/P);
patch logits z (N, K, P, P) for K findings, patch probabilities p = sigmoid(z).

The products of Eq. 1 and 2 run over P x P patches and underflow in float32 (0.5^256 is 1e-77).
The paper rescales p and 1 - p to [0.98, 1] (section 3.4, "Smoothing the image-level scores");
here that is ``rescaled=True``. The default computes the same products in log space from the
logits (log sigmoid, and log(1 - exp(x)) for Eq. 2), which neither underflows nor flattens the
gradient of a confidently wrong patch (tests/miner/test_mil.py shows both).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxr_miner.miner.boxes import label_components
from cxr_miner.miner.models import Trunk
from cxr_miner.miner.registration import upsample_registered
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox

RESCALE_LOW = 0.98  # section 3.4: p and 1 - p mapped from [0, 1] to [0.98, 1]
LAMBDA_BBOX = 5.0  # Eq. 4's weight of the boxed images (section 3.4, "by cross validation")
PATCH_THRESHOLD = 0.5  # T_s of section 3.3


def slice_patches(features: torch.Tensor, grid: int, input_size: int) -> torch.Tensor:
    """Section 3.1 "Patch slicing": (N, D, h, w) -> (N, D, P, P). Bilinear up when h < P, each
    patch sampling the map at its centre on the input (miner.registration); max pooling down when
    h > P, with stride 1, no padding and window f = h - P + 1 (the paper's choice)."""
    h, w = features.shape[-2:]
    if h == w == grid:
        return features
    if h < grid or w < grid:
        return upsample_registered(features, grid, input_size)
    return F.max_pool2d(features, kernel_size=(h - grid + 1, w - grid + 1), stride=1)


class PatchHead(nn.Module):
    """Section 3.1 "Fully convolutional recognition network": 3x3 conv to ``channels`` (512 in
    the paper), batch norm, ReLU, 1x1 conv to K: patch logits (N, K, P, P)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 512) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.classify = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(patches))


class PatchModel(nn.Module):
    """Section 3.1: a ResNet trunk without pooling and classifier (its last stage's features),
    patch slicing to ``grid`` x ``grid``, and the PatchHead. ``patches``: images (N, 1, S, S)
    normalised -> patch logits (N, K, P, P); ``forward``: the image logits (N, K) of Eq. 2,
    log p - log(1 - p), so that sigmoid gives Eq. 2's p(y_k | x_i). The paper's trunk is the
    pre-activation ResNet-50 v2; torchvision's ResNets stand in (``trunk``), with a grayscale stem
    as the other models have."""

    def __init__(
        self,
        trunk: str = "resnet50",
        num_classes: int = 14,
        grid: int = 16,
        stages: int = 4,
        head_channels: int = 512,
        trunk_weights: dict[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.trunk = Trunk(trunk, trunk_weights, stages)
        self.grid = grid
        self.head = PatchHead(self.trunk.channels[1], num_classes, head_channels)

    def patches(self, images: torch.Tensor) -> torch.Tensor:
        _, last = self.trunk(images)
        return self.head(slice_patches(last, self.grid, images.shape[-1]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return image_logits(self.patches(images))


def image_logits(patch_logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2 as a logit: patch logits (N, K, P, P) -> log p - log(1 - p), (N, K), float32."""
    log_yes, log_no = log_eq2(patch_logits.float())
    return log_yes - log_no


def init_patch_bias(model: PatchModel, prevalence: torch.Tensor) -> None:
    """Start every patch at the probability q that makes Eq. 2 give each finding's prevalence
    (1 - (1 - q)^(P^2) = prevalence), so that early epochs do not spend themselves on the imbalance."""
    p = prevalence.double().clamp(1e-4, 1 - 1e-4)
    q = -torch.expm1(torch.log1p(-p) / model.grid**2)
    bias = model.head.classify.bias
    assert bias is not None  # PatchHead's classifier is made with a bias
    with torch.no_grad():
        bias.copy_(torch.log(q / (1 - q)).float())


def box_patches(boxes: np.ndarray, grid: int, input_size: int) -> np.ndarray:
    """(P, P) bool: the patches that boxes (B, 4) xyxy on the input grid overlap (section 3.2:
    "if a patch is covered partially by the bounding box ... we still consider it a positive
    patch"); touching a patch's edge is no overlap. No box: all False."""
    mask = np.zeros((grid, grid), dtype=bool)
    side = input_size / grid
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        if x1 <= x0 or y1 <= y0:
            continue
        c0, r0 = math.floor(x0 / side), math.floor(y0 / side)
        c1, r1 = math.ceil(x1 / side), math.ceil(y1 / side)
        mask[max(r0, 0) : min(r1, grid), max(c0, 0) : min(c1, grid)] = True
    return mask


def patch_targets(
    boxes: Sequence[Mapping[str, Sequence[Sequence[float]]]],
    letterboxes: Sequence[Letterbox],
    input_size: int,
    grid: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 1's patch labels of a batch: ``boxes[i]`` maps a finding to image i's boxes (xyxy,
    source pixels; empty: no box), mapped through its letterbox onto the input grid. Returns
    positive (N, K, P, P) bool, the patches of finding k's boxes, and boxed (N, K) bool, eta_i for
    finding k (Eq. 3), over the K = len(FINDINGS) findings."""
    positive = np.zeros((len(boxes), len(FINDINGS), grid, grid), dtype=bool)
    for i, (by_finding, letterbox) in enumerate(zip(boxes, letterboxes, strict=True)):
        for finding, source in by_finding.items():
            if len(source):
                on_input = letterbox.boxes_to_input(np.asarray(source, dtype=np.float64), input_size)
                positive[i, FINDINGS.index(finding)] = box_patches(on_input, grid, input_size)
    return positive, np.asarray(positive.any(axis=(2, 3)))


class PatchLabels:
    """The loader's ``targets`` for MIL training: a batch's (image ids, letterboxes) -> {"positive":
    (N, K, P, P) bool, "boxed": (N, K) bool} (patch_targets) from ``boxes``, image id -> finding ->
    xyxy source boxes of the images whose boxes the model may learn from. Picklable (loader workers)."""

    def __init__(
        self, boxes: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], input_size: int, grid: int
    ) -> None:
        self.boxes, self.input_size, self.grid = dict(boxes), input_size, grid

    def __call__(self, image_ids: Sequence[str], letterboxes: Sequence[Letterbox]) -> dict[str, torch.Tensor]:
        positive, boxed = patch_targets(
            [self.boxes.get(i, {}) for i in image_ids], letterboxes, self.input_size, self.grid
        )
        return {"positive": torch.from_numpy(positive), "boxed": torch.from_numpy(boxed)}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def log_eq1(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """log of Eq. 1, p(y_k | x_i, bbox_i^k) = prod_{j in N} p_j * prod_{j not in N} (1 - p_j),
    from logits (..., P, P) and the box's patches ``positive`` (..., P, P) bool: (...,)."""
    terms = torch.where(positive, F.logsigmoid(logits), F.logsigmoid(-logits))
    return terms.flatten(-2).sum(-1)


def log_eq2(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2, p(y_k | x_i) = 1 - prod_j (1 - p_j), in log space from logits (..., P, P):
    (log p, log(1 - p)), each (...,)."""
    log_none = F.logsigmoid(-logits).flatten(-2).sum(-1)  # log prod_j (1 - p_j)
    return log1mexp(log_none), log_none


def rescaled_eq1(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Eq. 1 as the paper computes it: products of p and 1 - p rescaled to [0.98, 1]: (...,)."""
    p = torch.sigmoid(logits)
    terms = torch.where(positive, _rescale(p), _rescale(1 - p))
    return terms.flatten(-2).prod(-1)


def rescaled_eq2(logits: torch.Tensor) -> torch.Tensor:
    """Eq. 2 as the paper computes it, 1 - prod_j of (1 - p_j) rescaled to [0.98, 1]: (...,)."""
    return 1 - _rescale(1 - torch.sigmoid(logits)).flatten(-2).prod(-1)


def _rescale(probability: torch.Tensor) -> torch.Tensor:
    return RESCALE_LOW + (1 - RESCALE_LOW) * probability


def mil_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    positive: torch.Tensor,
    boxed: torch.Tensor,
    lambda_bbox: float = LAMBDA_BBOX,
    rescaled: bool = False,
) -> torch.Tensor:
    """Eq. 4 summed over findings (L = sum_k L_k), averaged over the batch.

    logits (N, K, P, P); labels (N, K) {0, 1}; positive (N, K, P, P) bool, the patches of
    finding k's boxes on image i; boxed (N, K) bool, eta_i for finding k: the image has a box of
    k (then -lambda_bbox log Eq. 1; its other findings are unboxed samples, section 3.2). Unboxed
    pairs: binary cross entropy of Eq. 2 against the label, negatives included.
    """
    labels = labels.to(logits.dtype)
    if rescaled:
        eps = torch.finfo(logits.dtype).tiny
        log_bbox = torch.log(rescaled_eq1(logits, positive).clamp_min(eps))
        image = rescaled_eq2(logits)
        log_yes, log_no = torch.log(image.clamp_min(eps)), torch.log((1 - image).clamp_min(eps))
    else:
        log_bbox = log_eq1(logits, positive)
        log_yes, log_no = log_eq2(logits)
    unboxed = -(labels * log_yes + (1 - labels) * log_no)
    per_pair = torch.where(boxed, -lambda_bbox * log_bbox, unboxed)
    return per_pair.sum(dim=1).mean()


def region_boxes(
    probabilities: np.ndarray, input_size: int, threshold: float = PATCH_THRESHOLD, limit: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Section 3.3: the patches above ``threshold`` of one finding's (P, P) probabilities form
    its region; each 8-connected part of it gives the box of its patches, on the input grid
    (xyxy, continuous pixels), scored by its patches' mean probability. Up to ``limit`` boxes,
    best first: boxes (K, 4), scores (K,)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    grid = probabilities.shape[-1]
    side = input_size / grid
    parts, count = label_components(probabilities > threshold)
    boxes, scores = [], []
    for part in range(1, count + 1):
        rows, cols = np.nonzero(parts == part)
        boxes.append([cols.min() * side, rows.min() * side, (cols.max() + 1) * side, (rows.max() + 1) * side])
        scores.append(float(probabilities[rows, cols].mean()))
    order = np.argsort(-np.array(scores), kind="stable")[:limit]
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)[order], np.array(scores, dtype=np.float64)[order]
