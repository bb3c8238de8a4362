"""Class activation maps, class-wise erasure and the final heatmap (Cai et al. 2018, Eq. 1-3, 7, 8).

Shapes: features X ``(N, D, h, w)``; branch weights ``(C, D)`` (row c = w_c); masks M
``(N, C, h, w)`` with 1 = kept, 0 = erased; CAMs / heatmaps ``(N, C, h, w)`` on the same grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cxr_miner.miner.boxes import peak_component

BINARIZE_AT = 0.5  # section 3.2: normalised CAMs are binarised at 0.5


def _check_masks(features: torch.Tensor, weights: torch.Tensor, masks: torch.Tensor | None) -> None:
    n, d, h, w = features.shape
    if weights.ndim != 2 or weights.shape[1] != d:
        raise ValueError(f"branch weights must be (C, {d}), got {tuple(weights.shape)}")
    if masks is not None and tuple(masks.shape) != (n, weights.shape[0], h, w):
        raise ValueError(f"masks must be {(n, weights.shape[0], h, w)}, got {tuple(masks.shape)}")


def class_activation_maps(
    features: torch.Tensor, weights: torch.Tensor, masks: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 7: H^c = (X * M^c) w^c, the inner product over channels. -> (N, C, h, w).

    Without masks this is the CAM of Zhou et al. (M^c all ones, M_0 of section 3.2).
    """
    _check_masks(features, weights, masks)
    cams = torch.einsum("ndhw,cd->nchw", features, weights.to(features.dtype))
    return cams if masks is None else cams * masks.to(cams.dtype)


def erased_logits(
    features: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None, masks: torch.Tensor
) -> torch.Tensor:
    """Eq. 1-2: branch c scores its own erased map, (w^c)^T g(X * M^c) (+ b_c). -> (N, C).

    g is global average pooling over all h * w positions, erased ones included (they are 0).
    """
    _check_masks(features, weights, masks)
    pooled = torch.einsum("ndhw,nchw->ncd", features, masks.to(features.dtype)) / (
        features.shape[2] * features.shape[3]
    )
    logits = (pooled * weights.to(pooled.dtype)).sum(dim=2)  # X-hat^c of Eq. 1, pooled, through w^c
    return logits if bias is None else logits + bias.to(logits.dtype)


def normalize_maps(cams: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max each (n, c) map to [0, 1] over its kept positions; erased positions become 0.

    A constant map (or one with nothing kept) becomes all zeros. Float32 out, same shape.
    """
    cams = cams.float()
    keep = torch.ones_like(cams, dtype=torch.bool) if masks is None else masks.bool()
    inf = torch.tensor(float("inf"), device=cams.device)
    low = torch.where(keep, cams, inf).amin(dim=(-2, -1), keepdim=True)
    high = torch.where(keep, cams, -inf).amax(dim=(-2, -1), keepdim=True)
    span = high - low
    ok = torch.isfinite(span) & (span > 0)
    scaled = (cams - torch.where(ok, low, torch.zeros_like(low))) / torch.where(ok, span, torch.ones_like(span))
    return torch.where(keep & ok, scaled, torch.zeros_like(scaled)).clamp(0, 1)


def update_masks(normalized: torch.Tensor, masks: torch.Tensor, wanted: torch.Tensor | None = None) -> torch.Tensor:
    """Section 3.2: M_t = M_{t-1} with the peak component of binarised H_t set to 0.

    normalized: H_t normalised to [0, 1] (N, C, h, w); masks: M_{t-1} (N, C, h, w), 0/1;
    wanted: (N, C) bool, the (image, class) maps to update (default all; the others keep
    M_{t-1}, for callers that need only some classes' later heatmaps). Returns M_t, float32,
    on the masks' device. The connected components are labelled on the CPU with
    scikit-image (maps are small: h, w = S/16 or S/32).
    """
    maps = normalized.detach().float().cpu().numpy()
    erase = np.zeros(maps.shape, dtype=bool)
    pairs = np.ndindex(*maps.shape[:2]) if wanted is None else zip(*np.nonzero(wanted.detach().cpu().numpy()))
    for index in pairs:
        erase[index] = peak_component(maps[index], BINARIZE_AT)
    return masks.float() * torch.from_numpy(~erase).to(device=masks.device, dtype=torch.float32)


def final_heatmap(heatmaps: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Eq. 8: H_f = 1/T sum_t [H_t + sum_{t'<t} H_{t'} * (1 - M_{t'})].

    heatmaps: H_1..H_T, each (..., h, w); masks: M_1..M_{T-1} (or M_1..M_T, the last is
    unused), the cumulative masks after each step, 1 = kept. Erased regions of H_t are
    filled from the heatmap that erased them. Returns (..., h, w).
    """
    steps = len(heatmaps)
    if steps == 0 or len(masks) < steps - 1:
        raise ValueError(f"need T >= 1 heatmaps and T - 1 masks, got {steps} and {len(masks)}")
    total = torch.zeros_like(heatmaps[0], dtype=torch.float32)
    for t in range(steps):
        filled = heatmaps[t].float()
        for earlier in range(t):
            filled = filled + heatmaps[earlier].float() * (1 - masks[earlier].float())
        total = total + filled
    return total / steps
