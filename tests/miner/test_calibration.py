"""Box confidence: hits, Platt calibration, reliability and ECE, operating points, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_miner.miner.calibration import (
    BoxOutcomes,
    Calibration,
    box_signals,
    fit_calibration,
    hits,
    operating_point,
    pool_reliability,
    pr_curve,
    precision_recall,
    reliability,
)


def test_a_hit_is_iou_of_at_least_0_3_with_some_true_box():
    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60]])
    boxes = np.array([[0, 0, 10, 30],  # IoU 100 / 300 = 0.333
                      [0, 0, 10, 40],  # 100 / 400 = 0.25
                      [52, 50, 62, 60],  # 80 / 120 = 0.667 with the second
                      [20, 20, 30, 30]])
    assert hits(boxes, truth).tolist() == [True, False, True, False]


def test_box_signals_and_outcomes():
    signals = box_signals(np.array([0.9, 0.6]), np.array([1.0, 0.8]), np.array([0.01, 0.04]), 0.7)
    np.testing.assert_allclose(signals, [[0.9, 1.0, math.log(0.01), 1, 0.7], [0.6, 0.8, math.log(0.04), 2, 0.7]])
    outcomes = BoxOutcomes()
    outcomes.add(signals, np.array([False, True]))  # hit at rank 2 only
    outcomes.add(signals[:1], np.array([True]))
    outcomes.add(signals[:0], np.zeros(0, dtype=bool))  # no box: a miss
    assert outcomes.acc() == pytest.approx(2 / 3) and outcomes.acc(rank1_only=True) == pytest.approx(1 / 3)
    all_signals, hit, pair = outcomes.arrays()
    assert all_signals.shape == (3, 5) and hit.tolist() == [False, True, True] and pair.tolist() == [0, 0, 1]


def test_reliability_diagram_and_ece_by_hand():
    result = reliability(np.array([0.05, 0.15, 0.15, 0.95]), np.array([0, 1, 0, 1], dtype=bool))
    assert [(b["low"], b["boxes"], b["hit_rate"]) for b in result["bins"]] == [(0.0, 1, 0.0), (0.1, 2, 0.5), (0.9, 1, 1.0)]
    # 1/4 |0.05 - 0| + 2/4 |0.15 - 0.5| + 1/4 |0.95 - 1| = 0.0125 + 0.175 + 0.0125
    assert result["ece"] == pytest.approx(0.2)
    assert reliability(np.array([1.0]), np.array([True]))["bins"][0]["low"] == 0.9  # 1.0 falls in the last bin


def test_pooled_reliability_is_that_of_all_the_boxes_together():
    rng = np.random.default_rng(5)
    parts = [(rng.random(n), rng.random(n) < 0.6) for n in (7, 30, 1)]
    pooled = pool_reliability(reliability(c, h) for c, h in parts)
    together = reliability(np.concatenate([c for c, _ in parts]), np.concatenate([h for _, h in parts]))
    assert pooled["boxes"] == together["boxes"] == 38
    assert pooled["ece"] == pytest.approx(together["ece"])
    for mine, theirs in zip(pooled["bins"], together["bins"], strict=True):
        assert mine == pytest.approx(theirs)
    assert math.isnan(pool_reliability([])["ece"])


def test_operating_point_is_the_lowest_confidence_reaching_the_target():
    confidence = np.array([0.5, 0.9, 0.7, 0.8, 0.6])
    hit = np.array([0, 1, 1, 0, 0], dtype=bool)
    # sorted: 0.9 hit, 0.8 miss, 0.7 hit, 0.6 miss, 0.5 miss -> precision 1, .5, .667, .5, .4
    assert operating_point(confidence, hit, 0.5) == 0.6
    assert operating_point(confidence, hit, 0.6) == 0.7
    assert operating_point(confidence, hit, 1.0) == 0.9
    # tied confidences are taken together: 0.8 (hit) and 0.8 (miss) -> 0.5 only
    assert operating_point(np.array([0.8, 0.8, 0.4]), np.array([1, 0, 0], dtype=bool), 0.6) is None
    assert operating_point(np.array([0.8, 0.8, 0.4]), np.array([1, 0, 0], dtype=bool), 0.5) == 0.8
    assert operating_point(np.zeros(0), np.zeros(0, dtype=bool)) is None


def test_precision_recall_counts_pairs_once():
    confidence, hit, pair = np.array([0.9, 0.8, 0.3]), np.array([1, 1, 0], dtype=bool), np.array([0, 0, 1])
    assert precision_recall(confidence, hit, pair, pairs=4, at=0.5) == {"boxes": 2, "precision": 1.0, "recall": 0.25}
    assert math.isnan(precision_recall(confidence, hit, pair, pairs=4, at=0.95)["precision"])
    curve = pr_curve(confidence, hit, pair, pairs=4)
    assert [(p["confidence"], p["boxes"]) for p in curve] == [(0.9, 1), (0.8, 2), (0.3, 3)]


def test_platt_scaling_is_calibrated_on_fresh_boxes_and_falls_back_to_a_rate():
    rng = np.random.default_rng(0)

    def sample(n):
        mean, peak, area = rng.random(n), rng.random(n), rng.uniform(0.001, 0.2, n)
        signals = np.column_stack([mean, peak, np.log(area), rng.integers(1, 4, n), rng.random(n)])
        truth = 1 / (1 + np.exp(-(4 * mean - 2)))  # only the mean matters
        return signals, rng.random(n) < truth

    signals, hit = sample(4000)
    calibration = fit_calibration(signals, hit)
    assert calibration.kind == "platt" and calibration.boxes == 4000
    assert abs(calibration.coef[0]) > 5 * max(abs(c) for c in calibration.coef[1:])
    fresh, fresh_hit = sample(4000)
    confidence = calibration.predict(fresh)
    assert reliability(confidence, fresh_hit)["ece"] < 0.03
    assert reliability(np.full(len(fresh_hit), 0.9), fresh_hit)["ece"] > 0.3  # an uncalibrated constant is not
    assert Calibration.from_dict(calibration.to_dict()) == calibration

    few = fit_calibration(signals[:10], np.array([1, 1, 1] + [0] * 7, dtype=bool))
    assert few.kind == "constant"
    np.testing.assert_allclose(few.predict(signals[:2]), [4 / 12, 4 / 12])  # (3 + 1) / (10 + 2)
    with pytest.raises(ValueError, match="signals"):
        Calibration.from_dict({**calibration.to_dict(), "signals": ["mean"]})
