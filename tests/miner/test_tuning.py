"""The per-finding choice on box-val: box-size priors, and a prior rule's size recorded with it."""

from __future__ import annotations

import numpy as np
import pytest

from cxr_miner.miner.calibration import BoxOutcomes
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
    val = {"cam": {PAPER_RULE.name: {"Nodule": _outcomes([[True], [False], [False], [False]])},
                   "peak-mean-prior": {"Nodule": _outcomes([[True]] * 4)}}}
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
