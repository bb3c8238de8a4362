"""Scoring localisation against ground-truth boxes, one (image, finding) pair at a time, and the
figures of one half of the boxed images (box-val or box-test).

Each pair's heatmap (on the network input grid, in [0, 1]) is boxed by every candidate rule of
miner.rules from one shared component table; the boxes are mapped to source pixels through the
image's letterbox and scored (Acc/AFP, miner.metrics.LocalizationEvaluator) against the pair's
ground-truth boxes (xyxy, source pixels); the heatmap itself is scored by MaxBoxAccV2 at most at
MAXBOXACC_GRID px; each rule's boxes keep their signals and hits for the confidence calibration
(miner.calibration). Arrays in, accumulators and dicts out: the engine feeds it batches.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from cxr_miner.miner.calibration import BoxOutcomes, box_signals, hits, rejected
from cxr_miner.miner.localize import boxes_in_source
from cxr_miner.miner.metrics import LocalizationEvaluator, MaxBoxAccumulator
from cxr_miner.miner.rules import BOX_RULES, RULES_BY_NAME, SWEEP_THRESHOLDS, BoxRule, Candidates, component_table
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS, reported_findings
from cxr_miner.storage.vocab.letterbox import Letterbox

MAXBOXACC_GRID = 224  # heatmaps are scored for MaxBoxAccV2 at most at this side (wsolevaluation's 224)
RELEASED = "released"  # the results column of what harvest --method auto ships (add_released)


class HalfScores(NamedTuple):
    """A method's scores on one half of the boxed images (box-val or box-test)."""

    boxes: LocalizationEvaluator  # Acc/AFP of the boxes the method's own box rule gives
    heatmaps: MaxBoxAccumulator  # MaxBoxAccV2 of its heatmaps, apart from any box rule
    images: set[str]  # the half's boxed images that were scored
    rules: dict[str, LocalizationEvaluator]  # Acc/AFP of each candidate box rule (miner.rules.BOX_RULES), by name
    outcomes: dict[str, dict[str, BoxOutcomes]]  # rule name -> finding -> its boxes' signals and hits

    @classmethod
    def empty(cls) -> HalfScores:
        return cls(
            LocalizationEvaluator(),
            MaxBoxAccumulator(),
            set(),
            {r.name: LocalizationEvaluator() for r in BOX_RULES},
            {r.name: defaultdict(BoxOutcomes) for r in BOX_RULES},
        )


def candidates_by_rule(heatmap: np.ndarray) -> dict[str, Candidates]:
    """Every candidate rule's boxes of one heatmap (input grid), from one shared component table."""
    table = component_table(heatmap, SWEEP_THRESHOLDS)
    return {rule.name: rule.apply(table) for rule in BOX_RULES}


class Pair(NamedTuple):
    """One (image, finding) pair to score: its heatmap on the input grid (S, S) and at the
    MaxBoxAccV2 grid (G, G), the image's letterbox, the classifier's probability for the finding,
    and the ground-truth boxes (xyxy, source pixels); or, for a pair reviewers only rejected boxes
    of, no ground truth and those ``rejected`` boxes."""

    image_id: str
    finding: str
    heatmap: np.ndarray
    small_heatmap: np.ndarray
    letterbox: Letterbox
    probability: float
    truth: Sequence[Sequence[float]]
    rejected: Sequence[Sequence[float]] = ()  # reviewers' rejected boxes (xyxy, source pixels)


def score_pair(
    half: HalfScores,
    pair: Pair,
    paper_rule: BoxRule,
    box_sizes: Mapping[str, tuple[float, float]],
) -> None:
    """Add one pair to ``half``: MaxBoxAccV2 of its heatmap, Acc/AFP of every candidate rule's boxes
    (``paper_rule``'s also as the method's own), and each rule's boxes' signals and hits. A
    ``prior`` rule boxes only a finding with a box-size prior (``box_sizes``, from box-val)."""
    if not len(pair.truth):
        score_rejected_pair(half, pair, box_sizes)
        return
    input_size, grid = pair.heatmap.shape[-1], pair.small_heatmap.shape[-1]
    half.images.add(pair.image_id)
    half.heatmaps.accumulate(
        pair.finding,
        pair.small_heatmap,
        pair.truth,
        lambda b: boxes_in_source(b * (input_size / grid), input_size, pair.letterbox),
    )
    for rule, (signals, boxes) in rule_boxes(pair, box_sizes).items():
        half.rules[rule].accumulate(pair.finding, boxes, pair.truth)
        if rule == paper_rule.name:
            half.boxes.accumulate(pair.finding, boxes, pair.truth)
        half.outcomes[rule][pair.finding].add(signals, hits(boxes, np.asarray(pair.truth)))


def score_rejected_pair(half: HalfScores, pair: Pair, box_sizes: Mapping[str, tuple[float, float]]) -> None:
    """Add a pair with no ground truth but reviewers' ``rejected`` boxes to ``half``'s outcomes
    (issue 25: rejected boxes are negatives): each rule's boxes that are a rejected one
    (miner.calibration.rejected) as misses, in a pair not located (BoxOutcomes). Its other boxes
    are not known right or wrong and are left out; nothing of it reaches Acc/AFP or MaxBoxAccV2."""
    for rule, (signals, boxes) in rule_boxes(pair, box_sizes).items():
        known_wrong = rejected(boxes, np.asarray(pair.rejected))
        half.outcomes[rule][pair.finding].add(signals[known_wrong], np.zeros(int(known_wrong.sum())), located=False)


def rule_boxes(pair: Pair, box_sizes: Mapping[str, tuple[float, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """rule name -> its boxes' signals (K, 5) and boxes (K, 4; xyxy, source pixels), rank 1 first,
    for every candidate rule of the pair's heatmap (a ``prior`` rule only for a finding in ``box_sizes``)."""
    input_size, found = pair.heatmap.shape[-1], {}
    for rule, candidates in candidates_by_rule(pair.heatmap).items():
        if RULES_BY_NAME[rule].size == "prior" and pair.finding not in box_sizes:
            continue
        candidates, boxes = RULES_BY_NAME[rule].in_source(
            candidates, input_size, pair.letterbox, box_sizes.get(pair.finding)
        )
        found[rule] = box_signals(candidates.mean, candidates.peak, candidates.area, pair.probability), boxes
    return found


def half_report(scores: Mapping[str, HalfScores]) -> dict[str, Any]:
    """One half's figures: images, pairs per finding, Acc/AFP and MaxBoxAccV2 per variant."""
    if not scores:
        return {
            "images": 0,
            "evaluated": {f: 0 for f in BOXED_FINDINGS},
            "results": {},
            "max_box_acc_v2": {},
            "box_rules": {},
        }
    first = next(iter(scores.values()))
    pairs = {f: first.boxes.images(f) for f in FINDINGS}
    return {
        "images": len(first.images),
        "evaluated": {f: n for f, n in pairs.items() if f in reported_findings(pairs)},
        "results": {key: s.boxes.compute() for key, s in scores.items()},
        "max_box_acc_v2": {key: s.heatmaps.compute() for key, s in scores.items() if s.heatmaps.pairs},
        "box_rules": {
            key: {rule: e.compute() for rule, e in s.rules.items()} for key, s in scores.items() if s.heatmaps.pairs
        },
    }


def add_released(half: dict[str, Any], tuning: Mapping[str, Any]) -> None:
    """``results["released"]``: per finding, the Acc/AFP of the variant and box rule chosen for it
    (what ``harvest --method auto`` ships), taken from the candidate rules' scores."""
    if not half["box_rules"]:
        return
    rows = {}
    for finding, row in next(iter(half["results"].values())).items():
        choice = tuning["findings"].get(finding)
        rows[finding] = (
            half["box_rules"][choice["method"]][choice["candidates"][choice["method"]]["rule"]][finding]
            if choice
            else {
                **row,
                "iou": {t: {"acc": math.nan, "afp": math.nan} for t in row["iou"]},
                "ior": {t: {"acc": math.nan, "afp": math.nan} for t in row["ior"]},
            }
        )
    half["results"][RELEASED] = rows
