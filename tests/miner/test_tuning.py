"""The per-finding choice on box-val: box-size priors, and a prior rule's size recorded with it."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_miner.miner.calibration import BoxOutcomes, Calibration
from cxr_miner.miner.methods import FindingChoice
from cxr_miner.miner.rules import PAPER_RULE, rule_by_name
from cxr_miner.miner.tuning import box_size_priors, chosen_entries, released_figures, tune


def test_box_size_priors_are_medians_of_the_given_images_boxes_as_fractions():
    truth = {
        "a": {"Nodule": [[0, 0, 10, 20]], "Mass": [[0, 0, 50, 50]]},
        "b": {"Nodule": [[5, 5, 25, 15], [0, 0, 40, 40]]},
        "c": {"Nodule": [[0, 0, 100, 100]]},  # box-test: not given
        "d": {"Mass": [[0, 0, 1, 1]]},  # no size known: left out
    }
    sizes = {"a": (100, 100), "b": (200, 100), "c": (100, 100)}
    # Nodule: (0.1, 0.2), (0.1, 0.1), (0.2, 0.4) -> medians (0.1, 0.2); Mass: (0.5, 0.5)
    assert box_size_priors(truth, ["a", "b", "d"], sizes) == {"Mass": (0.5, 0.5), "Nodule": (0.1, 0.2)}


def _outcomes(hits_by_pair: list[list[bool]]) -> BoxOutcomes:
    outcomes = BoxOutcomes()
    for hit in hits_by_pair:
        outcomes.add(np.tile([0.5, 0.9, -3.0, 1.0, 0.8], (len(hit), 1)), hit)
    return outcomes


def test_a_winning_prior_rule_is_recorded_with_the_findings_box_size():
    """Box-val: the paper's rule hits 1 pair of 4, peak-mean-prior 4 of 4; the size goes with it."""
    val = {
        "cam": {
            PAPER_RULE.name: {"Nodule": _outcomes([[True], [False], [False], [False]])},
            "peak-mean-prior": {"Nodule": _outcomes([[True]] * 4)},
        }
    }
    test = {"cam": {"peak-mean-prior": {"Nodule": _outcomes([[True], [False]])}}}
    tuning = tune(val, test, ["cam"], ["Nodule", "Mass"], box_sizes={"Nodule": (0.1, 0.2)})
    nodule, mass = (tuning["findings"][f]["candidates"]["cam"] for f in ("Nodule", "Mass"))
    assert (nodule["rule"], nodule["box_size"], nodule["box_test"]["acc"]) == ("peak-mean-prior", [0.1, 0.2], 0.5)
    assert (mass["rule"], mass["box_size"]) == (PAPER_RULE.name, None)
    released = released_figures(chosen_entries(tuning))  # Mass has no box-test pair: Nodule alone
    assert (list(released["findings"]), released["mean_acc"], released["calibration"]["boxes"]) == (["Nodule"], 0.5, 2)
    assert released["calibration"]["ece"] == nodule["box_test"]["reliability"]["ece"]


def test_a_finding_choice_with_a_prior_rule_needs_and_keeps_its_box_size():
    choice = FindingChoice("cam", rule_by_name("every-peak-prior"), box_size=(0.1, 0.2))
    assert FindingChoice.from_dict(choice.to_dict()) == choice
    with pytest.raises(ValueError, match="needs a box size"):
        FindingChoice("cam", rule_by_name("every-peak-prior"))


def _hits(pattern: str) -> BoxOutcomes:
    """One box per pair; ``pattern`` a string of 1 (hit) and 0 (miss), one per pair."""
    return _outcomes([[c == "1"] for c in pattern])


def test_the_baseline_is_kept_unless_beaten_beyond_box_vals_noise():
    """20 box-val pairs. The CAM baseline's paper rule hits 10; another rule of it 12 (two pairs more:
    within the noise); AM t = 2 by the paper's rule 18 (beyond it). Box-test: the released AM t = 2
    hits 7 of 8 pairs, the baseline 3 of 8."""
    base, near, far = "1" * 10 + "0" * 10, "1" * 12 + "0" * 8, "1" * 18 + "00"
    val = {
        "cam": {PAPER_RULE.name: {"Mass": _hits(base)}, "every-mean": {"Mass": _hits(near)}},
        "am-t2": {PAPER_RULE.name: {"Mass": _hits(far)}},
    }
    test = {
        "cam": {PAPER_RULE.name: {"Mass": _hits("11100000")}},
        "am-t2": {PAPER_RULE.name: {"Mass": _hits("11111110")}},
    }
    only_cam = tune({"cam": val["cam"]}, test, ["cam"], ["Mass"])["findings"]["Mass"]
    assert (only_cam["method"], only_cam["candidates"]["cam"]["rule"]) == ("cam", PAPER_RULE.name)
    assert 0.5 < only_cam["choice"]["stability"] <= 1  # most resamples keep the baseline too

    entry = tune(val, test, ["cam", "am-t2"], ["Mass"])["findings"]["Mass"]
    assert (entry["method"], entry["candidates"]["am-t2"]["rule"]) == ("am-t2", PAPER_RULE.name)
    assert entry["choice"]["default"] == ["cam", PAPER_RULE.name]
    # scores: Acc + rank-1 Acc (one box a pair: twice the hit rate)
    assert (entry["choice"]["score"], entry["choice"]["default_score"]) == (pytest.approx(1.8), pytest.approx(1.0))
    assert entry["choice"]["stability"] > 0.8
    against = entry["baseline"]["released_minus_baseline"]
    assert entry["baseline"]["box_test"]["acc"] == 3 / 8 and against["difference"] == pytest.approx(0.5)
    low, high = against["interval"]
    assert 0 < low < 0.5 < high <= 1


def test_a_contest_keeps_its_default_until_the_lead_clears_the_resampled_noise():
    from cxr_miner.miner.bootstrap import Contest, resample_draws

    draws = resample_draws(10)
    scores = {
        "default": np.array([1.0] * 5 + [0.0] * 5),
        "level": np.array([1.0] * 5 + [0.0] * 5),
        "one more": np.array([1.0] * 6 + [0.0] * 4),
        "all": np.ones(10),
        "short": np.ones(3),
    }
    contest = Contest(scores, draws)
    assert contest.winner("default", ["level", "one more", "short"]) == "default"
    assert contest.winner("default", ["one more", "all"]) == "all"
    # "one more" leads by pair 5 alone, which 0.9 ** 10 = 35% of the resamples leave out: the 5%
    # quantile of its lead is 0, so its margin is its whole lead
    assert contest.margin("one more", "default") == pytest.approx(contest.point["one more"] - contest.point["default"])
    assert contest.margin("all", "default") < 0.5


def test_released_figures_carry_95_percent_cis_from_each_findings_pairs_resampled_apart():
    """Two findings on box-test (Mass 1 of 4 pairs, Nodule 3 of 5, one box each): a finding's Acc CI
    is the 2.5 and 97.5 percentiles of its Acc on 1,000 resamples of its pairs (seed 0); the mean's
    CI resamples each finding apart with those same draws; few pairs are flagged."""
    val = {"cam": {PAPER_RULE.name: {"Mass": _hits("1100"), "Nodule": _hits("1010")}}}
    test = {"cam": {PAPER_RULE.name: {"Mass": _hits("1000"), "Nodule": _hits("11010")}}}
    released = released_figures(chosen_entries(tune(val, test, ["cam"], ["Mass", "Nodule"])))
    resampled = {
        f: np.array([c == "1" for c in p], dtype=float)[np.random.default_rng(0).integers(0, len(p), (1000, len(p)))]
        for f, p in (("Mass", "1000"), ("Nodule", "11010"))
    }
    for finding, draws in resampled.items():
        expected = np.quantile(draws.mean(axis=1), [0.025, 0.975])
        assert released["findings"][finding]["acc_ci"] == pytest.approx(expected.tolist())
        assert released["findings"][finding]["few_pairs"]  # under 20 pairs
    mean = (resampled["Mass"].mean(axis=1) + resampled["Nodule"].mean(axis=1)) / 2
    assert released["mean_acc"] == pytest.approx((0.25 + 0.6) / 2)
    assert released["mean_acc_ci"] == pytest.approx(np.quantile(mean, [0.025, 0.975]).tolist())
    low, high = released["calibration"]["ece_ci"]
    assert low <= released["calibration"]["ece"] <= high


def test_every_finding_gets_an_operating_point_or_a_stated_reason():
    """One box per pair, all with the same signals (one confidence level): Nodule hits 36 of 40 pairs
    (precision 0.9: the target holds), Mass 14 of 40 (0.35: below 0.5 on every resample, but above 0
    on 95% of them: the best achievable, its precision stated), Effusion none (nothing to state)."""
    val = {
        "cam": {
            PAPER_RULE.name: {
                "Nodule": _hits("1" * 36 + "0" * 4),
                "Mass": _hits("100" * 13 + "1"),
                "Effusion": _hits("0" * 40),
            }
        }
    }
    tuning = tune(val, val, ["cam"], ["Nodule", "Mass", "Effusion"])
    nodule, mass, effusion = (tuning["findings"][f]["candidates"]["cam"] for f in ("Nodule", "Mass", "Effusion"))
    assert nodule["operating_point_kind"] == "target" and nodule["operating_point"] is not None
    assert nodule["operating_point_precision"] >= 0.5
    assert mass["operating_point_kind"] == "best achievable" and mass["operating_point"] is not None
    assert 0 < mass["operating_point_precision"] < 0.35  # the 5% quantile of 14/40's resamples
    assert "below the target" in mass["operating_point_note"]
    assert mass["box_test"]["at_operating_point"]["boxes"] == 40  # its boxes reach coco/, with that precision
    assert (effusion["operating_point_kind"], effusion["operating_point"]) == (None, None)
    assert "coco-all/ only" in effusion["operating_point_note"]


def _two_boxes_per_pair(first_hits: str) -> BoxOutcomes:
    """Per pair two boxes in the rule's order, the second with the higher mean heatmap value;
    ``first_hits``: per pair, 1 when the rule's first box is the hit (else the second is)."""
    outcomes = BoxOutcomes()
    for c in first_hits:
        signals = np.array([[0.2, 0.9, -3.0, 1.0, 0.8], [0.6, 0.9, -3.0, 2.0, 0.8]])
        outcomes.add(signals, [c == "1", c != "1"])
    return outcomes


def test_the_order_of_a_pairs_boxes_is_chosen_on_box_val_each_order_winning_where_it_is_right():
    """A calibration rising with the mean heatmap value ranks each pair's second box first. Where the
    rule's first box is the hit in 38 of 40 pairs, the rule's order wins by far more than box-val's
    noise; where the second box is the hit, confidence (the default) is kept; in a near tie the
    default stands."""
    from cxr_miner.miner.tuning import choose_order

    by_mean = Calibration("platt", 0.0, coef=(5.0, 0.0, 0.0, 0.0, 0.0))
    order, how = choose_order(_two_boxes_per_pair("1" * 38 + "00"), by_mean)
    assert (order, how["rule"], how["confidence"], how["box_val_pairs"]) == ("rule", 0.95, 0.05, 40)
    assert choose_order(_two_boxes_per_pair("0" * 38 + "11"), by_mean)[0] == "confidence"
    assert choose_order(_two_boxes_per_pair("10" * 20 + "1"), by_mean)[0] == "confidence"  # 21 against 20
    assert choose_order(None, by_mean)[0] == "confidence"


def test_a_finding_ranked_by_the_rule_reports_the_rules_rank_1_and_harvests_in_that_order():
    from cxr_miner.miner.methods import choices_from_tuning
    from cxr_miner.miner.tuning import figures

    by_mean = Calibration("platt", 0.0, coef=(5.0, 0.0, 0.0, 0.0, 0.0))
    test = _two_boxes_per_pair("1" * 10 + "0" * 10)
    by_rule = figures(test, by_mean, None, curves=False, order="rule")
    by_confidence = figures(test, by_mean, None, curves=False)
    assert (by_rule["acc_rank1"], by_rule["acc_rank1_rule"], by_confidence["acc_rank1"]) == (0.5, 0.5, 0.5)
    test = _two_boxes_per_pair("1" * 15 + "0" * 5)
    assert figures(test, by_mean, None, curves=False, order="rule")["acc_rank1"] == 0.75
    assert figures(test, by_mean, None, curves=False)["acc_rank1"] == 0.25

    val = {"cam": {PAPER_RULE.name: {"Mass": _two_boxes_per_pair("1" * 36 + "0000")}}}
    tuning = tune(val, val, ["cam"], ["Mass"])
    tuning["findings"]["Mass"]["candidates"]["cam"]["rank_order"] = "rule"  # as box-val would choose it
    choice = choices_from_tuning(tuning, None)["Mass"]
    assert choice.order == "rule" and FindingChoice.from_dict(choice.to_dict()) == choice
    assert FindingChoice.from_dict({k: v for k, v in choice.to_dict().items() if k != "order"}).order == "confidence"
