"""Box confidence (issue 11): the probability that a mined box is right, fitted on box-val.

A box is *right* (a hit) when its IoU with some ground-truth box of its finding is at least
HIT_IOU = 0.3. Its confidence is Platt scaling (a logistic regression, scikit-learn) of the
box's own signals (BOX_SIGNALS: the mean heatmap inside it, its component's peak, its log area,
its rank, and the classifier's probability of the finding), fitted per finding on box-val. Too
few hits or misses to fit a slope gives the smoothed hit rate instead, for every box alike.

Then, on any set of boxes with their confidences and hits: the reliability diagram and its
expected calibration error (ECE; Guo et al. 2017, equal-width bins), precision, recall and false
positives per pair above a confidence, and the operating point: the lowest confidence above which
the boxes reach a precision target (so the most boxes that do), on the whole half
(``operating_point``) or in all but LEVEL of its bootstrap resamples (``robust_operating_point``,
what a release uses: a small box-val's precision of 0.5 at a point gave 0.43 to 0.62 on a
box-test). Recall counts (image, finding) pairs with at least
one hit among the boxes taken, over the pairs scored (Acc at T(IoU) = 0.3, DESIGN.md).

A released pair's boxes are ranked by confidence (``confidence_order``, issue 23): rank 1 is the
box most likely right, the rule's own order breaking ties (and standing alone where a finding has
no confidence, or a ``constant`` one). The signal ``rank`` is always the rule's rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from cxr_miner.miner.bootstrap import LEVEL, confidence_interval, draw_weights, resample_draws
from cxr_miner.miner.metrics import best_overlap
from cxr_miner.storage.vocab.findings import REJECT_MATCH_IOU

HIT_IOU = 0.3
BOX_SIGNALS = ("mean", "peak", "log_area", "rank", "probability")
MIN_EACH = 4  # hits and misses needed to fit a slope
PRECISION_TARGET = 0.5
RELIABILITY_BINS = 10


def box_signals(mean: np.ndarray, peak: np.ndarray, area: np.ndarray, probability: float | np.ndarray) -> np.ndarray:
    """The BOX_SIGNALS of K boxes ranked 1..K: (K,) each (area: share of the heatmap) -> (K, 5)."""
    k = len(mean)
    return np.stack(
        [
            np.asarray(mean, dtype=np.float64),
            np.asarray(peak, dtype=np.float64),
            np.log(np.clip(np.asarray(area, dtype=np.float64), 1e-6, None)),
            np.arange(1, k + 1, dtype=np.float64),
            np.broadcast_to(np.asarray(probability, dtype=np.float64), (k,)),
        ],
        axis=1,
    ).reshape(k, len(BOX_SIGNALS))


def hits(boxes: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(K,) bool: whether each box (K, 4) has IoU >= HIT_IOU with one of ``truth`` (M, 4), same grid."""
    return best_overlap(boxes, truth, "iou") >= HIT_IOU


def rejected(boxes: np.ndarray, rejects: np.ndarray) -> np.ndarray:
    """(K,) bool: whether each box (K, 4) is one of a reviewer's rejected boxes ``rejects`` (M, 4),
    same grid: IoU >= REJECT_MATCH_IOU with one of them."""
    return best_overlap(boxes, rejects, "iou") >= REJECT_MATCH_IOU


def confidence_order(confidence: np.ndarray) -> np.ndarray:
    """(K,) int: the order of K boxes (given in their rule's order) by confidence (K,), highest
    first, ties (and NaN, no confidence) kept in the rule's order."""
    return np.argsort(-np.nan_to_num(np.asarray(confidence, dtype=np.float64), nan=-np.inf), kind="stable")


@dataclass
class BoxOutcomes:
    """Boxes scored against ground truth, for fitting and checking a confidence: per box its
    signals (BOX_SIGNALS) and whether it is a hit, per (image, finding) pair whether it is
    ``located`` (has ground-truth boxes).

    A located pair is scored whole: Acc, recall and false positives count it. A pair a reviewer
    only rejected boxes of (issue 25: rejected boxes are negatives) has no box to score Acc on; it
    brings just its boxes that are a rejected one (REJECT_MATCH_IOU), each a miss, to the box
    figures: calibration, precision, ECE. Every pair, located or not, is a unit of their bootstrap
    resamples (``units``); ``pairs`` counts the located ones."""

    signals: list[np.ndarray] = field(default_factory=list)
    hit: list[np.ndarray] = field(default_factory=list)
    located: list[bool] = field(default_factory=list)

    def add(self, signals: np.ndarray, hit: np.ndarray, located: bool = True) -> None:
        """One (image, finding) pair's boxes, rank 1 first (none is allowed: a miss)."""
        self.signals.append(np.asarray(signals, dtype=np.float64).reshape(-1, len(BOX_SIGNALS)))
        self.hit.append(np.asarray(hit, dtype=bool))
        self.located.append(bool(located))

    @property
    def pairs(self) -> int:
        """The located pairs: those Acc and recall are over."""
        return sum(self.located)

    @property
    def units(self) -> int:
        """Every pair: the units the box figures are resampled by (arrays()' pair numbers)."""
        return len(self.located)

    def located_mask(self) -> np.ndarray:
        """(units,) bool: which pairs are located."""
        return np.asarray(self.located, dtype=bool)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """signals (B, 5), hit (B,), pair (B,) int in 0..units-1 over all B boxes."""
        if not self.signals:
            return np.zeros((0, len(BOX_SIGNALS))), np.zeros(0, dtype=bool), np.zeros(0, dtype=int)
        pair = np.concatenate([np.full(len(h), i) for i, h in enumerate(self.hit)])
        return np.concatenate(self.signals), np.concatenate(self.hit), pair

    def acc(self, rank1_only: bool = False) -> float:
        """Share of located pairs with a hit among all their boxes (Acc at T(IoU) = 0.3), or in the
        rule's rank 1 alone."""
        if not self.pairs:
            return math.nan
        return float(np.mean(self.rank1_hits() if rank1_only else self.any_hits()))

    def _located_hits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(s, h) for s, h, located in zip(self.signals, self.hit, self.located) if located]

    def rank1_hits(self, calibration: Calibration | None = None) -> np.ndarray:
        """(pairs,) bool: whether each located pair's rank 1 is a hit, rank 1 by ``calibration``'s
        confidence (confidence_order), or the rule's own without one."""

        def first(signals: np.ndarray, hit: np.ndarray) -> bool:
            if not len(hit):
                return False
            return bool(hit[0] if calibration is None else hit[confidence_order(calibration.predict(signals))[0]])

        return np.array([first(s, h) for s, h in self._located_hits()], dtype=bool)

    def any_hits(self) -> np.ndarray:
        """(pairs,) bool: whether each located pair has a hit among all its boxes."""
        return np.array([bool(h.any()) for _, h in self._located_hits()], dtype=bool)

    @classmethod
    def pooled(cls, outcomes: Iterable[BoxOutcomes]) -> BoxOutcomes:
        """The pairs of several, one after another."""
        pooled = cls()
        for o in outcomes:
            pooled.signals += o.signals
            pooled.hit += o.hit
            pooled.located += o.located
        return pooled


@dataclass(frozen=True)
class Calibration:
    """P(hit | signals) = sigmoid(coef . (signals - center) / scale + intercept); ``constant``
    calibrations have no slope (coef all 0). ``boxes``/``hits``: what it was fitted on."""

    kind: str
    intercept: float
    center: tuple[float, ...] = (0.0,) * len(BOX_SIGNALS)
    scale: tuple[float, ...] = (1.0,) * len(BOX_SIGNALS)
    coef: tuple[float, ...] = (0.0,) * len(BOX_SIGNALS)
    boxes: int = 0
    hits: int = 0

    def predict(self, signals: np.ndarray) -> np.ndarray:
        """(K, 5) signals -> (K,) confidences in (0, 1)."""
        z = (np.asarray(signals, dtype=np.float64).reshape(-1, len(BOX_SIGNALS)) - self.center) / self.scale
        return 1.0 / (1.0 + np.exp(-(z @ np.asarray(self.coef) + self.intercept)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-shaped (lists, not tuples), so that it equals itself read back."""
        return {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()},
            "signals": list(BOX_SIGNALS),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        if data.get("signals", list(BOX_SIGNALS)) != list(BOX_SIGNALS):
            raise ValueError(f"calibration of signals {data.get('signals')}, this code uses {list(BOX_SIGNALS)}")
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k != "signals"}
        return cls(**fields)


def fit_calibration(signals: np.ndarray, hit: np.ndarray) -> Calibration:
    """Platt scaling of the signals (B, 5) against hit (B,) (L2-regularised logistic regression on
    standardised signals), or the hit rate smoothed by one hit and one miss (Laplace) when there
    are fewer than MIN_EACH hits or misses."""
    from sklearn.linear_model import LogisticRegression

    hit = np.asarray(hit, dtype=bool)
    n, positives = len(hit), int(hit.sum())
    if positives < MIN_EACH or n - positives < MIN_EACH:
        rate = (positives + 1) / (n + 2)
        return Calibration("constant", float(math.log(rate / (1 - rate))), boxes=n, hits=positives)
    center, scale = signals.mean(axis=0), signals.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    model = LogisticRegression(C=1.0).fit((signals - center) / scale, hit)
    return Calibration(
        "platt",
        float(model.intercept_[0]),
        tuple(center.tolist()),
        tuple(scale.tolist()),
        tuple(model.coef_[0].tolist()),
        boxes=n,
        hits=positives,
    )


def reliability(confidence: np.ndarray, hit: np.ndarray, bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Reliability diagram in ``bins`` equal-width confidence bins (each: low, high, boxes, mean
    confidence, hit rate; empty bins left out) and the ECE: sum over bins of boxes / B x |mean
    confidence - hit rate|. NaN ECE for no boxes."""
    confidence, hit = np.asarray(confidence, dtype=np.float64), np.asarray(hit, dtype=bool)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean, rate = float(confidence[inside].mean()), float(hit[inside].mean())
        rows.append(
            {"low": b / bins, "high": (b + 1) / bins, "boxes": int(inside.sum()), "confidence": mean, "hit_rate": rate}
        )
        ece += inside.sum() / len(hit) * abs(mean - rate)
    return {"bins": rows, "ece": float(ece) if len(hit) else math.nan, "boxes": len(hit)}


def pool_reliability(diagrams: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One reliability diagram of the boxes of several (``reliability``'s output, same bins): the
    bins' boxes, confidences and hit rates pooled, and the ECE of the pooled boxes."""
    pooled: dict[tuple[float, float], list[float]] = {}
    for diagram in diagrams:
        for row in diagram["bins"]:
            n, confidence, hits = pooled.setdefault((row["low"], row["high"]), [0, 0.0, 0.0])
            pooled[(row["low"], row["high"])] = [
                n + row["boxes"],
                confidence + row["boxes"] * row["confidence"],
                hits + row["boxes"] * row["hit_rate"],
            ]
    rows = [
        {"low": low, "high": high, "boxes": int(n), "confidence": c / n, "hit_rate": h / n}
        for (low, high), (n, c, h) in sorted(pooled.items())
    ]
    boxes = sum(r["boxes"] for r in rows)
    ece = sum(r["boxes"] * abs(r["confidence"] - r["hit_rate"]) for r in rows) / boxes if boxes else math.nan
    return {"bins": rows, "ece": float(ece), "boxes": boxes}


def weighted_ece(
    confidence: np.ndarray, hit: np.ndarray, weights: np.ndarray, bins: int = RELIABILITY_BINS
) -> np.ndarray:
    """(R,): reliability's ECE of B boxes under each of R weightings ``weights`` (R, B) (a box
    counted as often as a resample draws its pair): sum over bins of |sum of confidences - sum of
    hits| / boxes, which is reliability's sum of boxes / B x |mean confidence - hit rate|; NaN
    where no box is weighted."""
    confidence, hit = np.asarray(confidence, dtype=np.float64), np.asarray(hit, dtype=np.float64)
    which = np.eye(bins)[np.minimum((confidence * bins).astype(int), bins - 1)]  # (B, bins)
    gap = np.abs((weights * confidence) @ which - (weights * hit) @ which).sum(axis=1)
    total = weights.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, gap / total, math.nan)


def ece_ci(confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int) -> list[float]:
    """The 95% CI (miner.bootstrap.confidence_interval) of the ECE over resamples of the ``pairs``."""
    if not pairs or not len(hit):
        return [math.nan, math.nan]
    weights = draw_weights(resample_draws(pairs), pairs)[:, np.asarray(pair)]
    return list(confidence_interval(weighted_ece(confidence, hit, weights)))


def precision_recall(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int, at: float, located: np.ndarray | None = None
) -> dict[str, float]:
    """Precision (hits / boxes), recall (located pairs with a hit / located pairs) and false
    positives per located pair (``afp``: their misses / their number, the AFP per image of the
    finding's images) of the boxes with confidence >= ``at``; NaN precision when no box is taken.
    ``pairs``: how many pairs the boxes' ``pair`` numbers run over; ``located`` (pairs,) bool:
    which have ground-truth boxes (BoxOutcomes; default all)."""
    taken = np.asarray(confidence) >= at
    hit = np.asarray(hit, dtype=bool)
    located = np.ones(pairs, dtype=bool) if located is None else np.asarray(located, dtype=bool)
    counted = located[np.asarray(pair, dtype=int)] if len(hit) else np.zeros(0, dtype=bool)
    boxes, scored = int(taken.sum()), int(located.sum())
    hit_pairs = len(set(np.asarray(pair)[taken & hit].tolist()))
    return {
        "boxes": boxes,
        "precision": float(hit[taken].mean()) if boxes else math.nan,
        "recall": hit_pairs / scored if scored else math.nan,
        "afp": float((taken & ~hit & counted).sum()) / scored if scored else math.nan,
    }


def resampled_precision(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, draws: np.ndarray, levels: np.ndarray
) -> np.ndarray:
    """(resamples, L): the precision of the boxes with confidence >= each of ``levels`` (L,) on
    each resample of the pairs (``draws``, miner.bootstrap.resample_draws); NaN where none is taken."""
    pairs = draws.shape[1]
    taken = np.asarray(confidence)[:, None] >= np.asarray(levels)[None, :]  # (B, L)
    boxes_per_pair, hits_per_pair = np.zeros((pairs, len(levels))), np.zeros((pairs, len(levels)))
    np.add.at(boxes_per_pair, np.asarray(pair), taken.astype(float))
    np.add.at(hits_per_pair, np.asarray(pair), (taken & np.asarray(hit, dtype=bool)[:, None]).astype(float))
    weights = draw_weights(draws, pairs)
    taken_boxes, taken_hits = weights @ boxes_per_pair, weights @ hits_per_pair
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(taken_boxes > 0, taken_hits / taken_boxes, math.nan)


def precision_interval(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int, at: float
) -> tuple[float, float]:
    """The 95% CI (miner.bootstrap.confidence_interval) of the precision at ``at`` over resamples of the pairs."""
    if not pairs or not len(hit):
        return math.nan, math.nan
    return confidence_interval(resampled_precision(confidence, hit, pair, resample_draws(pairs), np.array([at]))[:, 0])


def recalled_pairs(confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int, at: float) -> np.ndarray:
    """(pairs,) bool: whether each pair has a hit among its boxes with confidence >= ``at``
    (recall is their mean, precision_recall's)."""
    recalled = np.zeros(pairs, dtype=bool)
    recalled[np.asarray(pair)[(np.asarray(confidence) >= at) & np.asarray(hit, dtype=bool)]] = True
    return recalled


def pr_curve(
    confidence: np.ndarray,
    hit: np.ndarray,
    pair: np.ndarray,
    pairs: int,
    points: int = 50,
    located: np.ndarray | None = None,
) -> list[dict[str, float]]:
    """Precision and recall (precision_recall's) at (at most ``points``) confidences taken from
    the boxes' own, highest first."""
    levels = np.unique(confidence)[::-1]
    if len(levels) > points:
        levels = levels[np.linspace(0, len(levels) - 1, points).round().astype(int)]
    return [
        {"confidence": float(c), **precision_recall(confidence, hit, pair, pairs, float(c), located)} for c in levels
    ]


def robust_operating_point(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int, target: float = PRECISION_TARGET
) -> float | None:
    """The lowest confidence c (among the boxes') such that the boxes with confidence >= c have
    precision >= ``target`` in all but LEVEL of the bootstrap resamples of the ``pairs`` (the
    LEVEL quantile at or above it; a resample that takes no box fails); None when none does."""
    if not pairs or not len(hit):
        return None
    point = reaching(*robust_precisions(confidence, hit, pair, pairs), target)
    return point[0] if point else None


def robust_precisions(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each confidence level of the boxes (L,), from the highest, and the precision of the boxes at
    or above it in all but LEVEL of the bootstrap resamples of the ``pairs`` (the LEVEL quantile; a
    resample that takes no box counts 0)."""
    levels = np.unique(np.asarray(confidence, dtype=np.float64))[::-1]
    precision = resampled_precision(confidence, hit, pair, resample_draws(pairs), levels)
    return levels, np.quantile(np.nan_to_num(precision, nan=0.0), LEVEL, axis=0)


def best_operating_point(
    confidence: np.ndarray, hit: np.ndarray, pair: np.ndarray, pairs: int
) -> tuple[float, float] | None:
    """Where no confidence reaches the target (robust_operating_point is None): the confidence c
    whose boxes (>= c) have the highest precision in all but LEVEL of the resamples, the lowest such
    c on a tie (the most boxes), with that precision; None when no level's is above 0 (too few hits
    to tell any level from chance)."""
    if not pairs or not len(hit):
        return None
    return best_of(*robust_precisions(confidence, hit, pair, pairs))


def best_of(levels: np.ndarray, lower: np.ndarray) -> tuple[float, float] | None:
    """best_operating_point from robust_precisions' levels and precisions."""
    best = float(lower.max()) if len(lower) else 0.0
    if best <= 0:
        return None
    return float(levels[np.nonzero(lower == best)[0][-1]]), best


def reaching(levels: np.ndarray, lower: np.ndarray, target: float) -> tuple[float, float] | None:
    """robust_operating_point from robust_precisions' levels and precisions, with its precision."""
    reached = np.nonzero(lower >= target)[0]
    return (float(levels[reached[-1]]), float(lower[reached[-1]])) if len(reached) else None


def operating_point(confidence: np.ndarray, hit: np.ndarray, target: float = PRECISION_TARGET) -> float | None:
    """The lowest confidence c (among the boxes') such that the boxes with confidence >= c have
    precision >= ``target``; None when no c reaches it (then no box is at the operating point)."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    confidence, hit = np.asarray(confidence)[order], np.asarray(hit, dtype=bool)[order]
    last_of_level = np.r_[confidence[1:] != confidence[:-1], True]  # take ties together
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    reached = np.nonzero(last_of_level & (precision >= target))[0]
    return float(confidence[reached[-1]]) if len(reached) else None
