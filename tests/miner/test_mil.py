"""The MIL patch model's pieces (Li et al. 2018) against answers worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxr_miner.miner.methods.mil import patch_maps
from cxr_miner.miner.mil import (
    PatchHead,
    PatchModel,
    box_patches,
    image_logits,
    init_patch_bias,
    log_eq1,
    log_eq2,
    mil_loss,
    patch_targets,
    region_boxes,
    rescaled_eq1,
    rescaled_eq2,
    slice_patches,
)
from cxr_miner.miner.registration import upsample_registered
from cxr_miner.miner.rules import REGION_RULE
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox

P = np.array([[0.9, 0.2], [0.5, 0.1]])
BOX = np.array([[True, False], [False, False]])


def _logits(p: np.ndarray) -> torch.Tensor:
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


def test_eq1_and_eq2_on_a_2x2_grid():
    """Eq. 1: the box's patch positive, the rest negative: 0.9 x 0.8 x 0.5 x 0.9 = 0.324.
    Eq. 2: 1 - 0.1 x 0.8 x 0.5 x 0.9 = 0.964. Rescaled to [0.98, 1]: p -> 0.98 + 0.02 p."""
    z, box = _logits(P), torch.from_numpy(BOX)
    assert math.exp(log_eq1(z, box)) == pytest.approx(0.324)
    log_yes, log_no = log_eq2(z)
    assert (math.exp(log_yes), math.exp(log_no)) == (pytest.approx(0.964), pytest.approx(0.036))
    assert float(rescaled_eq1(z, box)) == pytest.approx(0.998 * 0.996 * 0.990 * 0.998)
    assert float(rescaled_eq2(z)) == pytest.approx(1 - 0.982 * 0.996 * 0.990 * 0.998)


def test_log_space_agrees_with_plain_products_and_does_not_underflow():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.05, 0.95, size=(3, 4, 4))
    box = rng.random((3, 4, 4)) < 0.3
    plain1 = np.where(box, p, 1 - p).reshape(3, -1).prod(-1)
    plain2 = 1 - (1 - p).reshape(3, -1).prod(-1)
    z = _logits(p)
    np.testing.assert_allclose(torch.exp(log_eq1(z, torch.from_numpy(box))).numpy(), plain1, rtol=1e-10)
    np.testing.assert_allclose(torch.exp(log_eq2(z)[0]).numpy(), plain2, rtol=1e-10)
    # 16 x 16 patches at p = 0.5: prod (1 - p) = 0.5^256 ~ 1e-77 is 0 in float32; its log is not
    half = torch.zeros(16, 16)
    assert float((1 - torch.sigmoid(half)).prod()) == 0.0
    assert float(log_eq2(half)[1]) == pytest.approx(256 * math.log(0.5), rel=1e-6)


def test_log_space_keeps_the_gradient_of_a_confidently_wrong_patch_that_rescaling_flattens():
    """A boxed image whose one box patch has logit -12 (p = 6e-6): in log space the loss pulls
    that logit with about lambda_bbox = 5; rescaled, by 5 x 0.02 x p (1 - p) / 0.98 ~ 6e-7."""
    z = torch.full((1, 1, 4, 4), -12.0, requires_grad=True)
    positive = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    positive[0, 0, 1, 2] = True
    gradients = []
    for rescaled in (False, True):
        z.grad = None
        mil_loss(z, torch.ones(1, 1), positive, torch.ones(1, 1, dtype=torch.bool), rescaled=rescaled).backward()
        gradients.append(float(z.grad[0, 0, 1, 2]))
    log_space, rescaled = gradients
    assert log_space == pytest.approx(-5.0, rel=1e-4)
    assert abs(rescaled) < 1e-6


def test_eq4_by_hand():
    """Two findings on one image: finding 0 has the box (-5 log 0.324); finding 1 has no box and
    label 1 (-log 0.964); a second image, unboxed, label 0 for both (-log 0.036 each)."""
    z = _logits(np.stack([np.stack([P, P]), np.stack([P, P])]))
    positive = torch.zeros(2, 2, 2, 2, dtype=torch.bool)
    positive[0, 0] = torch.from_numpy(BOX)
    boxed = torch.tensor([[True, False], [False, False]])
    labels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    expected = ((-5 * math.log(0.324) - math.log(0.964)) + (-2 * math.log(0.036))) / 2
    assert float(mil_loss(z, labels, positive, boxed)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "box, cells",
    [
        ([16, 16, 32, 32], [(1, 1)]),  # exactly one patch: its edges touch the neighbours, no overlap
        ([20, 21, 24, 25], [(1, 1)]),  # inside one patch
        ([15, 16, 32, 32], [(1, 0), (1, 1)]),  # one pixel into the left neighbour: partial overlap counts
        ([60, 60, 64, 64], [(3, 3)]),  # the grid's corner
        ([50, 0, 90, 8], [(0, 3)]),  # past the image: clipped
        ([30, 30, 30, 40], []),  # no width
    ],
)
def test_box_to_patches(box, cells):
    mask = box_patches(np.array([box]), 4, 64)  # patches of 16 px
    assert sorted(zip(*np.nonzero(mask))) == cells


def test_the_region_gives_one_box_per_part():
    """A 4 x 4 grid on a 64 px input (16 px patches): a part of 3 patches top left (mean 0.8) and
    one patch bottom right (0.6); 0.5 exactly is not above the threshold."""
    grid = np.zeros((4, 4))
    grid[0, 0:2], grid[1, 0] = 0.9, 0.6
    grid[3, 3], grid[3, 1] = 0.6, 0.5
    boxes, scores = region_boxes(grid, 64)
    assert boxes.tolist() == [[0, 0, 32, 32], [48, 48, 64, 64]]
    np.testing.assert_allclose(scores, [0.8, 0.6])
    assert region_boxes(np.zeros((4, 4)), 64)[0].shape == (0, 4)


def test_patch_slicing_up_is_registered_and_down_is_a_stride_1_max_pool():
    small = torch.arange(4.0).reshape(1, 1, 2, 2)
    assert torch.equal(slice_patches(small, 4, 64), upsample_registered(small, 4, 64))
    big = torch.arange(36.0).reshape(1, 1, 6, 6)  # f = 6 - 4 + 1 = 3: each output the max of a 3 x 3 window
    sliced = slice_patches(big, 4, 64)
    assert sliced.shape == (1, 1, 4, 4) and float(sliced[0, 0, 0, 0]) == 14.0 and float(sliced[0, 0, 3, 3]) == 35.0
    assert slice_patches(big, 6, 64) is big


def test_the_patch_head_gives_k_logits_per_patch():
    head = PatchHead(in_channels=8, num_classes=14, channels=16)
    assert head(torch.randn(2, 8, 16, 16)).shape == (2, 14, 16, 16)


@pytest.mark.parametrize("size, grid", [(64, 16), (256, 4)])  # ResNet-10 at stride 32: 2 -> 16 up, 8 -> 4 down
def test_the_patch_model_maps_images_to_patch_logits_and_eq2_scores(size, grid):
    model = PatchModel("resnet10", num_classes=3, grid=grid, head_channels=8).eval()
    images = torch.randn(2, 1, size, size)
    with torch.no_grad():
        patches, scores = model.patches(images), torch.sigmoid(model(images))
    assert patches.shape == (2, 3, grid, grid) and scores.shape == (2, 3)
    eq2 = 1 - torch.prod(1 - torch.sigmoid(patches.double()).flatten(-2), dim=-1)
    torch.testing.assert_close(scores.double(), eq2, rtol=1e-4, atol=1e-6)


def test_image_logits_are_eq2_as_a_logit():
    """P of the 2 x 2 grid: Eq. 2 gives 0.964, so the logit is log(0.964 / 0.036)."""
    assert float(image_logits(_logits(P)[None, None])) == pytest.approx(math.log(0.964 / 0.036), rel=1e-6)  # float32


def test_the_patch_bias_starts_eq2_at_the_prevalence():
    model = PatchModel("resnet10", num_classes=2, grid=4, head_channels=8)
    init_patch_bias(model, torch.tensor([0.05, 0.5]))
    bias = model.head.classify.bias.detach()
    start = image_logits(bias[None, :, None, None].expand(1, 2, 4, 4))
    torch.testing.assert_close(torch.sigmoid(start)[0], torch.tensor([0.05, 0.5]), rtol=1e-5, atol=1e-6)


def test_the_region_rule_on_patch_maps_is_the_papers_region():
    """The registry's region rule (miner.rules) on the patch probabilities drawn as blocks finds the
    same parts, boxes and scores as region_boxes on the grid itself (no patch exactly at 0.5)."""
    grid = np.zeros((4, 4))
    grid[0, 0:2], grid[1, 0] = 0.9, 0.6
    grid[3, 3], grid[3, 1], grid[2, 3] = 0.7, 0.45, 0.55
    drawn = patch_maps(torch.from_numpy(grid)[None, None].float(), 64)[0, 0].numpy()
    assert drawn.shape == (64, 64) and drawn[15, 15] == pytest.approx(0.9) and drawn[16, 16] == 0.0
    found = REGION_RULE.boxes(drawn)
    boxes, scores = region_boxes(grid, 64)
    assert found.boxes.tolist() == boxes.tolist() == [[0, 0, 32, 32], [48, 32, 64, 64]]
    np.testing.assert_allclose(found.score, scores, rtol=1e-6)


def test_patch_targets_map_source_boxes_through_the_letterbox():
    """A 128 x 64 source in a 64 px shard: scale 0.5, offset_y 16; a 32 px input halves again.
    Source box (0, 0, 64, 32) -> shard (0, 16, 32, 32) -> input (0, 8, 16, 16): with 8 px patches
    (P = 4) row 1, columns 0 and 1."""
    letterboxes = [Letterbox.fit(128, 64, 64), Letterbox.fit(64, 64, 64)]
    positive, boxed = patch_targets([{"Mass": [[0, 0, 64, 32]], "Nodule": []}, {}], letterboxes, 32, 4)
    mass = FINDINGS.index("Mass")
    assert positive.shape == (2, len(FINDINGS), 4, 4)
    assert sorted(zip(*np.nonzero(positive[0, mass]))) == [(1, 0), (1, 1)]
    assert np.nonzero(boxed)[0].tolist() == [0] and np.nonzero(boxed)[1].tolist() == [mass]
