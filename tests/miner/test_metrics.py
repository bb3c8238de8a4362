"""IoU, IoR, Acc, AFP, the AFP-bounded selection and ROC AUC on cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cxr_miner.miner.metrics import AUCAccumulator, LocalizationEvaluator, best_overlap, box_ior, roc_auc

GT = [[0, 0, 10, 10]]


@pytest.mark.parametrize(
    "box, iou, ior",
    [
        ([0, 0, 10, 10], 1.0, 1.0),
        ([5, 0, 15, 10], 50 / 150, 0.5),  # half overlaps: inter 50, union 150, own area 100
        ([2, 2, 4, 4], 4 / 100, 1.0),  # inside the truth: IoR 1, IoU 0.04
        ([0, 0, 20, 20], 100 / 400, 0.25),  # contains the truth
        ([20, 20, 30, 30], 0.0, 0.0),  # disjoint
        ([10, 0, 20, 10], 0.0, 0.0),  # touching edge: no area in common
    ],
)
def test_overlaps_by_hand(box, iou, ior):
    assert best_overlap([box], GT, "iou") == pytest.approx([iou])
    assert best_overlap([box], GT, "ior") == pytest.approx([ior])


def test_best_overlap_takes_the_best_truth_and_handles_empty():
    truth = [[0, 0, 10, 10], [20, 0, 30, 10]]
    assert best_overlap([[20, 0, 30, 10], [40, 40, 50, 50]], truth, "iou").tolist() == [1.0, 0.0]
    assert best_overlap(np.zeros((0, 4)), truth, "iou").shape == (0,)
    assert box_ior(
        torch.tensor([[1.0, 1.0, 1.0, 5.0]], dtype=torch.float64), torch.tensor([[0.0, 0, 9, 9]], dtype=torch.float64)
    ).tolist() == [[0.0]]
    with pytest.raises(ValueError, match="xyxy"):
        best_overlap([[5, 5, 1, 1]], truth, "iou")


def test_acc_and_afp_by_hand():
    evaluator = LocalizationEvaluator(iou_thresholds=(0.1, 0.5), ior_thresholds=(0.5,))
    evaluator.accumulate("Mass", [[0, 0, 10, 10], [50, 50, 60, 60]], GT)  # IoU 1.0 and 0.0
    evaluator.accumulate("Mass", [[5, 0, 15, 10]], GT)  # IoU 1/3, IoR 0.5
    evaluator.accumulate("Mass", np.zeros((0, 4)), GT)  # nothing predicted
    table = evaluator.compute()["Mass"]
    assert table["images"] == 3

    def acc_afp(cell: dict) -> dict:
        return {k: cell[k] for k in ("acc", "afp")}

    # T = 0.1: hits in images 1 and 2, one false positive (image 1's second box)
    assert acc_afp(table["iou"][0.1]) == {"acc": pytest.approx(2 / 3), "afp": pytest.approx(1 / 3)}
    # T = 0.5: only image 1 hits; false positives: image 1's second box and image 2's box
    assert acc_afp(table["iou"][0.5]) == {"acc": pytest.approx(1 / 3), "afp": pytest.approx(2 / 3)}
    # IoR > 0.5: image 2's IoR is exactly 0.5, not a hit
    assert acc_afp(table["ior"][0.5]) == {"acc": pytest.approx(1 / 3), "afp": pytest.approx(2 / 3)}
    # Acc's 95% CI: the 2.5 and 97.5 percentiles of Acc on 1,000 resamples of the 3 images (seed 0)
    draws = np.random.default_rng(0).integers(0, 3, size=(1000, 3))
    resampled = np.array([1.0, 1.0, 0.0])[draws].mean(axis=1)
    assert table["iou"][0.1]["acc_ci"] == pytest.approx(np.quantile(resampled, [0.025, 0.975]).tolist())
    empty = evaluator.compute()["Nodule"]
    assert empty["images"] == 0 and math.isnan(empty["iou"][0.1]["acc"])


def test_evaluation_needs_ground_truth():
    with pytest.raises(ValueError, match="only if it has a ground-truth box"):
        LocalizationEvaluator().accumulate("Mass", GT, np.zeros((0, 4)))
    with pytest.raises(ValueError, match="unknown finding"):
        LocalizationEvaluator().accumulate("Growth", GT, GT)


def test_select_until_afp_takes_ranks_across_images():
    evaluator = LocalizationEvaluator()
    # image A: rank 1 misses, rank 2 hits; image B: rank 1 hits, rank 2 misses; image C: rank 1 misses
    evaluator.accumulate("Mass", [[50, 50, 60, 60], [0, 0, 10, 10]], GT)
    evaluator.accumulate("Mass", [[0, 0, 10, 10], [50, 50, 60, 60]], GT)
    evaluator.accumulate("Mass", [[50, 50, 60, 60]], GT)
    # order: A1 (fp), B1 (hit), C1 (fp), A2 (hit), B2 (fp)
    assert evaluator.select_until_afp("Mass", 0.5, afp_bound=0.34) == {
        "acc": pytest.approx(1 / 3),
        "afp": pytest.approx(1 / 3),
        "boxes": 2,
    }
    assert evaluator.select_until_afp("Mass", 0.5, afp_bound=2 / 3) == {
        "acc": pytest.approx(2 / 3),
        "afp": pytest.approx(2 / 3),
        "boxes": 4,
    }
    assert evaluator.select_until_afp("Mass", 0.5, afp_bound=1.0) == {
        "acc": pytest.approx(2 / 3),
        "afp": pytest.approx(1.0),
        "boxes": 5,
    }
    assert math.isnan(evaluator.select_until_afp("Nodule", 0.5, 1.0)["acc"])


def test_roc_auc_by_hand():
    # pairs (positive, negative): (0.35 vs 0.1) win, (0.35 vs 0.4) lose, (0.8 vs both) win -> 3/4
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert roc_auc([0.5, 0.5], [0, 1]) == pytest.approx(0.5)  # a tie counts half
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_auc_accumulator_over_batches():
    accumulator = AUCAccumulator(findings=("a", "b"))
    accumulator.accumulate([[0.1, 0.9], [0.4, 0.1]], [[0, 1], [0, 0]])
    accumulator.accumulate([[0.35, 0.2], [0.8, 0.3]], [[1, 0], [1, 1]])
    auc = accumulator.compute()
    assert auc["a"] == pytest.approx(0.75)
    # b: positives 0.9, 0.3; negatives 0.1, 0.2 -> all four pairs won
    assert auc["b"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"must both be \(N, 2\)"):
        accumulator.accumulate([[0.1]], [[1]])


def test_component_boxes_finds_every_blob_in_pixel_edges():
    from cxr_miner.miner.metrics import component_boxes

    heatmap = np.zeros((10, 12))
    heatmap[1:3, 2:5] = 0.8  # rows 1-2, columns 2-4
    heatmap[6:9, 8:11] = 0.6
    heatmap[4, 4] = 0.9  # a blob of its own: row 4 is not adjacent to row 2
    boxes = component_boxes(heatmap, 0.5)
    assert sorted(map(tuple, boxes.tolist())) == [(2, 1, 5, 3), (4, 4, 5, 5), (8, 6, 11, 9)]
    assert component_boxes(heatmap, 0.85).tolist() == [[4, 4, 5, 5]]


def test_one_labelling_of_the_stacked_masks_gives_each_thresholds_components_in_order():
    """component_boxes_by_threshold against component_boxes called threshold by threshold, on
    random smooth maps with several blobs per threshold (order included)."""
    import torch

    from cxr_miner.miner.metrics import MAXBOXACC_THRESHOLDS, component_boxes, component_boxes_by_threshold

    rng = np.random.default_rng(7)
    many = 0
    for size in (16, 33):
        coarse = torch.from_numpy(rng.random((1, 1, 6, 6)))
        heatmap = torch.nn.functional.interpolate(coarse, size=size, mode="bilinear")[0, 0].numpy()
        stacked = component_boxes_by_threshold(heatmap, MAXBOXACC_THRESHOLDS)
        assert len(stacked) == len(MAXBOXACC_THRESHOLDS)
        for tau, boxes in zip(MAXBOXACC_THRESHOLDS, stacked):
            np.testing.assert_array_equal(boxes, component_boxes(heatmap, tau))
            many += len(boxes) > 1
    assert many > 0  # some threshold splits a map into several components


def test_max_box_acc_v2_worked_by_hand():
    """Two pairs. Pair 1: a blob of 4 x 4 pixels (value 1) with a 2-pixel ring of 0.5 around it; the
    truth is the 4 x 4 core: tau > 0.5 gives IoU 1 (hits every delta), tau <= 0.5 the 8 x 8 box,
    IoU 16/64 = 0.25 (no hit). Pair 2: the truth lies where the heatmap is 0: never a hit.
    So BoxAcc peaks at 1/2 for every delta and MaxBoxAccV2 = 0.5."""
    from cxr_miner.miner.metrics import MaxBoxAccumulator

    heatmap = np.zeros((16, 16))
    heatmap[2:10, 2:10] = 0.5
    heatmap[4:8, 4:8] = 1.0
    accumulator = MaxBoxAccumulator()
    accumulator.accumulate("Mass", heatmap, [[4, 4, 8, 8]])
    accumulator.accumulate("Mass", heatmap, [[12, 12, 16, 16]])
    mass = accumulator.compute()["Mass"]
    assert mass["pairs"] == 2 and mass["max_box_acc_v2"] == 0.5
    assert {d: v["box_acc"] for d, v in mass["per_iou"].items()} == {0.3: 0.5, 0.5: 0.5, 0.7: 0.5}
    assert all(v["threshold"] > 0.5 for v in mass["per_iou"].values())  # the first tau that isolates the core

    # The 8 x 8 box as truth is hit exactly at tau <= 0.5; above, the core's IoU with it is 16/64 = 0.25,
    # below every delta. So the best tau for each delta is at most 0.5.
    ring = MaxBoxAccumulator()
    ring.accumulate("Mass", heatmap, [[2, 2, 10, 10]])
    assert ring.compute()["Mass"]["max_box_acc_v2"] == 1.0
    assert all(v["threshold"] <= 0.5 for v in ring.compute()["Mass"]["per_iou"].values())
    assert math.isnan(ring.compute()["Nodule"]["max_box_acc_v2"])


def test_max_box_acc_maps_boxes_to_the_truth_grid():
    """A heatmap at 1/4 of the source resolution: boxes are scaled by 4 before they meet the truth."""
    from cxr_miner.miner.metrics import MaxBoxAccumulator

    heatmap = np.zeros((8, 8))
    heatmap[2:4, 1:3] = 1.0
    accumulator = MaxBoxAccumulator(ious=(0.7,))
    accumulator.accumulate("Nodule", heatmap, [[4, 8, 12, 16]], to_truth_grid=lambda boxes: boxes * 4)
    assert accumulator.compute()["Nodule"]["max_box_acc_v2"] == 1.0
    unmapped = MaxBoxAccumulator(ious=(0.7,))
    unmapped.accumulate("Nodule", heatmap, [[4, 8, 12, 16]])
    assert unmapped.compute()["Nodule"]["max_box_acc_v2"] == 0.0


def test_max_box_acc_is_the_per_threshold_definition_on_random_maps():
    """The accumulator's one IoU matrix over all thresholds gives what the definition computes
    threshold by threshold, with scikit-image's components and torchvision's IoU."""
    import torch
    from scipy.ndimage import find_objects
    from skimage.measure import label
    from torchvision.ops import box_iou

    from cxr_miner.miner.metrics import MAXBOXACC_IOUS, MAXBOXACC_THRESHOLDS, MaxBoxAccumulator

    rng = np.random.default_rng(3)
    accumulator, hits = MaxBoxAccumulator(), np.zeros((len(MAXBOXACC_THRESHOLDS), len(MAXBOXACC_IOUS)))
    for _ in range(6):
        heatmap = torch.nn.functional.interpolate(torch.from_numpy(rng.random((1, 1, 5, 5))), size=40, mode="bilinear")[
            0, 0
        ].numpy()
        truth = np.sort(rng.integers(0, 40, (2, 2, 2)), axis=1).transpose(0, 2, 1).reshape(2, 4)[:, [0, 2, 1, 3]] + [
            0,
            0,
            1,
            1,
        ]
        accumulator.accumulate("Nodule", heatmap, truth)
        normalised = (heatmap - heatmap.min()) / (heatmap.max() - heatmap.min())
        for i, tau in enumerate(MAXBOXACC_THRESHOLDS):
            spans = find_objects(label(normalised >= tau, connectivity=2))
            boxes = torch.tensor([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in spans], dtype=torch.float64)
            best = box_iou(boxes, torch.as_tensor(truth, dtype=torch.float64)).max().item()
            hits[i] += [best >= delta for delta in MAXBOXACC_IOUS]
    ours = accumulator.compute()["Nodule"]
    accuracy = hits / 6
    assert ours["max_box_acc_v2"] == pytest.approx(accuracy.max(axis=0).mean())
    assert [ours["per_iou"][d]["threshold"] for d in MAXBOXACC_IOUS] == [
        MAXBOXACC_THRESHOLDS[k] for k in accuracy.argmax(axis=0)
    ]
