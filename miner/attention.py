"""Attention mining (AM) with knowledge preservation (KP): Cai et al. 2018, sections 2.1, 2.2, 3.2.

Steps are numbered as in the paper. Step 1 is the CAM baseline: its model computes H_1 on
unerased features and M_1 erases H_1's peak component. Each later step t fine-tunes a model
on X * M_{t-1} (initialised from step t-1's model) and computes H_t = CAM(X_t * M_{t-1}),
then M_t. Training step t therefore needs the frozen models of steps 1..t-1 (the "chain")
to compute M_{t-1}. N_A of Eq. 4, "the original network before AM updates", is step 1's model
by default (the run's ``kp_reference``): every step is held to what step 1 learnt, where holding
step t to step t-1's lets the drift add up over the steps (issue 23: a finding's validation AUC
fell 0.02 more by step 3); ``previous`` holds it to step t-1's. N_A normalises by the batch's
statistics, as N_B does while it trains (``kp_norm`` batch), so that "initially, N_A and N_B are
identical" (section 2.2): a frozen N_A with its running statistics (``running``) differs from N_B
in training mode before any update, and L_KP's gradient then pulls N_B towards that gap.

Images are normalised ``(N, 1, S, S)``; masks and heatmaps ``(N, C, h, w)`` on the model's
feature grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cxr_miner.miner.cam import normalize_maps, update_masks
from cxr_miner.miner.models import CamClassifier, Features
from cxr_miner.miner.settings import ERASED_FRACTION as ERASED_FRACTION
from cxr_miner.miner.settings import KP_LAMBDA as KP_LAMBDA
from cxr_miner.miner.settings import KP_MODES as KP_MODES

KP_LAYERS = ("layer3", "layer4", "features", "logits")  # 3rd, 4th bottleneck, MSA, classification (section 3.2)
KP_NORMS = ("batch", "running")


class Mining(NamedTuple):
    """heatmaps: normalised H_1..H_T; masks: M_1..M_T (M_1..M_{T-1} when the last was not
    wanted); logits (N, C) of step 1 (unerased)."""

    heatmaps: list[torch.Tensor]
    masks: list[torch.Tensor]
    logits: torch.Tensor


@torch.no_grad()
def mine(
    models: Sequence[CamClassifier],
    images: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    last_mask: bool = True,
) -> Mining:
    """Run AM steps 1..len(models): H_t = normalise(CAM of model t on X_t * M_{t-1}) (Eq. 7), M_t.

    ``models`` are the step models in order (one model gives the CAM baseline). H_t is
    normalised to [0, 1] over its kept positions, erased positions 0 (see normalize_maps).
    ``select``, given the step-1 logits (N, C), names the (image, class) pairs (N, C) bool
    whose masks are updated; the erasure is class-wise (Eq. 1-2), so the other pairs' masks,
    left at 1, change no selected heatmap. Default: every pair. Without ``last_mask``, M_T is
    not made: Eq. 8 does not use it, only training's next step does (a labelling per pair on
    the CPU, a third of inference's at T = 3).
    """
    if not models:
        raise ValueError("mine() needs at least the step-1 model")
    heatmaps: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    logits = wanted = None
    for model in models:
        features = model.forward_features(images)
        if logits is None:
            logits = features.logits
            wanted = select(logits) if select is not None else None
        x = features.features
        previous = (
            masks[-1] if masks else torch.ones(x.shape[0], model.config.num_classes, *x.shape[2:], device=x.device)
        )
        heatmap = normalize_maps(model.cams(x.float(), previous), previous)
        heatmaps.append(heatmap)
        if last_mask or len(heatmaps) < len(models):
            masks.append(update_masks(heatmap, previous, wanted))
    assert logits is not None  # set by the first model; there is at least one
    return Mining(heatmaps, masks, logits)


def erased_count(batch_size: int, kp: str, fraction: float = ERASED_FRACTION) -> int:
    """n of section 2.2: with KP-Vanilla or KP the first n = N * fraction (at least 1) images
    of a batch are erased and the other N - n left untouched; without KP all N are erased."""
    if kp not in KP_MODES:
        raise ValueError(f"unknown KP mode {kp!r}; known: {KP_MODES}")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    return batch_size if kp == "none" else max(1, int(batch_size * fraction))


def gap(tensor: torch.Tensor) -> torch.Tensor:
    """g of Eq. 2 and 4: (N, D, h, w) -> (N, D) by the spatial mean; (N, D) unchanged (logits)."""
    return tensor.float().mean(dim=(2, 3)) if tensor.ndim == 4 else tensor.float()


def kp_distance(frozen: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
    """Eq. 4: L^k = ||g(X_A(k)) - g(X_B(k))||_2 / (N - n), the l2 norm over all N - n rows."""
    if frozen.shape != updated.shape:
        raise ValueError(f"layer outputs differ in shape: {tuple(frozen.shape)} vs {tuple(updated.shape)}")
    return torch.linalg.vector_norm(gap(frozen) - gap(updated)) / frozen.shape[0]


def kp_loss(frozen: Features, updated: Features, layers: Sequence[str] = KP_LAYERS) -> torch.Tensor:
    """Eq. 5: L_KP = mean of Eq. 4 over the chosen layers (names of Features fields)."""
    return torch.stack([kp_distance(getattr(frozen, name), getattr(updated, name)) for name in layers]).mean()


def select_rows(features: Features, rows: slice) -> Features:
    return Features(*(tensor[rows] for tensor in features))


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 2-3: L_cls = 1/C sum_c 1/N sum_i h(sigma(z_ic), y_ic), h the binary cross entropy."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def weighted_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The weighted cross-entropy loss of Wang et al. 2017 (ChestX-ray8, Eq. 1), W-CEL:
    beta_P sum_{y=1} -ln f(x) + beta_N sum_{y=0} -ln(1 - f(x)), with beta_P = (|P| + |N|) / |P| and
    beta_N = (|P| + |N|) / |N| counted over the batch's labels (N, C), averaged over the N x C terms.
    A batch with no positive (or no negative) label weighs the other kind by 1."""
    labels = labels.float()
    total, positives = labels.numel(), labels.sum()
    beta_p = total / positives.clamp(min=1)
    beta_n = total / (total - positives).clamp(min=1)
    weights = torch.where(labels > 0, beta_p, beta_n)
    return F.binary_cross_entropy_with_logits(logits.float(), labels, weight=weights)


@contextmanager
def batch_statistics(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model``'s BatchNorm layers normalise by each batch's own statistics, as in training, and
    keep their running statistics as they are (momentum 0); restored on exit."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in norms]
    for norm in norms:
        norm.train()
        norm.momentum = 0.0
    try:
        yield model
    finally:
        for norm, (training, momentum) in zip(norms, saved):
            norm.train(training)
            norm.momentum = momentum


def reference_features(reference: CamClassifier, images: torch.Tensor, rows: slice, norm: str) -> Features:
    """N_A's features of ``images[rows]`` without gradients. ``norm`` batch: N_A sees the whole
    batch, as N_B does, and normalises by its statistics; running: only the rows, by N_A's
    running statistics (its mode as loaded)."""
    if norm not in KP_NORMS:
        raise ValueError(f"unknown kp_norm {norm!r}; known: {KP_NORMS}")
    with torch.no_grad():
        if norm == "running":
            return reference.forward_features(images[rows])
        with batch_statistics(reference):
            return select_rows(reference.forward_features(images), rows)


class AMLoss(NamedTuple):
    total: torch.Tensor
    cls: torch.Tensor
    kp: torch.Tensor
    erased: int


def attention_mining_loss(
    model: CamClassifier,
    chain: Sequence[CamClassifier],
    images: torch.Tensor,
    labels: torch.Tensor,
    kp: str = "kp",
    kp_lambda: float = KP_LAMBDA,
    fraction: float = ERASED_FRACTION,
    cls_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = classification_loss,
    reference: CamClassifier | None = None,
    reference_norm: str = "batch",
) -> AMLoss:
    """Eq. 6: L = L_cls + lambda * L_KP for one batch of AM step t = len(chain) + 1.

    The first n images (erased_count) are classified class-wise from X * M_{t-1} (Eq. 1-3),
    M_{t-1} computed by the frozen ``chain`` (models of steps 1..t-1). The other N - n are
    classified from unerased X; with ``kp="kp"`` they also go through N_A = chain[-1] and
    L_KP (Eq. 4-5) pulls N_B's GAP features of KP_LAYERS towards N_A's.
    images (N, 1, S, S) normalised; labels (N, C) in {0, 1}. ``cls_loss``: L_cls, Eq. 3's BCE
    by default, or the loss step 1 learnt by (a step that changes the objective moves the
    classifier off what step 1 learnt). ``reference``: N_A, by default ``chain[-1]`` (the model
    before this step's updates); ``chain[0]`` holds every step to step 1's responses.
    ``reference_norm``: N_A's BatchNorm (reference_features).
    """
    n = erased_count(images.shape[0], kp, fraction)
    masks = mine(chain, images[:n]).masks[-1]
    updated = model.forward_features(images)
    logits = model.erased_logits(updated.features[:n], masks)
    if n < images.shape[0]:
        logits = torch.cat([logits, updated.logits[n:]])
    cls = cls_loss(logits, labels)
    if kp == "kp" and n < images.shape[0]:
        frozen = reference_features(reference or chain[-1], images, slice(n, None), reference_norm)
        preserve = kp_loss(frozen, select_rows(updated, slice(n, None)), model.kp_layers)
    else:
        preserve = torch.zeros((), device=cls.device)
    return AMLoss(cls + kp_lambda * preserve, cls.detach(), preserve.detach(), n)
