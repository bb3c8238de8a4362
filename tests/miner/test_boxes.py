"""Boxes from synthetic heatmaps with known blobs, and heatmaps that must be refused."""

from __future__ import annotations

import numpy as np
import pytest

from miner.boxes import check_heatmap, heatmap_boxes, heatmap_to_image_boxes, normalize_heatmap


def nested_blob() -> np.ndarray:
    """Three nested plateaus around (row 5, col 6) and a separate weaker blob."""
    h = np.zeros((12, 16))
    h[2:10, 2:12] = 0.6   # rows 2..9, cols 2..11  -> box (2, 2, 12, 10)
    h[4:8, 4:9] = 0.8     # rows 4..7, cols 4..8   -> box (4, 4, 9, 8)
    h[5:6, 6:7] = 1.0     # the peak               -> box (6, 5, 7, 6)
    h[1:3, 13:15] = 0.75  # separate blob: never the peak's component
    return h


def test_one_box_per_threshold_ranked_by_mean_inside():
    boxes, scores = heatmap_boxes(nested_blob(), thresholds=(0.5, 0.7, 0.9))
    assert boxes.tolist() == [[6, 5, 7, 6], [4, 4, 9, 8], [2, 2, 12, 10]]
    # means: the peak 1.0; the 0.8 plateau (20 px) with the peak: (19 * 0.8 + 1.0) / 20 = 0.81;
    # the outer box (80 px): 60 px of 0.6, 19 of 0.8, 1 of 1.0 -> (36 + 15.2 + 1) / 80 = 0.6525
    assert scores == pytest.approx([1.0, 0.81, 0.6525])


def test_equal_boxes_are_given_once():
    h = np.zeros((8, 8))
    h[2:5, 3:6] = 1.0  # a flat blob: every threshold gives the same box
    boxes, scores = heatmap_boxes(h)
    assert boxes.tolist() == [[3, 2, 6, 5]] and scores.tolist() == [1.0]


def test_diagonal_neighbours_are_one_component():
    h = np.zeros((6, 6))
    h[1, 1] = 1.0
    h[2, 2] = 0.95
    boxes, _ = heatmap_boxes(h, thresholds=(0.9,))
    assert boxes.tolist() == [[1, 1, 3, 3]]


def test_scale_to_image():
    assert heatmap_to_image_boxes(np.array([[1, 2, 3, 4]]), (16, 32), 512).tolist() == [[16, 64, 48, 128]]


@pytest.mark.parametrize(
    "heatmap, message",
    [
        (np.zeros((2, 3, 4)), "must be 2-D"),
        (np.array([[np.nan, 0.5]]), "finite"),
        (np.array([[0.0, 1.5]]), "min 0 and max 1.5"),
        (np.array([[-0.1, 0.5]]), "min -0.1 and max 0.5"),
        (np.zeros((3, 3), dtype=np.int64), "must be float"),
    ],
)
def test_bad_heatmaps_are_refused(heatmap, message):
    with pytest.raises(ValueError, match=message):
        check_heatmap(heatmap)


def test_normalize():
    assert normalize_heatmap(np.array([[2.0, 4.0], [6.0, 10.0]])).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert normalize_heatmap(np.full((2, 2), 3.0)).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    with pytest.raises(ValueError):
        normalize_heatmap(np.array([[np.nan]]))
