"""The noise of a half's figures: a paired bootstrap over its (image, finding) pairs (issue 23).

A resample draws a half's pairs of one finding with replacement; an image has one pair per
finding, so this resamples the half's images. Every candidate is scored on the same draws, so
that the differences between candidates are paired, and the draws are seeded: the same outcomes
give the same intervals and the same choices.

The choice rule (:class:`Contest`): a default (the CAM baseline with the paper's rule) is kept
unless a candidate's lead over it is above zero in at least 1 - LEVEL of the resamples (a
one-sided paired bootstrap test at LEVEL); among the candidates that pass, the best scoring one.
Its ``margin`` (how far the lead must be above zero) is fixed by the whole half, so that the same
rule applied to each resample tells how often the same choice would be made (``stability``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import numpy as np

RESAMPLES = 1000
SEED = 0
LEVEL = 0.05  # one-sided test at 5%; the intervals of the choice rule are 5% to 95% (90%)
CI = 0.95  # the confidence interval reported beside every Acc, precision, recall and ECE (issue 25)


@functools.lru_cache(maxsize=256)
def resample_draws(pairs: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, pairs) int: each row the pair indices of one resample, drawn with replacement.
    The same for the same arguments, so kept (read-only): an evaluation asks for a few sizes
    thousands of times (a CI per finding, threshold, method and rule)."""
    draws = np.random.default_rng(seed).integers(0, max(pairs, 1), size=(resamples, pairs))
    draws.flags.writeable = False
    return draws


def resampled_means(values: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """(resamples,) float64: the mean of per-pair ``values`` (pairs,) on each draw; NaN without pairs."""
    values = np.asarray(values, dtype=np.float64)
    return values[draws].mean(axis=1) if len(values) else np.full(len(draws), math.nan)


def interval(samples: np.ndarray) -> tuple[float, float]:
    """The LEVEL and 1 - LEVEL quantiles of resampled figures (NaN ones left out; NaN if none)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return math.nan, math.nan
    low, high = np.quantile(samples, [LEVEL, 1 - LEVEL])
    return float(low), float(high)


def confidence_interval(samples: np.ndarray) -> tuple[float, float]:
    """The two-sided CI (95%) percentile interval of resampled figures (NaN ones left out; NaN if none),
    as cheXlocalize reports its localisation figures."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[~np.isnan(samples)]
    if not len(samples):
        return math.nan, math.nan
    low, high = np.quantile(samples, [(1 - CI) / 2, (1 + CI) / 2])
    return float(low), float(high)


def mean_ci(values: np.ndarray, seed: int = SEED) -> list[float]:
    """The 95% CI of the mean of per-pair ``values`` (pairs,) over RESAMPLES seeded resamples of the pairs."""
    values = np.asarray(values, dtype=np.float64)
    return list(confidence_interval(resampled_means(values, resample_draws(len(values), seed=seed))))


def draw_weights(draws: np.ndarray, pairs: int) -> np.ndarray:
    """(resamples, pairs) float64: how many times each pair is drawn in each resample."""
    weights = np.zeros((len(draws), pairs))
    np.add.at(weights, (np.arange(len(draws))[:, None], draws), 1.0)
    return weights


Candidate = TypeVar("Candidate", bound=Hashable)


class Contest(Generic[Candidate]):
    """Candidates scored per pair on the same half (module doc): ``per_pair`` key -> (pairs,)
    scores (a candidate with no pairs, or with another count, can never win)."""

    def __init__(self, per_pair: Mapping[Candidate, np.ndarray], draws: np.ndarray) -> None:
        self.pairs = draws.shape[1]
        self.point = {
            k: float(np.mean(v)) if len(v) == self.pairs and len(v) else math.nan for k, v in per_pair.items()
        }
        self.resampled = {
            k: resampled_means(v, draws) if len(v) == self.pairs else np.full(len(draws), math.nan)
            for k, v in per_pair.items()
        }
        self._margins: dict[tuple[Candidate, Candidate], float] = {}

    def margin(self, candidate: Candidate, default: Candidate) -> float:
        """How far ``candidate``'s lead over ``default`` must be to win: its lead on the whole half
        minus the LEVEL quantile of its resampled leads (a win: that quantile above zero)."""
        key = (candidate, default)
        if key not in self._margins:
            lead = self.point[candidate] - self.point[default]
            leads = self.resampled[candidate] - self.resampled[default]
            self._margins[key] = lead - float(np.quantile(leads, LEVEL)) if not math.isnan(lead) else math.inf
        return self._margins[key]

    def scores(self, draw: int | None = None) -> dict[Candidate, float]:
        """Each candidate's score on the whole half, or on resample ``draw``."""
        return self.point if draw is None else {k: float(v[draw]) for k, v in self.resampled.items()}

    def winner(
        self, default: Candidate, others: Sequence[Candidate], score: Mapping[Candidate, float] | None = None
    ) -> Candidate:
        """``default`` unless some of ``others`` beat it by more than their margin; then the best
        of those (the earlier on ties). ``score``: decide on these (one resample's) instead."""
        score = self.point if score is None else score
        best = default
        for candidate in others:
            lead = score[candidate] - score[default]
            if lead > self.margin(candidate, default) and score[candidate] > score[best]:
                best = candidate
        return best
