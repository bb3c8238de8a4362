"""The 14 NIH ChestX-ray14 findings, in the fixed order every output uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from cxr_miner.storage.vocab.errors import UserError

FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"

# The eight findings that NIH's BBox_List_2017.csv has boxes for.
BOXED_FINDINGS: tuple[str, ...] = FINDINGS[:8]
# The six it has none for: only reviewers' boxes (cxr-miner review) give them ground truth.
UNBOXED_FINDINGS: tuple[str, ...] = FINDINGS[8:]

# A figure over fewer (image, finding) pairs than this says so beside it (issue 25).
FEW_PAIRS = 20
# A mined box is a reviewer's rejected one when their IoU reaches this: it is then known wrong (issue 25).
REJECT_MATCH_IOU = 0.5


def reported_findings(pairs: Mapping[str, int]) -> tuple[str, ...]:
    """The findings evaluation reports, in FINDINGS order: NIH's eight boxed ones always, any other
    once it has ground truth (``pairs``: finding -> boxed pairs; reviewers' boxes give NIH's six
    unboxed findings theirs)."""
    return tuple(f for f in FINDINGS if f in BOXED_FINDINGS or pairs.get(f))


# BBox_List_2017.csv spells Infiltration "Infiltrate"; a few other sources use spaces.
ALIASES: dict[str, str] = {"Infiltrate": "Infiltration", "Pleural Thickening": "Pleural_Thickening"}


class UnknownFindingError(UserError, ValueError):
    """A label that is none of the 14 findings, "No Finding", or a known alias."""


def canonical_finding(label: str) -> str:
    """One label as spelled in :data:`FINDINGS`; raises UnknownFindingError otherwise."""
    name = ALIASES.get(label.strip(), label.strip())
    if name not in FINDINGS:
        raise UnknownFindingError(f"unknown finding {label!r}; known: {', '.join(FINDINGS)} (or {NO_FINDING!r})")
    return name


def parse_findings(text: str) -> list[str]:
    """NIH's "A|B" label string -> findings in FINDINGS order; "No Finding" -> [].

    "No Finding" together with a finding is contradictory and rejected.
    """
    parts = [p.strip() for p in text.split("|") if p.strip()]
    if not parts:
        raise UnknownFindingError("empty finding label (use 'No Finding')")
    if parts == [NO_FINDING]:
        return []
    if NO_FINDING in parts:
        raise UnknownFindingError(f"{NO_FINDING!r} combined with findings in {text!r}")
    found = {canonical_finding(p) for p in parts}
    return [f for f in FINDINGS if f in found]


def label_vector(findings: Iterable[str]) -> list[bool]:
    """Findings -> 14 booleans in FINDINGS order."""
    present = set(findings)
    return [f in present for f in FINDINGS]


def truth_pairs(image_ids: Sequence[str], truth: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    """(N, C) bool: image i has a ground-truth box of finding c (``truth``: image id -> finding -> boxes)."""
    pairs = [[f in truth.get(i, {}) for f in FINDINGS] for i in image_ids]
    return np.array(pairs, dtype=bool).reshape(-1, len(FINDINGS))
