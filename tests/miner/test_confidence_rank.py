"""Rank 1 is the most confident box (issue 23), on a heatmap whose boxes are known by hand.

The map: a 30 x 30 plateau at 0.6 over pixels [10, 40) with a 4 x 4 core at 1.0 over [20, 24).
The paper's rule (peak components at 0.5, 0.7, 0.9, ranked by the mean inside) gives the core
first (mean 1.0) and the plateau second (mean (884 x 0.6 + 16 x 1.0) / 900 = 0.607); the lesion
is the plateau. A calibration that trusts
larger boxes (a positive weight on log area) ranks the plateau first.
"""

from __future__ import annotations

import math

import numpy as np

from cxr_miner.miner.calibration import BoxOutcomes, Calibration, box_signals, hits
from cxr_miner.miner.methods import FindingChoice
from cxr_miner.miner.rules import PAPER_RULE
from cxr_miner.storage.stages.harvest import part_rows
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox

CORE, PLATEAU = [20.0, 20.0, 24.0, 24.0], [10.0, 10.0, 40.0, 40.0]
BY_AREA = Calibration("platt", 0.0, coef=(0.0, 0.0, 1.0, 0.0, 0.0))  # sigmoid(log area): a larger box, more confident


def heatmap() -> np.ndarray:
    values = np.zeros((64, 64), dtype=np.float32)
    values[10:40, 10:40] = 0.6
    values[20:24, 20:24] = 1.0
    return values


def test_the_rules_order_puts_the_core_first():
    found = PAPER_RULE.boxes(heatmap())
    np.testing.assert_allclose(found.boxes, [CORE, PLATEAU])
    np.testing.assert_allclose(found.mean, [1.0, (884 * 0.6 + 16 * 1.0) / 900], rtol=1e-6)


def test_a_calibrated_choice_ranks_by_confidence_and_keeps_the_rules_rank():
    choice = FindingChoice("cam", PAPER_RULE, BY_AREA, operating_point=0.1)
    found = choice.score(heatmap(), probability=0.9, input_size=64, letterbox=Letterbox.fit(64, 64, 64))
    np.testing.assert_allclose(found.boxes, [PLATEAU, CORE])
    assert found.rule_rank.tolist() == [2, 1]
    # confidence sigmoid(log area share): 900 / 4096 and 16 / 4096 of the map
    np.testing.assert_allclose(found.confidence, [1 / (1 + 4096 / 900), 1 / (1 + 4096 / 16)])
    assert found.at_operating_point.tolist() == [True, False]
    rows = part_rows(["img"], [{FINDINGS.index("Mass"): found}], np.full((1, 14), 0.9), "tuned", "m")
    assert [(r["rank"], r["rule_rank"], r["x_max"]) for r in rows] == [(1, 2, 40.0), (2, 1, 24.0)]
    assert rows[0]["score"] < rows[1]["score"]  # score stays the rule's signal (the mean inside)


def test_a_choice_ranked_by_the_rule_keeps_its_order_whatever_the_confidence():
    choice = FindingChoice("cam", PAPER_RULE, BY_AREA, operating_point=0.1, order="rule")
    found = choice.score(heatmap(), probability=0.9, input_size=64, letterbox=Letterbox.fit(64, 64, 64))
    np.testing.assert_allclose(found.boxes, [CORE, PLATEAU])
    assert found.rule_rank.tolist() == [1, 2]
    np.testing.assert_allclose(found.confidence, [1 / (1 + 4096 / 16), 1 / (1 + 4096 / 900)])
    assert found.at_operating_point.tolist() == [False, True]


def test_without_a_slope_the_rules_order_stands():
    for calibration in (None, Calibration("constant", math.log(0.3 / 0.7))):
        found = FindingChoice("cam", PAPER_RULE, calibration).score(heatmap(), 0.9, 64, Letterbox.fit(64, 64, 64))
        np.testing.assert_allclose(found.boxes, [CORE, PLATEAU])
        assert found.rule_rank.tolist() == [1, 2]


def test_rank_one_accuracy_by_confidence_counts_the_plateau_as_right():
    """Scored against the plateau as the true box, the rule's rank 1 misses (IoU 16 / 900) and the
    confidence's rank 1 hits; all boxes together hit either way."""
    found = PAPER_RULE.boxes(heatmap())
    outcomes = BoxOutcomes()
    outcomes.add(box_signals(found.mean, found.peak, found.area, 0.9), hits(found.boxes, np.array([PLATEAU])))
    assert outcomes.acc() == 1.0 and outcomes.acc(rank1_only=True) == 0.0
    assert outcomes.rank1_hits(BY_AREA).tolist() == [True]


def test_prior_rules_rank_nested_centroids_by_mean_or_by_mass():
    """The plateau's and the core's centroids (heatmap-weighted, pixel centres) lie 2.6 px apart; with
    boxes of 0.05 of the image (3.2 px) both are kept. By mean the core's comes first, by mass the plateau's."""
    from cxr_miner.miner.rules import rule_by_name

    values = heatmap()
    ys, xs = np.mgrid[0:64, 0:64] + 0.5
    plateau = values >= 0.5
    centre = [
        float((values * xs)[plateau].sum() / values[plateau].sum()),
        float((values * ys)[plateau].sum() / values[plateau].sum()),
    ]
    letterbox = Letterbox.fit(64, 64, 64)
    for name, first in (("peak-mean-prior", [22.0, 22.0]), ("peak-mass-prior", centre)):
        rule = rule_by_name(name)
        _, boxes = rule.in_source(rule.boxes(values), 64, letterbox, (0.05, 0.05))
        np.testing.assert_allclose((boxes[0, :2] + boxes[0, 2:]) / 2, first, rtol=1e-6)
        assert len(boxes) == 2
