"""Heatmap to source-pixel boxes through the input resize and the letterbox, worked by hand."""

import numpy as np
import torch

from miner.localize import boxes_in_source, localize, upsample
from storage.letterbox import Letterbox


def test_box_from_input_grid_to_source_pixels():
    heatmap = np.zeros((16, 16))
    heatmap[4:8, 2:10] = 1.0  # input grid: box (2, 4, 10, 8)
    letterbox = Letterbox.fit(64, 32, 32)  # source 64 x 32 in a 32 px shard: content 32 x 16, offset_y 8
    # input 16 px -> shard 32 px: x2 -> (4, 8, 20, 16); shard -> source: (x, (y - 8)) / 0.5 -> (8, 0, 40, 16)
    result = boxes_in_source(heatmap, 16, letterbox)
    assert np.allclose(result.boxes, [[8, 0, 40, 16]]) and np.allclose(result.scores, [1.0])


def test_boxes_are_clipped_to_the_source_image():
    heatmap = np.zeros((16, 16))
    heatmap[0:4, 0:16] = 1.0  # covers the letterbox padding above the content
    result = boxes_in_source(heatmap, 16, Letterbox.fit(64, 32, 32))
    assert np.allclose(result.boxes, [[0, 0, 64, 0]])


def test_localize_boxes_only_the_wanted_pairs():
    maps = torch.zeros(2, 3, 4, 4)
    maps[1, 2, 1, 1] = 1.0
    wanted = np.array([[False, False, False], [False, False, True]])
    found = localize(maps, wanted, 8, [Letterbox.fit(8, 8, 8)] * 2)
    assert found[0] == {} and list(found[1]) == [2]
    assert found[1][2].boxes.shape[1] == 4
    assert float(upsample(maps, 8).max()) <= 1.0
