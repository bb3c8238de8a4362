"""Boxes from synthetic heatmaps with known blobs, and heatmaps that must be refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr_miner.miner.boxes import check_heatmap, heatmap_boxes, heatmap_boxes_batched
from cxr_miner.miner.rules import (
    BOX_RULES,
    PAPER_RULE,
    RULES_BY_NAME,
    SWEEP_THRESHOLDS,
    BoxRule,
    component_table,
    rule_by_name,
    rules_by_name,
)
from cxr_miner.storage.vocab.letterbox import Letterbox


def nested_blob() -> np.ndarray:
    """Three nested plateaus around (row 5, col 6) and a separate weaker blob."""
    h = np.zeros((12, 16))
    h[2:10, 2:12] = 0.6  # rows 2..9, cols 2..11  -> box (2, 2, 12, 10)
    h[4:8, 4:9] = 0.8  # rows 4..7, cols 4..8   -> box (4, 4, 9, 8)
    h[5:6, 6:7] = 1.0  # the peak               -> box (6, 5, 7, 6)
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


def batched_as_lists(heatmaps: np.ndarray, grow: str = "dilation") -> list[tuple[list, list]]:
    found = heatmap_boxes_batched(torch.as_tensor(heatmaps, dtype=torch.float32), grow=grow)
    return [
        (found.boxes[i][found.valid[i]].tolist(), found.scores[i][found.valid[i]].tolist())
        for i in range(len(heatmaps))
    ]


@pytest.mark.parametrize("grow", ["dilation", "label"])
def test_batched_boxes_on_hand_made_maps(grow):
    flat = np.zeros((12, 16))
    flat[3:6, 4:9] = 1.0
    empty = np.zeros((12, 16))
    (nested, nested_scores), (one, one_score), (none, _) = batched_as_lists(
        np.stack([nested_blob(), flat, empty]), grow
    )
    assert nested == [[6, 5, 7, 6], [4, 4, 9, 8], [2, 2, 12, 10]]
    assert nested_scores == pytest.approx([1.0, 0.81, 0.6525])
    assert one == [[4, 3, 9, 6]] and one_score == pytest.approx([1.0])
    assert none == []


def test_batched_boxes_follow_a_winding_component():
    """A one-pixel-wide serpentine needs many dilations to fill: its box is the whole grid."""
    h = np.zeros((9, 9))
    h[0::4, :] = 0.6  # rows 0, 4, 8
    h[1:4, 8] = 0.6  # joined at the right, then at the left
    h[5:8, 0] = 0.6
    h[8, 8] = 1.0  # the peak at the far end of the path
    [(boxes, _)] = batched_as_lists(h[None])
    assert boxes == [[8, 8, 9, 9], [0, 0, 9, 9]]


def test_batched_boxes_equal_scikit_image_on_random_maps():
    """The device version against the scikit-image one, map by map: blobs of random place, size and height."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:40, 0:48]
    maps = []
    for _ in range(60):
        m = np.zeros((40, 48))
        for _ in range(rng.integers(1, 5)):
            cy, cx, s, a = rng.uniform(0, 40), rng.uniform(0, 48), rng.uniform(1.5, 8), rng.uniform(0.3, 1)
            m += a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        m = m + 0.05 * rng.random((40, 48))
        maps.append(((m - m.min()) / (m.max() - m.min())).astype(np.float32))
    for m, (boxes, scores) in zip(maps, batched_as_lists(np.stack(maps))):
        expected_boxes, expected_scores = heatmap_boxes(m.astype(np.float64))
        assert boxes == expected_boxes.tolist()
        assert scores == pytest.approx(expected_scores.tolist(), abs=1e-5)


@pytest.mark.parametrize(
    "heatmaps, message",
    [(torch.zeros(3, 4), "float \\(N, H, W\\)"), (torch.full((1, 2, 2), float("nan")), "finite")],
)
def test_bad_batches_are_refused(heatmaps, message):
    with pytest.raises(ValueError, match=message):
        heatmap_boxes_batched(heatmaps)


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


def _two_blobs() -> np.ndarray:
    """A 20 x 30 map: blob A (peak 1.0) at rows 2-7, columns 2-9, with a ring of 0.6 around its core;
    blob B (peak 0.8) at rows 12-17, columns 20-27, flat."""
    heatmap = np.zeros((20, 30))
    heatmap[2:8, 2:10] = 0.6
    heatmap[4:6, 4:8] = 1.0
    heatmap[12:18, 20:28] = 0.8
    return heatmap


def test_every_component_rule_boxes_two_separate_blobs():
    found = BoxRule("every", (0.5, 0.7, 0.9), "peak").boxes(_two_blobs())
    boxes = found.boxes.tolist()
    assert [20, 12, 28, 18] in boxes  # blob B: the peak-component rule never boxes it
    assert found.peak.tolist() == [1.0, 1.0, 0.8]
    # Blob A's core (cut at 0.7 and 0.9, one box after NMS) lies inside its ring (cut at 0.5) with
    # IoU 8/48 < 0.5, so both stay; both peak at 1.0 and the core's larger mean ranks it first.
    assert boxes == [[4, 4, 8, 6], [2, 2, 10, 8], [20, 12, 28, 18]]
    assert found.threshold.tolist() == [0.7, 0.5, 0.5]
    np.testing.assert_allclose(found.mean, [1.0, (8 * 1.0 + 40 * 0.6) / 48, 0.8])
    np.testing.assert_allclose(found.area, [8 / 600, 48 / 600, 48 / 600])
    assert PAPER_RULE.boxes(_two_blobs()).boxes.tolist() == [[4, 4, 8, 6], [2, 2, 10, 8]]


def test_mass_ranking_prefers_the_larger_nested_box_and_nms_drops_near_copies():
    heatmap = _two_blobs()
    by_mass = BoxRule("every", (0.5, 0.7, 0.9), "mass").boxes(heatmap)
    assert by_mass.boxes.tolist()[0] == [2, 2, 10, 8]  # 1.0 x 48/600 beats B's 0.8 x 48/600 and the core's 8/600
    # A near copy: thresholds 0.5 and 0.55 cut the same ring box; NMS keeps one.
    twice = BoxRule("every", (0.5, 0.55), "mass").boxes(heatmap)
    assert twice.boxes.tolist().count([2, 2, 10, 8]) == 1
    assert len(BoxRule("every", (0.5,)).boxes(np.zeros((5, 5))).boxes) == 0
    assert len(PAPER_RULE.boxes(np.zeros((5, 5))).boxes) == 0
    with pytest.raises(ValueError, match="ranking"):
        BoxRule("every", rank_by="size")
    with pytest.raises(ValueError, match="thresholds"):
        BoxRule("every", (0.7, 0.5))


def test_the_papers_rule_is_heatmap_boxes_on_random_maps():
    """peak-mean from the shared component table: the same boxes, scores and order as the
    paper's rule written directly (heatmap_boxes), flat maps and ties included."""
    rng = np.random.default_rng(3)
    for k in range(40):
        heatmap = rng.random((9, 11)) ** 3
        if k % 4 == 0:
            heatmap = np.round(heatmap, 1)  # plateaus: equal boxes at several thresholds
        boxes, scores = heatmap_boxes(heatmap)
        found = PAPER_RULE.boxes(heatmap)
        assert found.boxes.tolist() == boxes.tolist()
        np.testing.assert_allclose(found.score, scores)


def test_rules_are_named_and_round_trip():
    assert [r.name for r in BOX_RULES][:3] == ["peak-mean", "peak-mass", "every-mean"]
    assert "every-peak-from-0.5" in RULES_BY_NAME and BOX_RULES[-1].name == "region-patches"
    for rule in BOX_RULES:
        assert BoxRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="unknown box rule"):
        rule_by_name("largest")
    with pytest.raises(ValueError, match="size must be one of"):
        BoxRule(size="fixed")


def test_a_rules_name_holds_everything_that_changes_its_boxes_and_a_name_is_listed_once():
    """Rules that differ in any setting differ in name, so that tuning.json's names say which
    boxes were chosen; a list with one name twice is refused."""
    sweep = SWEEP_THRESHOLDS  # an ``every`` rule's default
    variants = [
        BoxRule("every", sweep),
        BoxRule("every", sweep, nms_iou=0.3),
        BoxRule("every", sweep, limit=5),
        BoxRule("every", (0.5, 0.9)),  # not a tail of the sweep
        BoxRule("every", sweep[3:]),  # a tail: the sweep from 0.5
        BoxRule("every"),  # the dataclass's thresholds (0.5, 0.7, 0.9): was also "every-mean-from-0.5"
        BoxRule("every", sweep, size="prior"),
        BoxRule("every", sweep, size="prior", nms_iou=0.3, limit=1),
    ]
    names = [rule.name for rule in variants]
    assert names[:6] == [
        "every-mean",
        "every-mean-nms-0.3",
        "every-mean-top-5",
        "every-mean-at-0.5-0.9",
        "every-mean-from-0.5",
        "every-mean-at-0.5-0.7-0.9",
    ]
    assert names[-1] == "every-mean-prior-nms-0.3-top-1"
    assert len(set(names)) == len(names) and set(rules_by_name(tuple(variants))) == set(names)
    with pytest.raises(ValueError, match="box rule 'every-mean-nms-0.3' is listed twice"):
        rules_by_name((*variants, BoxRule("every", sweep, nms_iou=0.3)))


def test_components_carry_their_heatmap_weighted_centres():
    """Blob A is symmetric about (x 6, y 5) at every cut (its ring spans columns 2-9 and rows 2-7,
    its core columns 4-7 and rows 4-5); blob B, flat, spans columns 20-27 and rows 12-17."""
    table = component_table(_two_blobs(), (0.5, 0.9))
    assert table.rows.boxes.tolist() == [[2, 2, 10, 8], [20, 12, 28, 18], [4, 4, 8, 6]]
    np.testing.assert_allclose(table.rows.centre, [[6, 5], [24, 15], [6, 5]])
    skewed = np.zeros((4, 4))
    skewed[1, 1:3] = [1.0, 0.5]  # centre x = (1.5 * 1.0 + 2.5 * 0.5) / 1.5
    np.testing.assert_allclose(component_table(skewed, (0.5,)).rows.centre, [[(1.5 + 1.25) / 1.5, 1.5]])


def test_prior_rules_box_the_findings_size_at_each_centroid():
    """Source 60 x 60 in a 30 px input: x2. A box size of (0.2, 0.1) is 12 x 6 source px. Blob A's
    core and ring share the centroid (6, 5) -> source (12, 10): one box (12 +- 6, 10 +- 3) after
    NMS; blob B's centroid (24, 15) -> (48, 30). The peak-component rule boxes only blob A."""
    letterbox = Letterbox.fit(60, 60, 30)
    rule = rule_by_name("every-peak-prior")
    found, source = rule.in_source(rule.boxes(_two_blobs()), 30, letterbox, (0.2, 0.1))
    np.testing.assert_allclose(source, [[6, 7, 18, 13], [42, 27, 54, 33]])
    np.testing.assert_allclose([found.mean, found.peak], [[1.0, 0.8], [1.0, 0.8]])
    paper_sized = rule_by_name("peak-mean-prior")
    np.testing.assert_allclose(
        paper_sized.in_source(paper_sized.boxes(_two_blobs()), 30, letterbox, (0.2, 0.1))[1], [[6, 7, 18, 13]]
    )
    _, clipped = rule.in_source(rule.boxes(_two_blobs()), 30, letterbox, (0.5, 0.5))  # 30 x 30 at (12, 10)
    np.testing.assert_allclose(clipped[0], [0, 0, 27, 25])
    with pytest.raises(ValueError, match="needs the finding's box size"):
        rule.in_source(rule.boxes(_two_blobs()), 30, letterbox)


def test_component_rules_map_their_boxes_through_the_letterbox():
    found, source = PAPER_RULE.in_source(PAPER_RULE.boxes(_two_blobs()), 30, Letterbox.fit(60, 60, 30))
    assert source.tolist() == [[8, 8, 16, 12], [4, 4, 20, 16]] and len(found.boxes) == 2


def test_components_are_scikit_images_8_connected_labels_on_random_maps():
    """label_components (scipy) gives scikit-image's labels, numbering included, which the rules'
    component order and the MaxBoxAccV2 boxes depend on."""
    from skimage.measure import label

    from cxr_miner.miner.boxes import label_components

    rng = np.random.default_rng(5)
    for side in (7, 32, 96):
        smooth = torch.nn.functional.interpolate(
            torch.from_numpy(rng.random((1, 1, 6, 6))), size=side, mode="bilinear"
        )[0, 0].numpy()
        for mask in (smooth >= 0.5, rng.random((side, side)) > 0.6, np.zeros((side, side), bool)):
            labels, count = label_components(mask)
            theirs, their_count = label(mask, connectivity=2, return_num=True)
            assert count == their_count and np.array_equal(labels, theirs)
