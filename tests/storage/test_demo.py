"""Demo data: the NIH layout exactly, reproducible from the seed, findings where the boxes say."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from cxr_miner.storage.inputs.nih import read_bbox_list, read_data_entry
from cxr_miner.storage.phantoms.generator import BBOX_HEADER, DATA_ENTRY_HEADER, generate, plan_images, render
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS


def _digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    generate(root, n_images=30, size=128, seed=3, corrupt=3, box_fraction=0.2)
    return root


def test_layout_and_headers(demo):
    lines = (demo / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    assert lines[0] == DATA_ENTRY_HEADER and len(lines) == 31
    assert (
        (demo / "BBox_List_2017.csv").read_text().splitlines()[0]
        == BBOX_HEADER
        == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    )
    assert len(list((demo / "images_001" / "images").glob("*.png"))) == 30
    rows = read_data_entry(demo / "Data_Entry_2017_v2020.csv")  # parses with the real parser
    boxes = read_bbox_list(demo / "BBox_List_2017.csv")
    assert {b.finding for b in boxes} <= set(BOXED_FINDINGS)
    labelled = {r.image_id: r.findings for r in rows}
    assert all(b.finding in labelled[b.image_id] for b in boxes)
    if any(b.finding == "Infiltration" for b in boxes):
        assert "Infiltrate," in (demo / "BBox_List_2017.csv").read_text()


def test_split_lists_are_patient_disjoint_and_complete(demo):
    test = set((demo / "test_list.txt").read_text().split())
    train_val = set((demo / "train_val_list.txt").read_text().split())
    assert not test & train_val and len(test | train_val) == 30
    patient = lambda name: name.split("_")[0]  # noqa: E731
    assert not {patient(n) for n in test} & {patient(n) for n in train_val}


def test_corrupt_files_are_planted(demo):
    corrupt = json.loads((demo / "demo_manifest.json").read_text())["corrupt"]
    assert sorted(corrupt.values()) == ["text", "truncated", "zero-bytes"]
    for name, kind in corrupt.items():
        data = (demo / "images_001" / "images" / name).read_bytes()
        assert {
            "zero-bytes": data == b"",
            "text": data.startswith(b"this is not"),
            "truncated": data[:4] == b"\x89PNG",
        }[kind]


def test_same_seed_same_bytes_other_seed_other_bytes(demo, tmp_path):
    generate(tmp_path / "again", n_images=30, size=128, seed=3, corrupt=3, box_fraction=0.2)
    assert _digest(tmp_path / "again") == _digest(demo)
    generate(tmp_path / "other", n_images=30, size=128, seed=4, corrupt=3, box_fraction=0.2)
    assert _digest(tmp_path / "other") != _digest(demo)


@pytest.mark.parametrize("finding", ["Nodule", "Mass", "Consolidation", "Atelectasis"])
def test_finding_is_drawn_inside_its_box(finding):
    """The box holds brighter pixels than the same image without the finding."""
    plan = next(p for p in plan_images(600, 256, 11, 0.0) if p.findings == (finding,))
    with_finding, boxes = render(plan, 11)
    without, _ = render(plan.__class__(**{**plan.__dict__, "findings": ()}), 11)  # same anatomy and noise
    x0, y0, x1, y1 = (int(round(v)) for v in boxes[finding])
    inside = with_finding[y0:y1, x0:x1].astype(float) - without[y0:y1, x0:x1].astype(float)
    outside = with_finding.astype(float) - without.astype(float)
    outside[y0:y1, x0:x1] = 0
    assert inside.mean() > 15 and np.abs(outside).mean() < 0.5


def test_truth_lists_every_drawn_finding(demo):
    truth = list(csv.DictReader(open(demo / "demo_truth.csv")))
    rows = read_data_entry(demo / "Data_Entry_2017_v2020.csv")
    assert sorted((t["image_id"], t["finding"]) for t in truth) == sorted(
        (r.image_id, f) for r in rows for f in r.findings
    )
