"""Which released boxes a reviewer judges next, per finding: the sampler the review page names.

Stratified by confidence, so that the verdicts cover every confidence and can fit a calibration:
a finding's boxes are sorted by their calibrated confidence (by their ranking score where the
finding has no confidence, as NIH's six unboxed findings do), cut into ``STRATA`` strata of equal
count, shuffled within each stratum (seeded), and dealt one from each stratum in turn. Findings
without a confidence come first, since their verdicts are the only ground truth they will get.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

STRATA = 5
SEED = 0
SAMPLER = (
    f"stratified by confidence: each finding's boxes cut into {STRATA} strata of equal count by calibrated "
    "confidence (by ranking score where the finding has none), one box from each stratum in turn, "
    f"shuffled within a stratum (seed {SEED}); findings without a confidence first"
)


@dataclass(frozen=True)
class QueueBox:
    """A released box as the queue sees it: its id, finding, and the value it is stratified by."""

    box_id: str
    finding: str
    confidence: float | None
    score: float


def stratified(boxes: Sequence[QueueBox], strata: int = STRATA, seed: int = SEED) -> list[str]:
    """Box ids of one finding in review order: ``strata`` equal-count strata by confidence (score
    where a box has none), each shuffled by ``seed``, dealt one from each stratum in turn."""
    ordered = sorted(boxes, key=lambda b: (b.score if b.confidence is None else b.confidence, b.box_id))
    size = -(-len(ordered) // strata) if ordered else 1
    chunks = [ordered[k : k + size] for k in range(0, len(ordered), size)]
    generator = random.Random(seed)
    for chunk in chunks:
        generator.shuffle(chunk)
    dealt = [chunk[i].box_id for i in range(size) for chunk in chunks if i < len(chunk)]
    return dealt


def review_order(boxes: Sequence[QueueBox]) -> dict[str, list[str]]:
    """finding -> its box ids in review order, findings without any confidence first (then by
    name)."""
    by_finding: dict[str, list[QueueBox]] = {}
    for box in boxes:
        by_finding.setdefault(box.finding, []).append(box)
    unboxed = {f for f, found in by_finding.items() if all(b.confidence is None for b in found)}
    return {f: stratified(by_finding[f]) for f in sorted(by_finding, key=lambda f: (f not in unboxed, f))}


def next_box(order: Sequence[str], verdicts: Mapping[str, str], skipped_by_reviewer: set[str]) -> str | None:
    """The first box of ``order`` nobody has judged (``verdicts``: box id -> current verdict; a
    skip is no judgement) that this reviewer has not skipped; None when the queue is done."""
    for box_id in order:
        if verdicts.get(box_id, "skip") == "skip" and box_id not in skipped_by_reviewer:
            return box_id
    return None
