"""K-fold cross-validation figures (storage.stages.evaluation.fold_summary) worked by hand."""

from __future__ import annotations

import math

import pytest

from cxr_miner.storage.stages.evaluation import auc_markdown, fold_summary, folds_markdown
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS


def fold(acc: dict[str, float], images: dict[str, int]) -> dict:
    """A fold's Acc/AFP table with the given Acc at T(IoU) = 0.3 (AFP 1 - Acc) for each boxed finding."""
    return {
        f: {
            "images": images.get(f, 0),
            "iou": {0.3: {"acc": acc.get(f, math.nan), "afp": 1 - acc.get(f, math.nan)}},
            "ior": {0.1: {"acc": acc.get(f, math.nan), "afp": 0.0}},
        }
        for f in BOXED_FINDINGS
    }


def test_mean_and_sample_sd_over_the_folds_that_scored_a_finding():
    """Mass: 0.5, 0.7, 0.9 over three folds -> mean 0.7, sd 0.2. Nodule: scored in one fold only
    (0.4) -> mean 0.4, no sd. An empty fold (no boxed image) counts for nothing."""
    folds = [
        fold({"Mass": 0.5, "Nodule": 0.4}, {"Mass": 2, "Nodule": 1}),
        fold({"Mass": 0.7}, {"Mass": 4}),
        fold({"Mass": 0.9}, {"Mass": 2}),
        {},
    ]
    summary = fold_summary(folds)
    assert summary["folds"] == 4 and len(summary["per_fold"]) == 4
    mass, nodule = summary["mean"]["Mass"], summary["mean"]["Nodule"]
    assert mass["images"] == 8 and mass["iou"][0.3]["acc"] == pytest.approx(0.7)
    assert mass["iou"][0.3]["afp"] == pytest.approx(0.3)
    assert summary["sd"]["Mass"]["iou"][0.3]["acc"] == pytest.approx(0.2)
    assert nodule["iou"][0.3]["acc"] == pytest.approx(0.4) and math.isnan(summary["sd"]["Nodule"]["iou"][0.3]["acc"])
    assert math.isnan(summary["mean"]["Effusion"]["iou"][0.3]["acc"])
    table = folds_markdown(summary)
    assert "4-fold cross-validation" in table and "0.70 ± 0.20" in table and "| 0.40 |" in table


def test_the_auc_table_has_a_column_per_model_and_the_mean_of_defined_aucs():
    table = auc_markdown({"step1": {"Mass": 0.5, "Nodule": math.nan}, "mil": {"Mass": 0.75, "Nodule": 0.25}})
    assert (
        "| finding | step1 | mil |" in table
        and "| Nodule | - | 0.250 |" in table
        and "| mean | 0.500 | 0.500 |" in table
    )
