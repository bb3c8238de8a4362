"""Localisation and classification metrics, streaming: accumulate per image, compute at the end.

Protocol (Wang et al. 2017, as used by Cai et al. 2018; DESIGN.md): per finding, over the
images that have a ground-truth box of it, a predicted box is a hit when its overlap with
some ground-truth box exceeds T. Acc = images with at least one hit / images evaluated;
AFP = predicted boxes that hit nothing / images evaluated. Overlap is IoU, or IoR
(intersection over the predicted box's area, "IoBB"). Boxes are xyxy in one pixel grid.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torchvision.ops import box_area, box_iou

from cxr_miner.miner.bootstrap import mean_ci
from cxr_miner.storage.vocab.findings import FINDINGS

T_IOU = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
T_IOR = (0.1, 0.25, 0.5, 0.75, 0.9)


def _boxes(boxes: Sequence | np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    if (tensor[:, 2] < tensor[:, 0]).any() or (tensor[:, 3] < tensor[:, 1]).any():
        raise ValueError(f"boxes must be xyxy with x_max >= x_min and y_max >= y_min, got {tensor.tolist()}")
    return tensor


def box_ior(predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over the predicted box's area: (N, 4), (M, 4) -> (N, M); 0 for empty boxes."""
    top_left = torch.max(predicted[:, None, :2], truth[None, :, :2])
    bottom_right = torch.min(predicted[:, None, 2:], truth[None, :, 2:])
    intersection = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    area = box_area(predicted)[:, None]
    return torch.where(area > 0, intersection / area.clamp(min=1e-12), torch.zeros_like(intersection))


def best_overlap(predicted, truth, metric: str) -> np.ndarray:
    """For each predicted box, its largest IoU (or IoR) with any ground-truth box: (N,)."""
    predicted, truth = _boxes(predicted), _boxes(truth)
    if len(predicted) == 0:
        return np.zeros(0)
    if len(truth) == 0:
        return np.zeros(len(predicted))
    overlap = {"iou": box_iou, "ior": box_ior}[metric](predicted, truth)
    # numpy's max: torch's reduction over a few rows costs a thread pool's wake-up (1.5 ms on 2 busy cores)
    return overlap.numpy().max(axis=1)


class LocalizationEvaluator:
    """Acc and AFP per finding at the T(IoU) and T(IoR) lists, from per-image accumulation.

    Memory per evaluated image is the best overlap of each of its (at most a few) boxes.
    """

    def __init__(self, iou_thresholds: Sequence[float] = T_IOU, ior_thresholds: Sequence[float] = T_IOR) -> None:
        self.thresholds = {"iou": tuple(iou_thresholds), "ior": tuple(ior_thresholds)}
        self.overlaps: dict[str, dict[str, list[np.ndarray]]] = defaultdict(lambda: {"iou": [], "ior": []})

    def accumulate(self, finding: str, predicted, truth) -> None:
        """One image with at least one ground-truth box of ``finding``; ``predicted`` in rank order."""
        if finding not in FINDINGS:
            raise ValueError(f"unknown finding {finding!r}")
        if len(_boxes(truth)) == 0:
            raise ValueError(f"an image is evaluated for {finding} only if it has a ground-truth box of it")
        for metric in ("iou", "ior"):
            self.overlaps[finding][metric].append(best_overlap(predicted, truth, metric))

    def images(self, finding: str) -> int:
        return len(self.overlaps[finding]["iou"]) if finding in self.overlaps else 0

    def compute(self) -> dict[str, dict]:
        """{finding: {"images": n, "iou": {T: {"acc", "acc_ci", "afp"}}, "ior": {...}}}; NaN where n = 0;
        ``acc_ci``: Acc's 95% CI over seeded resamples of the images (miner.bootstrap.mean_ci)."""
        table = {}
        for finding in FINDINGS:
            n = self.images(finding)
            row: dict = {"images": n}
            for metric, thresholds in self.thresholds.items():
                per_image = self.overlaps[finding][metric] if n else []
                row[metric] = {}
                for t in thresholds:
                    hit = np.array([bool((o > t).any()) for o in per_image], dtype=np.float64)
                    false_positives = sum(int((o <= t).sum()) for o in per_image)
                    row[metric][t] = {
                        "acc": float(hit.mean()) if n else math.nan,
                        "acc_ci": mean_ci(hit),
                        "afp": false_positives / n if n else math.nan,
                    }
            table[finding] = row
        return table

    def select_until_afp(
        self, finding: str, threshold: float, afp_bound: float, metric: str = "iou"
    ) -> dict[str, float]:
        """Section 3.2: all images' rank-1 boxes, then rank-2, then rank-3, taken in that order
        while AFP stays within ``afp_bound``; Acc and AFP of the boxes taken."""
        per_image = self.overlaps[finding][metric] if finding in self.overlaps else []
        n = len(per_image)
        if n == 0:
            return {"acc": math.nan, "afp": math.nan, "boxes": 0}
        hit = [False] * n
        false_positives = taken = 0
        depth = max(len(o) for o in per_image)
        for rank in range(depth):
            for i, overlaps in enumerate(per_image):
                if rank >= len(overlaps):
                    continue
                is_hit = bool(overlaps[rank] > threshold)
                if not is_hit and (false_positives + 1) / n > afp_bound:
                    return {"acc": sum(hit) / n, "afp": false_positives / n, "boxes": taken}
                false_positives += not is_hit
                hit[i] = hit[i] or is_hit
                taken += 1
        return {"acc": sum(hit) / n, "afp": false_positives / n, "boxes": taken}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half; NaN if one class is absent."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


class AUCAccumulator:
    """Per-finding ROC AUC over batches: ``accumulate(scores (N, C), labels (N, C))``, then ``compute()``."""

    def __init__(self, findings: Sequence[str] = FINDINGS) -> None:
        self.findings = tuple(findings)
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def accumulate(self, scores, labels) -> None:
        scores = np.asarray(scores, dtype=np.float32)
        labels = np.asarray(labels, dtype=bool)
        if scores.shape != labels.shape or scores.ndim != 2 or scores.shape[1] != len(self.findings):
            raise ValueError(f"scores {scores.shape} and labels {labels.shape} must both be (N, {len(self.findings)})")
        if not np.all(np.isfinite(scores)):
            raise ValueError("scores contain NaN or inf")
        self.scores.append(scores)
        self.labels.append(labels)

    def compute(self) -> dict[str, float]:
        if not self.scores:
            return {f: math.nan for f in self.findings}
        scores, labels = np.concatenate(self.scores), np.concatenate(self.labels)
        return {f: roc_auc(scores[:, c], labels[:, c]) for c, f in enumerate(self.findings)}


MAXBOXACC_IOUS = (0.3, 0.5, 0.7)
MAXBOXACC_THRESHOLDS = tuple(round(0.01 * k, 2) for k in range(100))  # 0.00 .. 0.99, as wsolevaluation


def component_boxes(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """Boxes (K, 4) xyxy of every 8-connected component of ``heatmap >= threshold`` (continuous
    pixel coordinates of the heatmap grid: pixel (i, j) covers [j, j + 1) x [i, i + 1))."""
    from scipy.ndimage import find_objects

    from cxr_miner.miner.boxes import label_components

    spans = find_objects(label_components(heatmap >= threshold)[0])  # a slice pair per component, in label order
    return np.array([(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in spans], dtype=np.float64).reshape(-1, 4)


# 8-connected within a slice of a (T, H, W) stack of masks, not connected across slices
_IN_SLICE_EIGHT_CONNECTED = np.pad(np.ones((1, 3, 3), dtype=bool), ((1, 1), (0, 0), (0, 0)))


def component_boxes_by_threshold(heatmap: np.ndarray, thresholds: Sequence[float]) -> list[np.ndarray]:
    """``component_boxes(heatmap, tau)`` for every tau of ``thresholds``, from one labelling of the
    stack of masks (T, H, W) whose structure connects pixels within a slice only: the same
    components (scipy numbers a slice's in row-major order of their first pixel, as it does one
    mask's), without T calls' overhead (100 thresholds of a 32 x 32 map: 3.3 against 10.4 ms)."""
    from scipy.ndimage import find_objects, label

    masks = np.asarray(heatmap)[None] >= np.asarray(thresholds, dtype=np.float64)[:, None, None]
    spans = find_objects(label(masks, structure=_IN_SLICE_EIGHT_CONNECTED)[0])
    boxes = np.array([(s[2].start, s[1].start, s[2].stop, s[1].stop) for s in spans], dtype=np.float64).reshape(-1, 4)
    slices = np.array([s[0].start for s in spans], dtype=np.int64)
    return [boxes[slices == t] for t in range(len(thresholds))]


class MaxBoxAccumulator:
    """MaxBoxAccV2 per finding (Choe et al., CVPR 2020; clovaai/wsolevaluation, multi-contour).

    For each heatmap threshold tau (on the heatmap min-max normalised per image), every connected
    component above tau gives a box; an (image, finding) pair is a hit at (tau, delta) when one of
    those boxes has IoU >= delta with one of its ground-truth boxes. BoxAcc(tau, delta) is the
    share of pairs that hit; MaxBoxAccV2 = mean over delta in (0.3, 0.5, 0.7) of max over tau of
    BoxAcc(tau, delta). It judges a method's heatmaps apart from any box rule: the best threshold
    is found per delta, as the metric's definition says (an upper bound for a fixed rule).
    """

    def __init__(
        self, thresholds: Sequence[float] = MAXBOXACC_THRESHOLDS, ious: Sequence[float] = MAXBOXACC_IOUS
    ) -> None:
        self.thresholds, self.ious = tuple(thresholds), tuple(ious)
        self.hits: dict[str, np.ndarray] = {}  # finding -> (thresholds, ious) hit counts
        self.pairs: dict[str, int] = defaultdict(int)

    def accumulate(self, finding: str, heatmap: np.ndarray, truth, to_truth_grid=None) -> None:
        """One (image, finding) pair. ``heatmap`` (h, w); ``truth`` (M, 4) xyxy ground-truth boxes;
        ``to_truth_grid`` maps boxes (K, 4) from the heatmap grid to the truth's grid (identity if None)."""
        heatmap = np.asarray(heatmap, dtype=np.float64)
        low, high = heatmap.min(), heatmap.max()
        normalised = (heatmap - low) / (high - low) if high > low else np.zeros_like(heatmap)
        truth = _boxes(truth)
        per_threshold = component_boxes_by_threshold(normalised, self.thresholds)
        boxes = np.concatenate(per_threshold)
        hits = np.zeros((len(self.thresholds), len(self.ious)), dtype=np.int64)
        if len(boxes) and len(truth):  # one IoU matrix for every threshold's boxes, then the best per threshold
            if to_truth_grid is not None:
                boxes = to_truth_grid(boxes)
            best_of_box = box_iou(torch.from_numpy(np.asarray(boxes, dtype=np.float64)), truth).numpy().max(axis=1)
            counts = np.array([len(b) for b in per_threshold])
            best = np.full(len(counts), -np.inf)
            best[counts > 0] = np.maximum.reduceat(best_of_box, np.cumsum(counts)[counts > 0] - counts[counts > 0])
            hits = (best[:, None] >= np.array(self.ious)[None, :]).astype(np.int64)
        self.hits[finding] = self.hits.get(finding, 0) + hits
        self.pairs[finding] += 1

    def compute(self) -> dict[str, dict]:
        """finding -> {max_box_acc_v2, per_iou: {delta: {box_acc, threshold}}, pairs}; NaN without pairs."""
        out = {}
        for finding in FINDINGS:
            n = self.pairs.get(finding, 0)
            if n == 0:
                out[finding] = {"max_box_acc_v2": math.nan, "per_iou": {}, "pairs": 0}
                continue
            accuracy = self.hits[finding] / n  # (thresholds, ious)
            best = accuracy.argmax(axis=0)
            per_iou = {
                delta: {"box_acc": float(accuracy[best[j], j]), "threshold": self.thresholds[best[j]]}
                for j, delta in enumerate(self.ious)
            }
            out[finding] = {
                "max_box_acc_v2": float(np.mean([v["box_acc"] for v in per_iou.values()])),
                "per_iou": per_iou,
                "pairs": n,
            }
        return out


def mean_auc(aucs: dict[str, float]) -> float:
    """Mean over the findings whose AUC is defined (NaN when none is)."""
    finite = [v for v in aucs.values() if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan
