"""Box confidence: hits, Platt calibration, reliability and ECE, operating points, by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxr_miner.miner.bootstrap import LEVEL, confidence_interval, draw_weights, mean_ci, resample_draws
from cxr_miner.miner.calibration import (
    BoxOutcomes,
    Calibration,
    best_operating_point,
    box_signals,
    confidence_order,
    ece_ci,
    fit_calibration,
    hits,
    operating_point,
    pool_reliability,
    pr_curve,
    precision_interval,
    precision_recall,
    recalled_pairs,
    reliability,
    resampled_precision,
    robust_operating_point,
)


def test_a_hit_is_iou_of_at_least_0_3_with_some_true_box():
    truth = np.array([[0, 0, 10, 10], [50, 50, 60, 60]])
    boxes = np.array(
        [
            [0, 0, 10, 30],  # IoU 100 / 300 = 0.333
            [0, 0, 10, 40],  # 100 / 400 = 0.25
            [52, 50, 62, 60],  # 80 / 120 = 0.667 with the second
            [20, 20, 30, 30],
        ]
    )
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
    assert [(b["low"], b["boxes"], b["hit_rate"]) for b in result["bins"]] == [
        (0.0, 1, 0.0),
        (0.1, 2, 0.5),
        (0.9, 1, 1.0),
    ]
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


def test_the_robust_operating_point_holds_the_target_on_resamples_of_the_pairs():
    """40 pairs, one box each: the top 20 confidences hit 18 times, the next 20 hit 4 times. On the
    whole half the lowest point reaching 0.5 takes all 40 boxes (22 hits: 0.55), whose precision
    falls to 0.43 in the 5% of resamples; the robust point takes fewer boxes, its 5% quantile at 0.5 or above."""
    confidence = np.linspace(0.99, 0.6, 40)
    hit = np.array([True] * 18 + [False] * 2 + [True] * 4 + [False] * 16)
    pair = np.arange(40)

    def one_sided(at: float) -> float:  # the LEVEL quantile of the precision at ``at`` over resamples
        return float(np.quantile(resampled_precision(confidence, hit, pair, resample_draws(40), np.array([at])), LEVEL))

    loose = operating_point(confidence, hit, 0.5)
    robust = robust_operating_point(confidence, hit, pair, 40, 0.5)
    assert loose == confidence[-1] and one_sided(loose) < 0.45
    taken = int((confidence >= robust).sum())
    assert 20 < taken < 40  # fewer boxes, but more than the top 20 (which hold 0.9)
    assert 0.5 <= one_sided(robust) <= hit[:taken].mean()
    assert one_sided(confidence[taken]) < 0.5  # one box more falls below
    low, high = precision_interval(confidence, hit, pair, 40, robust)  # the reported 95% CI is wider
    assert low <= one_sided(robust) and hit[:taken].mean() <= high
    assert robust_operating_point(confidence, np.zeros(40, dtype=bool), pair, 40, 0.5) is None
    assert robust_operating_point(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=int), 0) is None


def _lower_precision_by_hand(confidence, hit, pair, pairs, at):
    """The LEVEL quantile over the 1,000 seeded resamples of the precision of the boxes >= ``at``,
    a resample at a time (a resample that takes no box: 0)."""
    values = []
    for draw in resample_draws(pairs):
        counts = np.bincount(draw, minlength=pairs)[pair]  # each box counted as often as its pair is drawn
        taken = counts * (confidence >= at)
        values.append(float((taken * hit).sum() / taken.sum()) if taken.sum() else 0.0)
    return float(np.quantile(values, LEVEL))


def test_where_no_confidence_reaches_the_target_the_best_achievable_point_is_the_highest_robust_precision():
    """40 pairs, one box each, confidence falling, every third box a hit (1/3 at every depth, the top
    two of three hits): no level's precision reaches 0.5 in 95% of resamples, and the best point is
    the level whose 5% quantile is the highest, the lowest such level on a tie; checked against the
    quantile recomputed a resample at a time."""
    confidence = np.linspace(0.99, 0.6, 40)
    hit = np.arange(40) % 3 == 0
    pair = np.arange(40)
    assert robust_operating_point(confidence, hit, pair, 40, 0.5) is None
    at, precision = best_operating_point(confidence, hit, pair, 40)
    by_hand = [_lower_precision_by_hand(confidence, hit, pair, 40, c) for c in confidence]
    assert precision == pytest.approx(max(by_hand)) and 0 < precision < 0.5
    assert at == confidence[max(k for k, v in enumerate(by_hand) if v == pytest.approx(max(by_hand)))]
    assert best_operating_point(confidence, np.zeros(40, dtype=bool), pair, 40) is None  # no hit: nothing to state
    assert best_operating_point(np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0, dtype=int), 0) is None


def test_the_reported_intervals_are_the_2_5_and_97_5_percentiles_of_1000_seeded_resamples():
    """Precision, recall and ECE: each 95% CI equals the percentiles of the figure recomputed from
    scratch (precision_recall, reliability) on 1,000 resamples of the pairs drawn with seed 0."""
    rng = np.random.default_rng(3)
    pair = np.repeat(np.arange(30), 2)  # 30 pairs, two boxes each
    confidence, hit = rng.uniform(0, 1, 60), rng.uniform(0, 1, 60) < 0.4
    draws = np.random.default_rng(0).integers(0, 30, size=(1000, 30))
    precision, recall, ece = [], [], []
    for draw in draws:
        boxes = np.concatenate([np.flatnonzero(pair == p) for p in draw])
        renumbered = np.repeat(np.arange(30), 2)  # each drawn pair counts as a pair of its own
        figures = precision_recall(confidence[boxes], hit[boxes], renumbered, 30, 0.5)
        precision.append(figures["precision"])
        recall.append(figures["recall"])
        ece.append(reliability(confidence[boxes], hit[boxes])["ece"])
    expected = {k: np.quantile(v, [0.025, 0.975]) for k, v in (("p", precision), ("r", recall), ("e", ece))}
    assert np.allclose(precision_interval(confidence, hit, pair, 30, 0.5), expected["p"])
    assert np.allclose(mean_ci(recalled_pairs(confidence, hit, pair, 30, 0.5)), expected["r"])
    assert np.allclose(ece_ci(confidence, hit, pair, 30), expected["e"])


def test_confidence_order_ranks_highest_first_and_keeps_the_rules_order_on_ties():
    assert confidence_order(np.array([0.2, 0.7, 0.2, 0.9])).tolist() == [3, 1, 0, 2]
    assert confidence_order(np.array([0.4, 0.4, 0.4])).tolist() == [0, 1, 2]  # a constant calibration: the rule's order
    assert confidence_order(np.array([math.nan, math.nan])).tolist() == [0, 1]  # no confidence: the rule's order


def test_rank_one_by_confidence_can_be_right_where_the_rules_rank_one_is_wrong():
    """Two pairs, boxes in the rule's order: the rule's rank 1 misses in both; a calibration that
    trusts larger boxes (log area, signal 2) puts the hit first in the first pair only."""
    small, large = [0.9, 1.0, math.log(0.01), 1, 0.8], [0.6, 1.0, math.log(0.2), 2, 0.8]
    outcomes = BoxOutcomes()
    outcomes.add(np.array([small, large]), np.array([False, True]))
    outcomes.add(np.array([small, [0.6, 1.0, math.log(0.005), 2, 0.8]]), np.array([False, True]))
    by_area = Calibration("platt", 0.0, coef=(0.0, 0.0, 1.0, 0.0, 0.0))
    assert outcomes.rank1_hits().tolist() == [False, False] and outcomes.acc(rank1_only=True) == 0.0
    assert outcomes.rank1_hits(by_area).tolist() == [True, False]
    assert outcomes.rank1_hits(Calibration("constant", 0.3)).tolist() == [False, False]  # ties: the rule's order
    assert outcomes.any_hits().tolist() == [True, True]


def test_precision_recall_counts_pairs_once():
    confidence, hit, pair = np.array([0.9, 0.8, 0.3]), np.array([1, 1, 0], dtype=bool), np.array([0, 0, 1])
    assert precision_recall(confidence, hit, pair, pairs=4, at=0.5) == {
        "boxes": 2,
        "precision": 1.0,
        "recall": 0.25,
        "afp": 0.0,
    }
    # at 0.3 the miss of pair 1 is taken too: 1 false positive over 4 pairs
    assert precision_recall(confidence, hit, pair, pairs=4, at=0.3) == {
        "boxes": 3,
        "precision": 2 / 3,
        "recall": 0.25,
        "afp": 0.25,
    }
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


def test_a_pair_of_rejected_boxes_counts_in_precision_and_ece_but_not_in_acc_recall_or_afp():
    """Pairs 0 and 2 located (pair 0: a hit and a miss; pair 2: a miss), pair 1 a reviewer's
    rejection (one box, a miss). All four boxes at confidence 0.8: precision 1/4 (1/3 without the
    rejection), recall 1/2, AFP 2 misses / 2 located pairs = 1, Acc 1/2; ECE |0.8 - 1/4| = 0.55."""
    from cxr_miner.miner.tuning import figures

    outcomes = BoxOutcomes()
    outcomes.add(np.zeros((2, 5)), [True, False])
    outcomes.add(np.zeros((1, 5)), [False], located=False)
    outcomes.add(np.zeros((1, 5)), [False])
    assert (outcomes.pairs, outcomes.units) == (2, 3)
    assert outcomes.any_hits().tolist() == [True, False] and outcomes.acc() == 0.5
    assert outcomes.arrays()[2].tolist() == [0, 0, 1, 2]
    constant = Calibration("constant", math.log(0.8 / 0.2))
    row = figures(outcomes, constant, at=0.5, curves=True)
    assert (row["pairs"], row["rejected_pairs"], row["boxes"], row["acc"]) == (2, 1, 4, 0.5)
    point = row["at_operating_point"]
    assert point["boxes"] == 4 and math.isclose(point["precision"], 0.25)
    assert point["recall"] == 0.5 and point["afp"] == 1.0
    assert math.isclose(row["reliability"]["ece"], 0.55)
    located_only = BoxOutcomes()
    located_only.add(np.zeros((2, 5)), [True, False])
    located_only.add(np.zeros((1, 5)), [False])
    assert math.isclose(figures(located_only, constant, at=0.5, curves=False)["at_operating_point"]["precision"], 1 / 3)
    # the precision interval resamples all three pairs: a resample's precision is hits / boxes of its draws
    draws = resample_draws(3)
    counts = draw_weights(draws, 3)
    expected = confidence_interval(counts[:, 0] / (2 * counts[:, 0] + counts[:, 1] + counts[:, 2]))
    assert np.allclose(point["precision_interval"], expected)
