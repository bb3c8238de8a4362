"""box-val / box-test: by patient, reproducible, about the asked fraction."""

from __future__ import annotations

import pytest

from cxr_miner.storage.stages.box_splits import BOX_TEST, BOX_VAL, box_folds, box_split, box_splits, box_subset


def test_patients_never_straddle_the_halves_and_the_fraction_holds():
    patients = {f"{p:08d}_{k:03d}.png": f"P{p}" for p in range(2000) for k in range(3)}
    halves = box_splits(patients, patients)
    by_patient = {}
    for image, half in halves.items():
        by_patient.setdefault(patients[image], set()).add(half)
    assert all(len(sides) == 1 for sides in by_patient.values())
    share = sum(sides == {BOX_VAL} for sides in by_patient.values()) / len(by_patient)
    assert 0.46 < share < 0.54  # 2,000 patients: 0.5 +- 4 standard deviations of 0.011
    assert box_splits(patients, patients) == halves  # reproducible


def test_the_fraction_moves_patients_one_way_only():
    """A patient in box-val at 0.3 stays there at 0.5: growing box-val only takes from box-test."""
    patients = [f"P{p}" for p in range(500)]
    small = {p for p in patients if box_split(p, 0.3) == BOX_VAL}
    large = {p for p in patients if box_split(p, 0.5) == BOX_VAL}
    assert small < large and box_split("P1", 0.999) in (BOX_VAL, BOX_TEST)


def test_an_image_without_patient_is_its_own_patient_and_bad_fractions_are_refused():
    assert box_splits({"a.png": None}, ["a.png"]) == {"a.png": box_split("a.png")}
    with pytest.raises(ValueError, match="box-val fraction"):
        box_split("P1", 1.0)


def test_folds_are_by_patient_reproducible_and_about_equal():
    patients = {f"{p:08d}_{k:03d}.png": f"P{p}" for p in range(1000) for k in range(2)}
    folds = box_folds(patients, patients, 5)
    assert set(folds.values()) == set(range(5)) and box_folds(patients, patients, 5) == folds
    assert all(folds[f"{p:08d}_000.png"] == folds[f"{p:08d}_001.png"] for p in range(1000))
    sizes = [list(folds.values()).count(k) / 2 for k in range(5)]
    assert all(160 < n < 240 for n in sizes)  # 1,000 patients: 200 +- 4 standard deviations of 12.6
    with pytest.raises(ValueError, match="at least 2"):
        box_folds(patients, patients, 1)


def test_box_subsets_grow_with_the_fraction_and_keep_patients_whole():
    patients = {f"{p:08d}_{k:03d}.png": f"P{p}" for p in range(1000) for k in range(2)}
    subsets = [box_subset(patients, patients, f) for f in (0.0, 0.2, 0.4, 0.8, 1.0)]
    assert subsets[0] == set() and subsets[-1] == set(patients)
    assert all(small < large for small, large in zip(subsets, subsets[1:]))
    assert all((f"{p:08d}_000.png" in subsets[2]) == (f"{p:08d}_001.png" in subsets[2]) for p in range(1000))
    assert 0.34 < len(subsets[2]) / len(patients) < 0.46  # 0.4 +- 4 standard deviations of 0.015
    with pytest.raises(ValueError, match="box fraction"):
        box_subset(patients, patients, 1.5)
