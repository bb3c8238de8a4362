"""Heatmaps of a batch -> ranked boxes per image and finding, in source pixels.

Grids: the model's heatmap (h, w) covers the network input (input_size px square), which is
the shard image (shard_size px square) resized; the shard image is the source letterboxed
(storage.vocab.letterbox.Letterbox). Boxes are xyxy, continuous pixels of the named grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from cxr_miner.miner.boxes import DEFAULT_THRESHOLDS, heatmap_boxes_batched
from cxr_miner.miner.registration import upsample_registered
from cxr_miner.storage.vocab.letterbox import Letterbox


class Localization(NamedTuple):
    """Boxes (K, 4) xyxy in source pixels and their scores (K,), rank 1 first (K <= 3); tuned
    boxes (miner.methods.tuned) also carry the variant that made them, their confidence (K,)
    (NaN where none was calibrated), whether each is at its finding's operating point (K,), and
    each box's rank in its rule's own order (K,) (None: the order given is the rule's)."""

    boxes: np.ndarray
    scores: np.ndarray
    variant: str | None = None
    confidence: np.ndarray | None = None
    at_operating_point: np.ndarray | None = None
    rule_rank: np.ndarray | None = None


def upsample(heatmaps: torch.Tensor, size: int, span: int | None = None) -> torch.Tensor:
    """(..., h, w) -> (..., size, size), float32, bilinear, clamped to [0, 1]; heatmaps over the
    network input (``span`` px square, default ``size``), each cell kept on the input pixel it is
    centred on (miner.registration: cell j of a stride-s map on input pixel s j)."""
    return upsample_registered(heatmaps.float(), size, span).clamp(0, 1)


def boxes_in_source(boxes: np.ndarray, input_size: int, letterbox: Letterbox) -> np.ndarray:
    """Boxes (K, 4) xyxy on the input grid (input_size px square) -> source pixels (K, 4), clipped."""
    shard = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * (letterbox.size / input_size)
    source = letterbox.boxes_to_source(shard)
    limit = np.array([letterbox.source_width, letterbox.source_height] * 2, dtype=np.float64)
    return np.clip(source, 0, limit)


def covers_source(boxes: np.ndarray) -> np.ndarray:
    """(K,) bool: which source-pixel boxes (K, 4) cover some source pixel. A box wholly in the
    letterbox padding is clipped to zero width or height by boxes_in_source: it boxes nothing."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def localize(
    heatmaps: torch.Tensor,
    wanted: np.ndarray,
    input_size: int,
    letterboxes: Sequence[Letterbox],
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
) -> list[dict[int, Localization]]:
    """Boxes for the (image, class) pairs marked in ``wanted`` (N, C) bool.

    heatmaps: (N, C, h, w) normalised. Returns per image {class index: Localization}.
    The wanted maps are upsampled and boxed on their device; only the boxes (at most 3 per
    pair) come to the CPU, to be mapped to source pixels.
    """
    rows, classes = np.nonzero(wanted)
    out: list[dict[int, Localization]] = [{} for _ in range(len(wanted))]
    if len(rows) == 0:
        return out
    index = torch.as_tensor(rows, device=heatmaps.device), torch.as_tensor(classes, device=heatmaps.device)
    found = heatmap_boxes_batched(upsample(heatmaps[index], input_size), thresholds)
    boxes, scores, valid = (t.cpu().numpy() for t in found)
    for k, (i, c) in enumerate(zip(rows.tolist(), classes.tolist())):
        source = boxes_in_source(boxes[k][valid[k]], input_size, letterboxes[i])
        keep = covers_source(source)
        out[i][int(c)] = Localization(source[keep], scores[k][valid[k]][keep].astype(np.float64))
    return out
