"""Scoring one (image, finding) pair: a heatmap blob at a known place against boxes worked out by hand."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from cxr_miner.miner.evaluation import RELEASED, HalfScores, Pair, add_released, half_report, rule_boxes, score_pair
from cxr_miner.miner.rules import PAPER_RULE
from cxr_miner.storage.vocab.letterbox import Letterbox


def _pair(truth, image_id="a.png"):
    """A 64 px input of a 128 px square source (2 source px per input px): one flat blob on input
    columns 8-23 and rows 16-31, i.e. source box (16, 32, 48, 64)."""
    heatmap = np.zeros((64, 64))
    heatmap[16:32, 8:24] = 1.0
    return Pair(image_id, "Nodule", heatmap, heatmap, Letterbox.fit(128, 128, 64), 0.9, truth)


def test_a_pair_on_its_blob_is_a_hit_and_one_beside_it_a_miss():
    half = HalfScores.empty()
    score_pair(half, _pair([[16, 32, 48, 64]]), PAPER_RULE, {})
    score_pair(half, _pair([[80, 80, 112, 112]], "b.png"), PAPER_RULE, {})  # IoU 0 with the blob
    report = half_report({"cam": half})
    assert report["images"] == 2 and report["evaluated"]["Nodule"] == 2
    nodule = report["results"]["cam"]["Nodule"]["iou"]
    assert nodule[0.3]["acc"] == 0.5 and nodule[0.7]["acc"] == 0.5  # the blob's box is the truth exactly
    assert "peak-mean-prior" not in {r for r, e in half.rules.items() if e.images("Nodule")}  # no size prior given
    assert half.outcomes[PAPER_RULE.name]["Nodule"].arrays()[1].tolist() == [True, False]  # rank-1 hits


def test_released_takes_each_findings_chosen_rule_and_leaves_the_others_undefined():
    half = HalfScores.empty()
    score_pair(half, _pair([[16, 32, 48, 64]]), PAPER_RULE, {})
    report = half_report({"cam": half})
    tuning = {"findings": {"Nodule": {"method": "cam", "candidates": {"cam": {"rule": "every-mass"}}}}}
    add_released(report, tuning)
    released = report["results"][RELEASED]
    assert released["Nodule"] == report["box_rules"]["cam"]["every-mass"]["Nodule"]
    assert np.isnan(released["Mass"]["iou"][0.3]["acc"])


def test_a_pair_with_rejected_boxes_alone_gives_its_matching_boxes_as_misses_and_nothing_else():
    """Issue 25: rejected boxes are negatives. Of each rule's boxes of the blob, those whose IoU with
    a rejection of the blob's own box (16, 32, 48, 64) reaches 0.5 (torchvision's box_iou, apart)
    are misses of a pair not located; a rejection elsewhere matches none. Neither pair reaches
    Acc/AFP, MaxBoxAccV2 or the image count."""
    half = HalfScores.empty()
    score_pair(half, _pair([[16, 32, 48, 64]]), PAPER_RULE, {})
    rejected = _pair([], "r.png")._replace(rejected=[[16, 32, 48, 64]])
    score_pair(half, rejected, PAPER_RULE, {})
    score_pair(half, _pair([], "s.png")._replace(rejected=[[80, 80, 112, 112]]), PAPER_RULE, {})
    report = half_report({"cam": half})
    assert report["images"] == 1 and report["evaluated"]["Nodule"] == 1
    assert report["results"]["cam"]["Nodule"]["iou"][0.3]["acc"] == 1.0
    assert half.heatmaps.pairs == {"Nodule": 1}  # the located pair alone
    paper = half.outcomes[PAPER_RULE.name]["Nodule"]
    assert (paper.pairs, paper.units, paper.located) == (1, 3, [True, False, False])
    assert paper.arrays()[1].tolist() == [True, False] and paper.arrays()[2].tolist() == [0, 1]
    assert paper.any_hits().tolist() == [True] and paper.acc() == 1.0
    for rule, (signals, boxes) in rule_boxes(rejected, {}).items():
        iou = box_iou(torch.as_tensor(boxes, dtype=torch.float64), torch.tensor([[16.0, 32.0, 48.0, 64.0]]).double())
        expected = signals[(iou[:, 0] >= 0.5).numpy()]
        outcomes = half.outcomes[rule]["Nodule"]
        assert np.array_equal(outcomes.signals[1], expected) and not outcomes.hit[1].any(), rule
        assert outcomes.signals[2].shape == (0, 5) and outcomes.located == [True, False, False], rule
    assert len(paper.signals[1]) >= 1  # the paper's rule boxes the blob: a negative
