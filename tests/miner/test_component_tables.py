"""The harvest's fast component tables against the straightforward ones they replaced.

``reference_table`` is the component table as first written (issue 11): every component's
maximum, mean and centroid from scipy.ndimage's labelled measurements. ``component_table``
computes them from one pass over the labelled pixels and ``peak_table`` labels only what the
peak rules keep (issue 22); both must give the same rows, value for value, and every box rule
the same boxes, on a fixed set of maps: smooth blobs upsampled as harvest upsamples them,
plateaus, ties at a threshold, a flat map, an all-zero map, noise.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy import ndimage

from cxr_miner.miner.boxes import DEFAULT_THRESHOLDS, label_components
from cxr_miner.miner.localize import upsample
from cxr_miner.miner.rules import (
    BOX_RULES,
    SWEEP_THRESHOLDS,
    Candidates,
    ComponentTable,
    box_sums,
    component_table,
    integral_image,
    integral_sums,
    peak_table,
)


@functools.cache
def reference_table(k: int, thresholds: tuple[float, ...]) -> ComponentTable:
    """The first implementation's table of MAPS[k] (computed once per map and thresholds)."""
    heatmap = MAPS[k]
    h, w = heatmap.shape
    integral = np.zeros((h + 1, w + 1))
    integral[1:, 1:] = heatmap.cumsum(0).cumsum(1)
    argmax = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    columns: list[list[np.ndarray]] = [[] for _ in range(8)]
    for threshold in thresholds:
        labels, count = label_components(heatmap >= threshold)
        if count == 0:
            continue
        boxes = np.array(
            [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndimage.find_objects(labels)], dtype=np.float64
        )
        x0, y0, x1, y1 = (boxes[:, i].astype(int) for i in range(4))
        area = (x1 - x0) * (y1 - y0)
        sums = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
        index = np.arange(1, count + 1)
        centre = (
            np.asarray(ndimage.center_of_mass(heatmap, labels, index), dtype=np.float64).reshape(-1, 2)[:, ::-1] + 0.5
        )
        means = np.asarray(ndimage.mean(heatmap, labels, index), dtype=np.float64).reshape(-1)
        for column, values in zip(
            columns,
            (
                boxes,
                np.full(count, threshold),
                np.asarray(ndimage.maximum(heatmap, labels, index)),
                sums / area,
                area / heatmap.size,
                centre,
                means,
                index == labels[argmax],
            ),
        ):
            column.append(values)
    if not columns[0]:
        empty = np.zeros(0)
        return ComponentTable(
            Candidates(np.zeros((0, 4)), empty, empty, empty, empty, empty, np.zeros((0, 2)), empty), np.zeros(0, bool)
        )
    boxes, threshold, peak, mean, area, centre, inside, holds_max = (np.concatenate(c) for c in columns)
    return ComponentTable(
        Candidates(boxes, np.zeros(len(boxes)), threshold, peak, mean, area, centre, inside), holds_max
    )


def blob_maps(count: int, side: int, size: int, seed: int) -> list[np.ndarray]:
    """Maps of ``side`` cells with 1 to 4 Gaussian blobs and noise, upsampled to ``size`` as harvest does."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] + 0.5
    maps = []
    for _ in range(count):
        m = rng.random((side, side)) * 0.1
        for _ in range(rng.integers(1, 5)):
            (cx, cy), r = rng.random(2) * side, side * (0.03 + 0.15 * rng.random())
            m += rng.random() * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        m = (m - m.min()) / (m.max() - m.min())
        maps.append(upsample(torch.from_numpy(m.astype(np.float32)), size).numpy())
    return maps


def special_maps() -> list[np.ndarray]:
    plateaus = np.zeros((12, 16))
    plateaus[2:10, 2:12], plateaus[4:8, 4:9], plateaus[5, 6], plateaus[1:3, 13:15] = 0.6, 0.8, 1.0, 0.9
    ties = np.zeros((9, 9))
    ties[1:4, 1:4], ties[5:8, 5:8], ties[2, 2] = 0.5, 0.7, 1.0  # a plateau exactly at a threshold
    two_maxima = np.zeros((8, 8))
    two_maxima[1, 1] = two_maxima[6, 6] = 1.0  # np.argmax picks the first
    return [
        plateaus,
        ties,
        two_maxima,
        np.full((10, 10), 0.6),
        np.zeros((6, 6)),
        np.full((5, 5), 0.3),
        np.random.default_rng(7).random((40, 40)),
    ]


MAPS = [*blob_maps(12, 16, 128, seed=0), *blob_maps(4, 16, 512, seed=1), *blob_maps(6, 8, 64, seed=2), *special_maps()]


def assert_same_rows(got: ComponentTable, want: ComponentTable) -> None:
    for name, a, b in zip(Candidates._fields, got.rows, want.rows):
        assert np.array_equal(a, b, equal_nan=True), f"{name}: {a} != {b}"
    assert np.array_equal(got.holds_max, want.holds_max)


@pytest.mark.parametrize("k", range(len(MAPS)))
def test_the_component_table_is_the_reference_value_for_value(k):
    assert_same_rows(component_table(MAPS[k], SWEEP_THRESHOLDS), reference_table(k, SWEEP_THRESHOLDS))


@pytest.mark.parametrize("thresholds", [DEFAULT_THRESHOLDS, SWEEP_THRESHOLDS])
def test_the_peak_table_is_the_references_rows_that_hold_the_maximum(thresholds):
    for k, heatmap in enumerate(MAPS):
        want = reference_table(k, thresholds)
        keep = np.nonzero(want.holds_max)[0]
        assert_same_rows(peak_table(heatmap, thresholds), ComponentTable(want.rows.take(keep), want.holds_max[keep]))


def test_every_rule_gives_the_references_boxes():
    for rule in BOX_RULES:
        for k, heatmap in enumerate(MAPS):
            got, want = rule.boxes(heatmap), rule.apply(reference_table(k, rule.thresholds))
            for name, a, b in zip(Candidates._fields, got, want):
                if name in ("centre", "inside") and not (
                    rule.size == "prior" if name == "centre" else rule.rank_by == "patches"
                ):
                    continue  # not computed for a rule that does not use it
                assert np.array_equal(a, b, equal_nan=True), f"{rule.name} {name}: {a} != {b}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_box_sums_are_the_integral_images_to_the_bit(dtype):
    """Boxes of every shape, one pixel wide and tall included, at the map's edges and anywhere."""
    rng = np.random.default_rng(5)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        heatmap = (rng.random((height, width)) ** rng.uniform(0.5, 4)).astype(dtype)
        y0, y1 = np.sort(rng.integers(0, height + 1, (2, 3)), axis=0)
        x0, x1 = np.sort(rng.integers(0, width + 1, (2, 3)), axis=0)
        y1, x1 = np.maximum(y1, y0 + 1).clip(max=height), np.maximum(x1, x0 + 1).clip(max=width)
        y0, x0 = np.minimum(y0, y1 - 1), np.minimum(x0, x1 - 1)
        assert np.array_equal(box_sums(heatmap, x0, y0, x1, y1), integral_sums(integral_image(heatmap), x0, y0, x1, y1))
        direct = [heatmap[a:b, c:d].astype(np.float64).sum() for a, b, c, d in zip(y0, y1, x0, x1)]
        assert np.allclose(
            box_sums(heatmap, x0, y0, x1, y1), direct, atol=1e-6 * heatmap.size
        )  # float32 prefix sums' error
