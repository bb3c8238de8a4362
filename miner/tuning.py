"""What a release uses per finding, chosen on box-val and reported on box-test (issues 11, 23).

For each finding, each method variant a run has (``cam``, ``am-t2`` .. ``am-tT``, ``mil``) and
each box rule (miner.rules): a confidence calibration fitted on that rule's box-val boxes
(miner.calibration). A candidate's score on box-val is Acc at T(IoU) = 0.3 with all boxes plus
Acc of rank 1 alone, rank 1 being the most confident box (as a release ranks them), so that a
rule whose first box is right wins over one that is right only somewhere in its three.

The choice keeps the defaults unless beaten beyond box-val's noise (miner.bootstrap.Contest, a
one-sided paired bootstrap over box-val's images): per variant, its own paper's rule unless
another rule beats it; then the CAM baseline's candidate unless another variant's beats it. A
half of a few dozen images cannot flip the choice by a pair or two, and a release is not below
its own baseline by chance. ``choice`` records the rule, the margin and how often the same choice
is made on resamples of box-val (``stability``); ``baseline`` the CAM baseline with the paper's
rule on box-test, and the released minus the baseline with its bootstrap interval there.

The chosen candidate's operating point is the lowest confidence whose box-val precision reaches
the target in all but LEVEL of box-val's resamples (miner.calibration.robust_operating_point);
where none does, the best achievable, its precision stated (choose_operating_point). How a pair's
boxes are ranked is chosen on box-val too (choose_order): by confidence unless the rule's own
order beats it beyond box-val's noise.
Every figure that describes the choice is box-test's, where nothing was chosen.

``outcomes`` maps variant key -> rule name -> finding -> BoxOutcomes, one per half.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cxr_miner.miner.bootstrap import (
    CI,
    LEVEL,
    RESAMPLES,
    Contest,
    confidence_interval,
    draw_weights,
    interval,
    mean_ci,
    resample_draws,
    resampled_means,
)
from cxr_miner.miner.calibration import (
    HIT_IOU,
    PRECISION_TARGET,
    BoxOutcomes,
    Calibration,
    best_of,
    ece_ci,
    fit_calibration,
    pool_reliability,
    pr_curve,
    precision_interval,
    precision_recall,
    reaching,
    recalled_pairs,
    reliability,
    robust_precisions,
    weighted_ece,
)
from cxr_miner.miner.rules import BOX_RULES, PAPER_RULE, rule_by_name
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FEW_PAIRS

Outcomes = Mapping[str, Mapping[str, Mapping[str, BoxOutcomes]]]
Choice = tuple[str, str]  # (variant, rule): a candidate of the choice on box-val
BASELINE = "cam"  # the CAM baseline: the default variant where a run has it
BASELINE_FIGURES = ("pairs", "acc", "acc_ci", "acc_rank1", "acc_rank1_ci", "acc_rank1_rule", "acc_rank1_rule_ci")
RANK_ORDERS = ("confidence", "rule")  # how a release ranks a pair's boxes: the first is the default


def pair_scores(outcomes: BoxOutcomes | None, calibration: Calibration | None) -> np.ndarray:
    """(pairs,) per box-val pair: a hit among all its boxes, plus a hit at rank 1 by confidence."""
    if outcomes is None:
        return np.zeros(0)
    return outcomes.any_hits().astype(float) + outcomes.rank1_hits(calibration).astype(float)


def fitted(
    val: Mapping[str, Mapping[str, BoxOutcomes]], rule: str, finding: str
) -> tuple[Calibration, str, BoxOutcomes]:
    """The calibration of one variant's ``rule`` for ``finding``, what it was fitted on, and those
    boxes: its box-val boxes, or with none of the finding in box-val, the boxes of every finding."""
    mine = val.get(rule, {}).get(finding)
    if mine is None or not len(mine.arrays()[1]):
        mine = BoxOutcomes.pooled(val.get(rule, {}).values())
        fitted_on = "all findings (none of this finding in box-val)"
    else:
        fitted_on = finding
    signals, hit, _ = mine.arrays()
    return fit_calibration(signals, hit), fitted_on, mine


def figures(
    outcomes: BoxOutcomes | None, calibration: Calibration, at: float | None, curves: bool, order: str = "confidence"
) -> dict[str, Any]:
    """One half's figures, each with its 95% CI over resamples of the half's pairs (``*_ci``):
    Acc, Acc of rank 1 as released (``acc_rank1``: in ``order``, by confidence or by the rule's own
    order, choose_order) and by the rule's order (``acc_rank1_rule``), and at the operating point
    ``at`` the boxes, precision, recall and false
    positives per image; with ``curves``, its reliability diagram (ECE) and precision-recall curve,
    and ``per_pair`` / ``scored``, the hits per pair and per box that pooled figures are resampled
    from (released_figures)."""
    outcomes = outcomes or BoxOutcomes()
    signals, hit, pair = outcomes.arrays()
    units, located = outcomes.units, outcomes.located_mask()
    confidence = calibration.predict(signals)
    nan2 = [math.nan, math.nan]
    if at is None:
        empty = 0.0 if outcomes.pairs else math.nan
        at_point: dict[str, Any] = {"boxes": 0, "precision": math.nan, "recall": empty, "afp": empty}
        at_point |= {"precision_interval": nan2, "recall_ci": nan2}
    else:
        at_point = {
            **precision_recall(confidence, hit, pair, units, at, located),
            "precision_interval": list(precision_interval(confidence, hit, pair, units, at)),
            "recall_ci": mean_ci(recalled_pairs(confidence, hit, pair, units, at)[located]),
        }
    per_pair = {
        "acc": outcomes.any_hits(),
        "acc_rank1": outcomes.rank1_hits(calibration if order == "confidence" else None),
        "acc_rank1_rule": outcomes.rank1_hits(),
    }
    row: dict[str, Any] = {
        "pairs": outcomes.pairs,
        "rejected_pairs": units - outcomes.pairs,  # reviewed pairs with rejected boxes alone: negatives
        "boxes": len(hit),
        "few_pairs": outcomes.pairs < FEW_PAIRS,
    }
    for name, values in per_pair.items():
        row[name] = float(values.mean()) if outcomes.pairs else math.nan
        row[f"{name}_ci"] = mean_ci(values)
    row["at_operating_point"] = at_point
    if curves:
        row["reliability"] = reliability(confidence, hit) | {"ece_ci": ece_ci(confidence, hit, pair, units)}
        row["pr_curve"] = pr_curve(confidence, hit, pair, units, located=located)
        row["per_pair"] = {k: v.astype(int).tolist() for k, v in per_pair.items()}
        row["scored"] = {"confidence": confidence.tolist(), "hit": hit.astype(int).tolist(), "pair": pair.tolist()}
    return row


def box_size_priors(
    truth: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    images: Iterable[str],
    dims: Mapping[str, tuple[int, int]],
) -> dict[str, tuple[float, float]]:
    """finding -> (width, height) of its typical box: the medians over the ground-truth boxes of
    ``images`` (box-val) as fractions of their image's (width, height) in ``dims``; what the
    ``prior``-sized box rules (miner.rules) draw. ``truth``: image id -> finding -> xyxy boxes."""
    fractions: dict[str, list[tuple[float, float]]] = {}
    for image in images:
        if image not in dims:
            continue
        width, height = dims[image]
        for finding, boxes in truth.get(image, {}).items():
            fractions.setdefault(finding, []).extend(((b[2] - b[0]) / width, (b[3] - b[1]) / height) for b in boxes)
    medians = {f: np.median(np.array(sizes), axis=0) for f, sizes in sorted(fractions.items())}
    return {f: (float(width), float(height)) for f, (width, height) in medians.items()}


def candidate(
    val: Outcomes,
    test: Outcomes,
    variant: str,
    rule: str,
    finding: str,
    target: float,
    box_size: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """One variant's ``rule`` for one finding: its calibration and operating point on box-val, with
    the figures of both halves (``box_size``: the finding's box-size prior, kept with a ``prior`` rule)."""
    calibration, fitted_on, basis = fitted(val.get(variant, {}), rule, finding)
    signals, hit, pair = basis.arrays()
    point = choose_operating_point(calibration.predict(signals), hit, pair, basis.units, target)
    at = point["operating_point"]
    val_outcomes, test_outcomes = (half.get(variant, {}).get(rule, {}).get(finding) for half in (val, test))
    order, order_choice = choose_order(val_outcomes, calibration)
    return {
        "rule": rule,
        "box_size": list(box_size) if box_size and rule_by_name(rule).size == "prior" else None,
        "calibration": calibration.to_dict(),
        "fitted_on": fitted_on,
        **point,
        "rank_order": order,
        "rank_order_choice": order_choice,
        "box_val": figures(val_outcomes, calibration, at, curves=False, order=order),
        "box_test": figures(test_outcomes, calibration, at, curves=True, order=order),
    }


def choose_order(outcomes: BoxOutcomes | None, calibration: Calibration) -> tuple[str, dict[str, Any]]:
    """How the release ranks this candidate's boxes in a pair, chosen on box-val: by confidence
    (the default: rank 1 the most confident box) unless the rule's own order puts a hit at rank 1
    on more box-val pairs beyond box-val's noise (miner.bootstrap.Contest, the same one-sided paired
    bootstrap as the choice of variant and rule). Returns the order and what it was chosen by: each
    order's rank-1 Acc on box-val."""
    if outcomes is None or not outcomes.pairs:
        return RANK_ORDERS[0], {"box_val_pairs": 0, "confidence": math.nan, "rule": math.nan}
    per_pair = {
        "confidence": outcomes.rank1_hits(calibration).astype(float),
        "rule": outcomes.rank1_hits().astype(float),
    }
    contest: Contest[str] = Contest(per_pair, resample_draws(len(per_pair["rule"])))
    order = contest.winner("confidence", ["rule"])
    return order, {"box_val_pairs": len(per_pair["rule"]), **contest.point}


OPERATING_POINT_KINDS = ("target", "best achievable")


def choose_operating_point(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int, target: float
) -> dict[str, Any]:
    """A candidate's operating point on box-val: the lowest confidence whose precision reaches
    ``target`` in all but LEVEL of the resamples (kind ``target``); where none does, the confidence
    of the highest such precision (kind ``best achievable``: its boxes still reach coco/, with that
    precision stated beside them, so a detector's user chooses); where no level's precision is
    above 0, none (kind None), and ``operating_point_note`` says why. ``operating_point_precision``:
    the precision at the point in all but LEVEL of box-val's resamples."""
    levels, lower = robust_precisions(confidence, hit, pair, pairs) if pairs and len(hit) else (np.zeros(0),) * 2
    if (reached := reaching(levels, lower, target)) is not None:  # the resamples once, for both kinds
        at, precision = reached
        note = f"precision >= {target:g} on box-val in {1 - LEVEL:.0%} of resamples"
        return {"operating_point": at, "operating_point_kind": "target", "operating_point_precision": precision,
                "operating_point_note": note}  # fmt: skip
    best = best_of(levels, lower)
    if best is None:
        note = (
            f"no confidence reaches precision {target:g} on box-val, and no level's precision is above 0 in "
            f"{1 - LEVEL:.0%} of resamples: no box of this finding is at an operating point (coco-all/ only)"
        )
        return {"operating_point": None, "operating_point_kind": None, "operating_point_precision": math.nan,
                "operating_point_note": note}  # fmt: skip
    at, precision = best
    note = (
        f"no confidence reaches precision {target:g} on box-val; the best achievable is released: precision "
        f">= {precision:.2f} on box-val in {1 - LEVEL:.0%} of resamples, below the target"
    )
    return {"operating_point": at, "operating_point_kind": "best achievable", "operating_point_precision": precision,
            "operating_point_note": note}  # fmt: skip


def rules_of(val: Outcomes, variant: str, finding: str, default: str) -> list[str]:
    """The rules a variant's finding may be boxed by, its ``default`` first, then BOX_RULES' order."""
    scored = [r.name for r in BOX_RULES if val.get(variant, {}).get(r.name, {}).get(finding) is not None]
    return [default, *(r for r in scored if r != default)]


def choose(
    val: Outcomes, finding: str, candidates: Mapping[str, Sequence[str]], draws: np.ndarray
) -> tuple[dict[str, str], str, Contest[Choice]]:
    """The choice on box-val (module doc) among ``candidates`` (variant -> its rules, default
    first): each variant's rule, the chosen variant, and the contest (every (variant, rule) scored
    per box-val pair on the same resamples) it was decided by."""
    per_pair: dict[Choice, np.ndarray] = {}
    for variant, rules in candidates.items():
        for rule in rules:
            outcomes = val.get(variant, {}).get(rule, {}).get(finding)
            per_pair[variant, rule] = pair_scores(
                outcomes, fitted(val.get(variant, {}), rule, finding)[0] if outcomes else None
            )
    contest: Contest[Choice] = Contest(per_pair, draws)
    return (*decide(contest, candidates), contest)


def decide(
    contest: Contest[Choice], candidates: Mapping[str, Sequence[str]], draw: int | None = None
) -> tuple[dict[str, str], str]:
    """The two-stage choice on box-val, or on one of its resamples (``draw``)."""
    score = contest.scores(draw)
    rules: dict[str, str] = {}
    for variant, (default, *others) in candidates.items():
        rules[variant] = contest.winner((variant, default), [(variant, r) for r in others], score)[1]
    baseline = BASELINE if BASELINE in candidates else next(iter(candidates))
    rivals = [(v, rules[v]) for v in candidates if v != baseline]
    return rules, contest.winner((baseline, rules[baseline]), rivals, score)[0]


def stability(contest: Contest[Choice], candidates: Mapping[str, Sequence[str]], chosen: tuple[str, str]) -> float:
    """Share of box-val's resamples on which the same rule (with the margins of the whole half)
    chooses the same variant and rule."""
    if not contest.pairs:
        return math.nan
    same = 0
    for draw in range(RESAMPLES):
        rules, variant = decide(contest, candidates, draw)
        same += (variant, rules[variant]) == chosen
    return same / RESAMPLES


def against_baseline(
    test: Outcomes, released: tuple[str, str], baseline: tuple[str, str], finding: str
) -> dict[str, Any]:
    """On box-test: Acc (all boxes) of the released (variant, rule) minus the baseline's, with the
    bootstrap interval of that difference over box-test's pairs."""
    mine, theirs = (test.get(v, {}).get(r, {}).get(finding) for v, r in (released, baseline))
    if mine is None or theirs is None or not mine.pairs or mine.pairs != theirs.pairs:
        return {"difference": math.nan, "interval": [math.nan, math.nan]}
    difference = mine.any_hits().astype(float) - theirs.any_hits().astype(float)
    return {
        "difference": float(difference.mean()),
        "interval": list(interval(resampled_means(difference, resample_draws(mine.pairs)))),
    }


def tune(
    val: Outcomes,
    test: Outcomes,
    variants: Sequence[str],
    findings: Sequence[str],
    target: float = PRECISION_TARGET,
    box_sizes: Mapping[str, tuple[float, float]] | None = None,
    paper_rules: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The choices of every finding (module doc). ``variants``: the run's (the CAM baseline, when
    present, is the default); ``box_sizes`` (box_size_priors of box-val) for the ``prior`` rules;
    ``paper_rules``: variant -> its paper's rule (default: Cai et al.'s)."""
    box_sizes, paper_rules = box_sizes or {}, paper_rules or {}
    if not variants:
        raise ValueError("nothing to tune: no method variant")
    baseline_variant = BASELINE if BASELINE in variants else variants[0]
    baseline = (baseline_variant, paper_rules.get(baseline_variant, PAPER_RULE.name))
    chosen: dict[str, Any] = {}
    for finding in findings:
        pairs = max(
            (
                by_finding[finding].pairs
                for by_rule in val.values()
                for by_finding in by_rule.values()
                if finding in by_finding
            ),
            default=0,
        )
        rule_lists = {v: rules_of(val, v, finding, paper_rules.get(v, PAPER_RULE.name)) for v in variants}
        rules, variant, contest = choose(val, finding, rule_lists, resample_draws(pairs))
        released = (variant, rules[variant])
        base = candidate(val, test, *baseline, finding, target, box_sizes.get(finding))
        chosen[finding] = {
            "method": variant,
            "candidates": {
                v: candidate(val, test, v, rules[v], finding, target, box_sizes.get(finding)) for v in variants
            },
            "choice": {
                "default": list(baseline),
                "box_val_pairs": pairs,
                "resamples": RESAMPLES,
                "level": LEVEL,
                "score": contest.point.get(released, math.nan),
                "default_score": contest.point.get(baseline, math.nan),
                "stability": stability(contest, rule_lists, released),
            },
            "baseline": {
                "method": baseline[0],
                "rule": baseline[1],
                "box_test": {k: base["box_test"][k] for k in BASELINE_FIGURES},
                "released_minus_baseline": against_baseline(test, released, baseline, finding),
            },
        }
    return {
        "hit_iou": HIT_IOU,
        "precision_target": target,
        "chosen_on": "box-val",
        "reported_on": "box-test",
        "rank_orders": list(RANK_ORDERS),
        "variants": list(variants),
        "findings": chosen,
    }


ACC_FIGURES = ("acc", "acc_rank1", "acc_rank1_rule")


def released_figures(entries: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Box-test Acc at T(IoU) = 0.3 of the boxes released per finding (``entries``: finding -> its
    tuned candidate, as in tuning.json), all boxes and rank 1 (by confidence, as released, and by
    the rule's order), and the means over NIH's eight boxed findings with box-test pairs (the
    demo's target, issue 11; ``mean_over``): a finding boxed by reviewers alone has its row, but
    its truth is what reviewers accepted of a release's own boxes, so it stays out of the means
    that releases are compared by; ``calibration``: the ECE of those findings' box-test boxes
    pooled (a finding's own halves are often too small to show it). Every figure has its 95% CI
    (``*_ci``): a finding's from figures(); the means' and the pooled ECE's from resampling each
    finding's pairs apart (the same seeded draws as its own), NaN for a tuning made before
    ``per_pair`` was kept."""
    tests = {f: e["box_test"] for f, e in entries.items() if e["box_test"]["pairs"]}
    rows = {
        f: {k: t[k] for k in ("pairs", *ACC_FIGURES)}
        | {f"{k}_ci": t.get(f"{k}_ci", [math.nan, math.nan]) for k in ACC_FIGURES}
        | {"few_pairs": t["pairs"] < FEW_PAIRS}
        for f, t in tests.items()
    }
    tests = {f: t for f, t in tests.items() if f in BOXED_FINDINGS}  # the means' (docstring)
    means = [rows[f] for f in tests]
    mean = {k: float(np.mean([r[k] for r in means])) if means else math.nan for k in ACC_FIGURES}
    resampled = all("per_pair" in t and "scored" in t for t in tests.values()) and bool(tests)
    pooled = pool_reliability(t["reliability"] for t in tests.values())
    return {
        "split": "box-test",
        "hit_iou": HIT_IOU,
        "ci": CI,
        "findings": rows,
        "mean_over": list(tests),
        **{f"mean_{k}": mean[k] for k in ACC_FIGURES},
        **{f"mean_{k}_ci": mean_of_findings_ci(tests, k) if resampled else [math.nan] * 2 for k in ACC_FIGURES},
        "rank_order": "per finding: by confidence unless box-val chose the rule's order (its rank_order)",
        "min_acc": min((r["acc"] for r in means), default=math.nan),
        "calibration": {
            "boxes": pooled["boxes"],
            "ece": pooled["ece"],
            "ece_ci": pooled_ece_ci(tests) if resampled else [math.nan] * 2,
        },
    }


def mean_of_findings_ci(tests: Mapping[str, Mapping[str, Any]], figure: str) -> list[float]:
    """The 95% CI of the mean over findings of ``figure`` (an ACC_FIGURES name), each finding's
    box-test pairs resampled apart (a stratified bootstrap)."""
    means = [resampled_means(np.asarray(t["per_pair"][figure]), resample_draws(t["pairs"])) for t in tests.values()]
    return list(confidence_interval(np.mean(means, axis=0)))


def pooled_ece_ci(tests: Mapping[str, Mapping[str, Any]]) -> list[float]:
    """The 95% CI of the ECE of every finding's box-test boxes pooled, each finding's pairs resampled apart."""
    weights, confidence, hit = [], [], []
    for t in tests.values():
        scored = t["scored"]
        units = t["pairs"] + t.get("rejected_pairs", 0)  # the pair numbers of ``scored`` run over all
        weights.append(draw_weights(resample_draws(units), units)[:, np.asarray(scored["pair"], dtype=int)])
        confidence.append(np.asarray(scored["confidence"], dtype=np.float64))
        hit.append(np.asarray(scored["hit"], dtype=np.float64))
    return list(confidence_interval(weighted_ece(np.concatenate(confidence), np.concatenate(hit), np.hstack(weights))))


def chosen_entries(tuning: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """finding -> the tuned candidate of the variant chosen for it."""
    return {f: c["candidates"][c["method"]] for f, c in tuning["findings"].items()}
