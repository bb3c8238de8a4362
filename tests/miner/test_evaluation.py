"""Scoring one (image, finding) pair: a heatmap blob at a known place against boxes worked out by hand."""

from __future__ import annotations

import numpy as np

from cxr_miner.miner.evaluation import RELEASED, HalfScores, Pair, add_released, half_report, score_pair
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
