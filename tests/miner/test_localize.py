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


def test_upsample_keeps_each_cell_on_the_input_pixel_it_is_centred_on():
    """2 cells -> 4 px (stride 2): cell j sits on input pixel 2j, so pixel x samples the map at
    u = x / 2 = 0, 0.5, 1, 1.5 (held at the last cell): a left-to-right step 0 | 1 becomes
    0, 0.5, 1, 1; values outside [0, 1] (a step -1 | 3 gives -1, 1, 3, 3) are clamped."""
    step = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    assert torch.allclose(upsample(step, 4), torch.tensor([[0.0, 0.5, 1.0, 1.0]] * 4))
    wide = torch.tensor([[-1.0, 3.0], [-1.0, 3.0]])[None, None]  # (1, 1, 2, 2): leading dimensions are kept
    assert torch.equal(upsample(wide, 4), torch.tensor([[[[0.0, 1.0, 1.0, 1.0]] * 4]]))


def test_upsample_to_a_coarser_grid_samples_each_pixel_at_its_centre():
    """4 cells over 8 input px (stride 2) onto a 2 px grid: grid pixel 0 covers input pixels 0-3,
    centred on input 1.5, i.e. cell 0.75: 0.25 cell 0 + 0.75 cell 1; grid pixel 1 is cell 2.75."""
    ramp = torch.tensor([0.0, 0.2, 0.4, 0.8]).expand(4, 4)
    assert torch.allclose(upsample(ramp, 2, span=8), torch.tensor([[0.15, 0.7]] * 2))


def test_a_hot_cell_peaks_on_its_input_pixel():
    maps = torch.zeros(8, 8)
    maps[3, 5] = 1.0  # stride 4 at 32 px: centred on input pixel (x 20, y 12)
    full = upsample(maps, 32)
    assert np.unravel_index(int(full.argmax()), full.shape) == (12, 20)
    assert full[12, 16] == 0 and full[12, 18] == 0.5


def test_a_box_wholly_in_the_letterbox_padding_is_dropped():
    """A 64 x 32 source in a 16 px input fills rows 4..12; a blob on rows 0..2 boxes only padding."""
    maps = torch.zeros(1, 1, 16, 16)
    maps[0, 0, 0:2, 4:8] = 1.0
    [found] = localize(maps, np.array([[True]]), 16, [Letterbox.fit(64, 32, 16)])
    assert found[0].boxes.shape == (0, 4) and found[0].scores.shape == (0,)
