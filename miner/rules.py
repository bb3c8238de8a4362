"""Box rules: one normalised heatmap -> up to 3 ranked boxes and the signals of each (issue 11).

A rule says which connected components of the thresholded map become boxes and how they are
ranked. ``peak`` components are those holding the map's global maximum, one per threshold, as in
Cai et al. 2018, section 3.2 (nested boxes, equal boxes given once); ``every`` takes every
component at every threshold and thins them with non-maximum suppression (torchvision ``nms``)
across thresholds, so that two separate blobs give two boxes and a nested copy of a kept box is
dropped. ``region`` is the rule of Li et al. 2018, section 3.3, for the MIL patch model's map
of patch probabilities (absolute, not normalised): the region above T_s = 0.5, each 8-connected
part of it a box (parts at one threshold are disjoint: no NMS), ranked by ``patches``, the mean
over the part's own pixels (its patches, on a patch map drawn in blocks); the table keeps
pixels ``>=`` a threshold where the paper says above, which differs only on ties at exactly 0.5.
The rankings: ``mean`` heatmap inside the box (Cai et al.'s), the component's ``peak``
(ties broken by the larger mean), ``mass`` (peak x area, which prefers the larger of nested
boxes) and ``patches``. A ``prior``-sized rule keeps the components and their ranking but boxes each by the
finding's typical box (the median width and height of its box-val boxes, as fractions of the
image), centred on the component's heatmap-weighted centroid: where a map locates a finding
better than it outlines it (a nodule of 8 input px under stride-8 cells), the centroid is
sub-cell and the component several times the lesion. Which rule a finding uses is chosen on
box-val (flows/evaluate.py).

Convention: boxes are xyxy in continuous pixels of the heatmap's grid, pixel (i, j) covering
[i, i + 1) x [j, j + 1); a heatmap is a 2-D float array in [0, 1] (miner.boxes.check_heatmap).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import nms

from cxr_miner.miner.boxes import DEFAULT_THRESHOLDS, check_heatmap, label_components
from cxr_miner.miner.localize import boxes_in_source, covers_source
from cxr_miner.storage.vocab.letterbox import Letterbox

SWEEP_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
REGION_THRESHOLD = 0.5  # T_s of Li et al. 2018, section 3.3
FEW_COMPONENTS = 8  # up to this many, a component's maximum is taken within its own box (component_maxima)
COMPONENTS = ("peak", "every", "region")
RANKINGS = ("mean", "peak", "mass", "patches")
SIZES = ("component", "prior")


class Candidates(NamedTuple):
    """A rule's boxes for one heatmap, rank 1 first, with per box the signals a ranking or a
    confidence uses: boxes (K, 4) float64 xyxy; score (K,) the ranking signal; threshold (K,)
    the cut it came from; peak (K,) its component's maximum; mean (K,) the mean heatmap inside
    the box; area (K,) the box's share of the heatmap's pixels; centre (K, 2) the component's
    heatmap-weighted centroid (x, y), continuous pixels of the grid; inside (K,) the mean heatmap
    over the component's own pixels."""

    boxes: np.ndarray
    score: np.ndarray
    threshold: np.ndarray
    peak: np.ndarray
    mean: np.ndarray
    area: np.ndarray
    centre: np.ndarray
    inside: np.ndarray

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(*(field[index] for field in self))


class ComponentTable(NamedTuple):
    """Every 8-connected component of ``heatmap >= t`` for each swept t, one row each, in
    threshold order: the Candidates fields (score unset) and ``holds_max`` (bool), whether the
    component holds the global maximum (the first in row-major order, as ``np.argmax``)."""

    rows: Candidates
    holds_max: np.ndarray


def component_table(
    heatmap: np.ndarray, thresholds: tuple[float, ...] = SWEEP_THRESHOLDS, centres: bool = True, inside: bool = True
) -> ComponentTable:
    """The components of ``heatmap`` (H, W) at each threshold; the work every rule shares. Without
    ``centres`` or ``inside`` those columns are NaN (work a harvest's rule does not need). Each
    threshold is labelled only within the box of the pixels at or above the one below it (the
    masks are nested): the same components, numbered in the same row-major order."""
    heatmap = check_heatmap(heatmap)
    check_increasing(thresholds)
    integral = integral_image(heatmap)
    sums = partial(integral_sums, integral)
    argmax = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    window = (slice(0, heatmap.shape[0]), slice(0, heatmap.shape[1]))
    parts = []
    for threshold in thresholds:
        found = mask_window(heatmap, window, threshold)
        if found is None:
            break
        window, mask = found
        labels, count = label_components(mask)
        origin = (window[0].start, window[1].start)
        spans = [
            tuple(slice(o + d.start, o + d.stop) for o, d in zip(origin, span)) for span in ndimage.find_objects(labels)
        ]
        local = (argmax[0] - origin[0], argmax[1] - origin[1])
        at_max = labels[local] if all(0 <= v < n for v, n in zip(local, labels.shape)) else 0
        parts.append(
            _rows(
                heatmap[window],
                sums,
                labels,
                spans,
                threshold,
                centres,
                inside,
                holds_max=np.arange(1, count + 1) == at_max,
                offset=origin,
                size=heatmap.size,
            )
        )
    return _table(parts)


def check_increasing(thresholds: tuple[float, ...]) -> None:
    if list(thresholds) != sorted(set(thresholds)):
        raise ValueError(f"thresholds must be increasing: {thresholds}")


def mask_window(
    heatmap: np.ndarray, window: tuple[slice, slice], threshold: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The box (row and column slices of ``heatmap``) of its pixels ``>= threshold``, all of which
    lie in ``window``, and that mask within it; None when there are none."""
    mask = heatmap[window] >= threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows) == 0:
        return None
    box = (
        slice(window[0].start + rows[0], window[0].start + rows[-1] + 1),
        slice(window[1].start + cols[0], window[1].start + cols[-1] + 1),
    )
    return box, mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def peak_table(
    heatmap: np.ndarray, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS, centres: bool = True, inside: bool = True
) -> ComponentTable:
    """The rows of :func:`component_table` that hold the global maximum, equal to them value for
    value, and only those: what a ``peak`` rule keeps. The component holding the maximum at a
    threshold lies inside the one at the threshold below (increasing ``thresholds``), so each is
    labelled only within the box of the one before, and each box's sum is read from the rows
    above its edges alone (:func:`box_sums`), not from an integral image of the whole map."""
    heatmap = check_heatmap(heatmap)
    check_increasing(thresholds)
    argmax = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    peak = np.full(1, heatmap[argmax], dtype=np.float64)  # the component holds the map's maximum
    window = (slice(0, heatmap.shape[0]), slice(0, heatmap.shape[1]))
    sums = partial(box_sums, heatmap)
    parts = []
    for threshold in thresholds:
        if heatmap[argmax] < threshold:
            break
        labels, _ = label_components(heatmap[window] >= threshold)
        label = labels[argmax[0] - window[0].start, argmax[1] - window[1].start]
        span = ndimage.find_objects(labels, max_label=label)[label - 1]
        rows, cols = (slice(w.start + s.start, w.start + s.stop) for w, s in zip(window, span))
        window = rows, cols
        own = (labels[span] == label).astype(np.int32)
        parts.append(
            _rows(
                heatmap[window],
                sums,
                own,
                [window],
                threshold,
                centres,
                inside,
                holds_max=np.ones(1, dtype=bool),
                offset=(window[0].start, window[1].start),
                size=heatmap.size,
                peak=peak,
            )
        )
    return _table(parts)


def integral_image(heatmap: np.ndarray) -> np.ndarray:
    """(H + 1, W + 1) float64: entry (y, x) is the sum of ``heatmap[:y, :x]``."""
    integral = np.zeros((heatmap.shape[0] + 1, heatmap.shape[1] + 1))
    integral[1:, 1:] = heatmap.cumsum(0).cumsum(1)
    return integral


def integral_sums(integral: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """(K,) float64: the sums of the boxes [y0:y1, x0:x1] (K each, int) from an integral_image."""
    return integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]


def box_sums(heatmap: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """integral_sums(integral_image(heatmap), ...) to the bit, for a few boxes: only the integral
    image's rows at the boxes' top and bottom edges, each from the heatmap rows above it (a
    fraction of the work of the whole image at 512 px). Entry (y, x) of the integral image is
    the heatmap's own dtype summed down each column (row by row, as ``cumsum(0)`` adds: numpy
    reduces a non-innermost axis in order, but a single column pairwise, hence the cumsum
    there), then along the row."""
    width = int(x1.max()) if len(x1) else 0

    def integral_row(y: int) -> np.ndarray:
        row = np.zeros(width + 1)
        if y and width:
            above = heatmap[:y, :width]
            columns = np.add.reduce(above, axis=0) if width > 1 else np.cumsum(above[:, 0])[-1:]
            row[1:] = np.cumsum(columns)
        return row

    rows = {y: integral_row(y) for y in {*y0.tolist(), *y1.tolist()}}
    return np.array(
        [
            rows[b][c] - rows[a][c] - rows[b][d] + rows[a][d]
            for a, b, c, d in zip(y0.tolist(), y1.tolist(), x1.tolist(), x0.tolist())
        ],
        dtype=np.float64,
    )


def _rows(
    heatmap: np.ndarray,
    box_sum: Callable[..., np.ndarray],
    labels: np.ndarray,
    spans: list,
    threshold: float,
    centres: bool,
    inside: bool,
    holds_max: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    size: int | None = None,
    peak: np.ndarray | None = None,
) -> list[np.ndarray]:
    """The table's columns for components 1..K of ``labels`` (over ``heatmap``, the window of the
    full map at ``offset`` (row, col), whose ``size`` pixels it has), ``spans`` their slices in
    full-map pixels; ``box_sum(x0, y0, x1, y1)`` the full map's sums over boxes; ``peak`` their
    maxima when known."""
    boxes = np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in spans], dtype=np.float64)
    x0, y0, x1, y1 = (boxes[:, i].astype(int) for i in range(4))
    area = (x1 - x0) * (y1 - y0)
    sums = box_sum(x0, y0, x1, y1)
    count = len(spans)
    if peak is not None and not (centres or inside):  # nothing here needs the component's pixels
        return [
            boxes,
            np.full(count, threshold),
            peak,
            sums / area,
            area / (size or heatmap.size),
            np.full((count, 2), np.nan),
            np.full(count, np.nan),
            holds_max,
        ]
    within = labels > 0
    owner, values = labels[within], heatmap[within]
    if peak is None:
        peak = component_maxima(heatmap, labels, spans, offset, owner, values)
    if centres or inside:
        # per-component sums in pixel order (np.bincount), as scipy.ndimage.center_of_mass and mean add them
        weight = np.bincount(owner, weights=values, minlength=count + 1)[1:]
    if centres:
        rows, cols = (grid + start for grid, start in zip(np.nonzero(within), offset))
        centre = (
            np.stack(
                [
                    np.bincount(owner, weights=values * grid.astype(float), minlength=count + 1)[1:] / weight
                    for grid in (cols, rows)
                ],
                axis=1,
            )
            + 0.5
        )
    else:
        centre = np.full((count, 2), np.nan)
    means = weight / np.bincount(owner, minlength=count + 1)[1:] if inside else np.full(count, np.nan)
    return [
        boxes,
        np.full(count, threshold),
        peak,
        sums / area,
        area / (size or heatmap.size),
        centre,
        means,
        holds_max,
    ]


def component_maxima(
    heatmap: np.ndarray, labels: np.ndarray, spans: list, offset: tuple[int, int], owner: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """(K,) float64: each component's maximum; a few components each within its own box, many at
    once over their pixels ``values`` (of component ``owner``)."""
    if len(spans) <= FEW_COMPONENTS:
        local = [tuple(slice(s.start - o, s.stop - o) for s, o in zip(span, offset)) for span in spans]
        return np.array([heatmap[box][labels[box] == k].max() for k, box in enumerate(local, 1)], dtype=np.float64)
    peak = np.zeros(len(spans) + 1, dtype=np.float64)
    np.maximum.at(peak, owner, values)
    return peak[1:]


def _table(parts: list[list[np.ndarray]]) -> ComponentTable:
    if not parts:
        empty = np.zeros(0)
        return ComponentTable(
            Candidates(np.zeros((0, 4)), empty, empty, empty, empty, empty, np.zeros((0, 2)), empty),
            np.zeros(0, dtype=bool),
        )
    boxes, threshold, peak, mean, area, centre, inside, holds_max = (np.concatenate(c) for c in zip(*parts))
    return ComponentTable(
        Candidates(boxes, np.zeros(len(boxes)), threshold, peak, mean, area, centre, inside), holds_max
    )


@dataclass(frozen=True)
class BoxRule:
    """Which components become boxes (``components``), at which ``thresholds``, ranked how
    (``rank_by``), boxed how (``size``: the component's box, or the finding's ``prior`` box at its
    centroid); ``every`` and ``prior`` rules keep boxes that overlap a better one at IoU < ``nms_iou``."""

    components: str = "peak"
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    rank_by: str = "mean"
    nms_iou: float = 0.5
    limit: int = 3
    size: str = "component"

    def __post_init__(self) -> None:
        if self.components not in COMPONENTS:
            raise ValueError(f"box rule components must be one of {COMPONENTS}, got {self.components!r}")
        if self.rank_by not in RANKINGS:
            raise ValueError(f"box rule ranking must be one of {RANKINGS}, got {self.rank_by!r}")
        if self.size not in SIZES:
            raise ValueError(f"box rule size must be one of {SIZES}, got {self.size!r}")
        if (
            not self.thresholds
            or not all(0 < t <= 1 for t in self.thresholds)
            or list(self.thresholds) != sorted(set(self.thresholds))
        ):
            raise ValueError(f"box rule thresholds must be increasing, in (0, 1]: {self.thresholds}")

    @property
    def name(self) -> str:
        """Everything that changes the rule's boxes, e.g. ``peak-mean`` (the paper's rule),
        ``every-mass``, ``every-peak-from-0.5`` (the default sweep from 0.5 up), ``every-peak-prior``,
        ``region-patches`` (MIL's); a setting away from its default adds ``-at-0.3-0.6`` (other
        thresholds), ``-nms-0.3`` or ``-top-5``. Two rules with one name give the same boxes."""
        default = {"peak": DEFAULT_THRESHOLDS, "every": SWEEP_THRESHOLDS, "region": (REGION_THRESHOLD,)}[
            self.components
        ]
        if self.thresholds == default:
            sweep = ""
        elif self.thresholds == tuple(t for t in default if t >= self.thresholds[0]):
            sweep = f"-from-{self.thresholds[0]:g}"
        else:
            sweep = "-at-" + "-".join(f"{t:g}" for t in self.thresholds)
        fields = {f.name: f.default for f in dataclass_fields(BoxRule)}
        nms_iou = "" if self.nms_iou == fields["nms_iou"] else f"-nms-{self.nms_iou:g}"
        limit = "" if self.limit == fields["limit"] else f"-top-{self.limit}"
        prior = "-prior" if self.size == "prior" else ""
        return f"{self.components}-{self.rank_by}{sweep}{prior}{nms_iou}{limit}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BoxRule:
        return cls(**{**data, "thresholds": tuple(data["thresholds"])})

    def apply(self, table: ComponentTable) -> Candidates:
        """This rule's boxes from a component table that swept (at least) its thresholds."""
        rows = table.rows
        keep = np.isin(rows.threshold, self.thresholds)
        if self.components == "peak":
            keep &= table.holds_max
        rows = rows.take(np.nonzero(keep)[0])
        score = {
            "mean": rows.mean,
            "peak": rows.peak + 1e-6 * rows.mean,
            "mass": rows.peak * rows.area,
            "patches": rows.inside,
        }[self.rank_by]
        rows = rows._replace(score=score)
        if self.components == "region":  # the parts at one threshold are disjoint
            order = np.argsort(-score, kind="stable")
        elif self.components == "peak":  # nested boxes; a repeat (flat map) is given once, at its lowest threshold
            _, first = np.unique(rows.boxes, axis=0, return_index=True)
            order = np.sort(first)[np.argsort(-score[np.sort(first)], kind="stable")]
        elif len(score):
            order = nms(torch.from_numpy(rows.boxes), torch.from_numpy(score), self.nms_iou).numpy()
        else:
            order = np.zeros(0, dtype=int)
        return rows.take(order if self.size == "prior" else order[: self.limit])  # prior: limited once sized

    def boxes(self, heatmap: np.ndarray) -> Candidates:
        """Ranked boxes of one heatmap (H, W) in [0, 1], rank 1 first, on the heatmap's grid
        (for a ``prior`` rule: its components' boxes; in_source gives the sized ones)."""
        table = peak_table if self.components == "peak" else component_table
        return self.apply(
            table(heatmap, self.thresholds, centres=self.size == "prior", inside=self.rank_by == "patches")
        )

    def in_source(
        self, found: Candidates, input_size: int, letterbox: Letterbox, box_size: tuple[float, float] | None = None
    ) -> tuple[Candidates, np.ndarray]:
        """``found`` (this rule's candidates on the input grid) as boxes (K', 4) in source pixels,
        with the candidates kept: components' boxes through the letterbox, or for a ``prior``
        rule boxes of ``box_size`` (width and height as fractions of the source image) centred on
        each centroid, thinned by NMS in rank order. Boxes wholly in the letterbox padding go."""
        if self.size == "component":
            source = boxes_in_source(found.boxes, input_size, letterbox)
        else:
            if box_size is None:
                raise ValueError(f"box rule {self.name} needs the finding's box size (fractions of the image)")
            centres = boxes_in_source(np.repeat(found.centre, 2, axis=0).reshape(-1, 4), input_size, letterbox)[:, :2]
            half = np.array(box_size) * (letterbox.source_width, letterbox.source_height) / 2
            limit = np.array([letterbox.source_width, letterbox.source_height] * 2, dtype=np.float64)
            source = np.clip(np.hstack([centres - half, centres + half]), 0, limit)
            rank = torch.arange(len(source), 0, -1, dtype=torch.float64)
            keep = np.sort(nms(torch.from_numpy(source), rank, self.nms_iou).numpy())[: self.limit]
            found, source = found.take(keep), source[keep]
        keep = covers_source(source)
        return found.take(keep), source[keep]


PAPER_RULE = BoxRule()
REGION_RULE = BoxRule("region", (REGION_THRESHOLD,), "patches")  # the MIL model's own rule (Li et al. 2018)
# The rules evaluate scores on box-val, per finding and method, to choose from.
BOX_RULES = (
    PAPER_RULE,
    BoxRule("peak", rank_by="mass"),
    *(
        BoxRule("every", sweep, ranking)
        for sweep in (SWEEP_THRESHOLDS, SWEEP_THRESHOLDS[3:])
        for ranking in ("mean", "peak", "mass")
    ),
    BoxRule("peak", size="prior"),
    # the peak's nested components share their peak: by mass the largest comes first, whose centroid
    # weighs the most pixels (by mean the smallest, on the argmax's cell: issue 23's rank-1 misses)
    BoxRule("peak", rank_by="mass", size="prior"),
    BoxRule("every", SWEEP_THRESHOLDS, "peak", size="prior"),
    REGION_RULE,
)


def rules_by_name(rules: tuple[BoxRule, ...]) -> dict[str, BoxRule]:
    """name -> rule; ValueError when two rules share a name (as register_method refuses a second method)."""
    named: dict[str, BoxRule] = {}
    for rule in rules:
        if rule.name in named:
            raise ValueError(f"box rule {rule.name!r} is listed twice ({named[rule.name]} and {rule})")
        named[rule.name] = rule
    return named


RULES_BY_NAME = rules_by_name(BOX_RULES)


def rule_by_name(name: str) -> BoxRule:
    if name not in RULES_BY_NAME:
        raise ValueError(f"unknown box rule {name!r}; known: {list(RULES_BY_NAME)}")
    return RULES_BY_NAME[name]
