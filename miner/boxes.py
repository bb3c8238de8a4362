"""Heatmaps to ranked boxes (Cai et al. 2018, section 3.2, "Bbox Generation").

Convention: boxes are ``(x_min, y_min, x_max, y_max)`` in continuous pixel coordinates of
the heatmap's own grid (pixel (i, j) covers [i, i + 1) x [j, j + 1)), unless a function
says it maps them elsewhere. A heatmap is a 2-D float array with values in [0, 1].
"""

from __future__ import annotations

import numpy as np
from skimage.measure import label, regionprops

# The paper fixes three thresholds but not their values; these span the upper half of
# the normalised map, where the binarisation of Eq. 7 (0.5) also works.
DEFAULT_THRESHOLDS = (0.5, 0.7, 0.9)


def check_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """A heatmap (H, W), float, finite, within [0, 1]; else ValueError naming what is wrong."""
    heatmap = np.asarray(heatmap)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    if not np.issubdtype(heatmap.dtype, np.floating):
        raise ValueError(f"heatmap must be float, got {heatmap.dtype}")
    if heatmap.size == 0 or not np.all(np.isfinite(heatmap)):
        raise ValueError(f"heatmap must be non-empty and finite (shape {heatmap.shape}, NaN or inf present)")
    low, high = float(heatmap.min()), float(heatmap.max())
    if low < 0 or high > 1:
        raise ValueError(f"heatmap values must lie in [0, 1], got min {low:.4g} and max {high:.4g}")
    return heatmap


def normalize_heatmap(heatmap: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] (float64); a constant map becomes all zeros. Raises on NaN or wrong rank."""
    heatmap = np.asarray(heatmap, dtype=np.float64)
    if heatmap.ndim != 2 or heatmap.size == 0 or not np.all(np.isfinite(heatmap)):
        raise ValueError(f"heatmap must be a non-empty finite 2-D array, got shape {heatmap.shape}")
    low, high = heatmap.min(), heatmap.max()
    return (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)


def peak_component_box(heatmap: np.ndarray, threshold: float) -> tuple[int, int, int, int] | None:
    """xyxy box of the 8-connected component of ``heatmap >= threshold`` that holds the global maximum."""
    mask = heatmap >= threshold
    if not mask.any():
        return None
    components = label(mask, connectivity=2)
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    region = next(r for r in regionprops(components) if r.label == components[peak])
    min_row, min_col, max_row, max_col = region.bbox  # max exclusive
    return (min_col, min_row, max_col, max_row)


def box_mean(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(heatmap[y0:y1, x0:x1].mean())


def heatmap_boxes(heatmap: np.ndarray, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``len(thresholds)`` boxes from one heatmap, ranked by mean heatmap inside (descending).

    At each threshold the component holding the global maximum gives one box; thresholds that
    give the same box give it once (so fewer boxes, as the paper notes). Returns boxes
    ``(K, 4)`` float64 xyxy in heatmap pixels and their scores ``(K,)``, rank 1 first.
    """
    heatmap = check_heatmap(heatmap)
    boxes: list[tuple[int, int, int, int]] = []
    for threshold in thresholds:
        box = peak_component_box(heatmap, threshold)
        if box is not None and box not in boxes:
            boxes.append(box)
    scores = np.array([box_mean(heatmap, b) for b in boxes], dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    return np.array(boxes, dtype=np.float64).reshape(-1, 4)[order], scores[order]


def heatmap_to_image_boxes(boxes: np.ndarray, heatmap_shape: tuple[int, int], image_size: int) -> np.ndarray:
    """Boxes (K, 4) in heatmap pixels -> shard-image pixels of a ``image_size`` square."""
    height, width = heatmap_shape
    scale = np.array([image_size / width, image_size / height, image_size / width, image_size / height])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
