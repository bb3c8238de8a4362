"""Heatmap to source-pixel boxes through the input resize and the letterbox, worked by hand."""

import numpy as np
import torch

from cxr_miner.miner.localize import boxes_in_source, localize, upsample
from cxr_miner.storage.vocab.letterbox import Letterbox


def test_box_from_input_grid_to_source_pixels():
    letterbox = Letterbox.fit(64, 32, 32)  # source 64 x 32 in a 32 px shard: content 32 x 16, offset_y 8
    # input 16 px -> shard 32 px: x2 -> (4, 8, 20, 16); shard -> source: (x, (y - 8)) / 0.5 -> (8, 0, 40, 16)
    assert np.allclose(boxes_in_source(np.array([[2, 4, 10, 8]]), 16, letterbox), [[8, 0, 40, 16]])


def test_boxes_are_clipped_to_the_source_image():
    # the box covers the letterbox padding above the content
    assert np.allclose(boxes_in_source(np.array([[0, 0, 16, 4]]), 16, Letterbox.fit(64, 32, 32)), [[0, 0, 64, 0]])


def test_localize_maps_a_heatmap_blob_to_source_pixels():
    maps = torch.zeros(1, 2, 16, 16)
    maps[0, 1, 4:8, 2:10] = 1.0  # already at input resolution: box (2, 4, 10, 8) on the input grid
    [found] = localize(maps, np.array([[False, True]]), 16, [Letterbox.fit(64, 32, 32)])
    assert list(found) == [1]
    assert np.allclose(found[1].boxes, [[8, 0, 40, 16]]) and np.allclose(found[1].scores, [1.0])


def test_localize_boxes_only_the_wanted_pairs():
    maps = torch.zeros(2, 3, 4, 4)
    maps[1, 2, 1, 1] = 1.0
    wanted = np.array([[False, False, False], [False, False, True]])
    found = localize(maps, wanted, 8, [Letterbox.fit(8, 8, 8)] * 2)
    assert found[0] == {} and list(found[1]) == [2]
    assert found[1][2].boxes.shape[1] == 4


def test_upsample_is_bilinear_with_pixel_centres_aligned_and_clamped():
    """2 -> 4 px: output pixel x samples the input at u = (x + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75,
    1.25 (the ends held at the border), so a left-to-right step 0 | 1 becomes 0, 0.25, 0.75, 1;
    values outside [0, 1] (a step -1 | 3 gives -1, 0, 2, 3) are clamped."""
    step = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(upsample(step, 4), torch.tensor([[0.0, 0.25, 0.75, 1.0]] * 4))
    wide = torch.tensor([[-1.0, 3.0], [-1.0, 3.0]])[None, None]  # (1, 1, 2, 2): leading dimensions are kept
    assert torch.equal(upsample(wide, 4), torch.tensor([[[[0.0, 0.0, 1.0, 1.0]] * 4]]))
