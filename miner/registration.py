"""Where a feature cell sits on the input, and upsampling that keeps it there.

A torchvision ResNet halves its grid with stride-2 layers padded by (k - 1) / 2 (the 7x7 stem,
the 3x3 max pool, the first 3x3 or 1x1 convolution of a stage): output j of each is centred on
input pixel 2j. Composed, cell j of a map at stride s is centred on input pixel s * j, that is at
the continuous position s * j + 0.5, not at s * (j + 0.5) as ``F.interpolate(...,
align_corners=False)`` assumes. That interpolation would shift every heatmap by (s - 1) / 2 input
pixels right and down: 3.5 px at stride 8, 15.5 px at stride 32, as large as a nodule at 256 px
(measured: tests/miner/test_models.py checks the position against the gradient of a cell).

Here output pixel x of a grid of ``out`` pixels spanning ``span`` input pixels samples the map at
cell coordinate u = ((x + 0.5) / out - 0.5 / span) * h (the centre of input pixel s * u is that
of output pixel x), linearly, holding the border values past the first and last cell centres.
"""

from __future__ import annotations

from functools import lru_cache

import torch


def interpolation_weights(
    cells: int, out: int, span: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(out, cells): row x holds the linear-interpolation weights of output pixel x (sum 1)."""
    return _weights(cells, out, span).to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _weights(cells: int, out: int, span: int) -> torch.Tensor:
    u = ((torch.arange(out, dtype=torch.float64) + 0.5) / out - 0.5 / span) * cells
    u = u.clamp(0, cells - 1)
    low = u.floor().long().clamp(max=cells - 1)
    high = (low + 1).clamp(max=cells - 1)
    frac = u - low
    weights = torch.zeros(out, cells, dtype=torch.float64)
    rows = torch.arange(out)
    weights.index_put_((rows, low), 1 - frac, accumulate=True)
    weights.index_put_((rows, high), frac, accumulate=True)
    return weights


def upsample_registered(maps: torch.Tensor, out: int, span: int | None = None) -> torch.Tensor:
    """(..., h, w) -> (..., out, out): ``maps`` covering ``span`` input pixels square (default:
    ``out``), resampled so that cell (i, j) stays centred on input pixel (s i, s j), s = span / h."""
    span = out if span is None else span
    h, w = maps.shape[-2:]
    return _resample(maps, interpolation_weights(h, out, span), interpolation_weights(w, out, span))


def _resample(maps: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """maps (..., h, w), rows (H, h), cols (W, w) -> (..., H, W)."""
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    rows, cols = (weights.to(device=maps.device, dtype=dtype) for weights in (rows, cols))
    return torch.einsum("yh,...hw,xw->...yx", rows, maps.to(dtype), cols)


class RegisteredUpsample(torch.nn.Module):
    """Bilinear x``factor`` upsampling of (N, C, h, w) feature maps that keeps cell registration
    (see the module docstring): ResNet-MSA's up2 between two stages of a ResNet."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = self.factor
        return _resample(x, interpolation_weights(h, f * h, f * h), interpolation_weights(w, f * w, f * w))
