"""Splits: official lists honoured, patients never in two splits, hashing deterministic."""

from __future__ import annotations

import pytest

from cxr_miner.storage.stages.index import assign_splits, hashed_split, image_sizes, index_table, unit_hash
from cxr_miner.storage.vocab.errors import InputError


def _records(*pairs):
    return [{"image_id": image, "patient_id": patient, "findings": []} for image, patient in pairs]


def test_official_lists_with_val_carved_by_patient():
    records = _records(("a1", "1"), ("a2", "1"), ("b1", "2"), ("c1", "3"))
    assign_splits(records, {"a1": "train_val", "a2": "train_val", "b1": "train_val", "c1": "test"}, val_fraction=0.5)
    splits = {r["image_id"]: r["split"] for r in records}
    assert splits["c1"] == "test" and splits["a1"] == splits["a2"] in {"train", "val"}
    assert splits["b1"] == ("val" if unit_hash("2") < 0.5 else "train")


def test_patient_in_two_official_splits_is_refused():
    records = _records(("a1", "1"), ("a2", "1"))
    with pytest.raises(InputError, match=r"patient '1' is in more than one split \(a2 in test, a1 in (train|val)\)"):
        assign_splits(records, {"a1": "train_val", "a2": "test"})


def test_image_in_no_list_is_refused():
    with pytest.raises(InputError, match="image 'x' is in neither train_val_list.txt nor test_list.txt"):
        assign_splits(_records(("x", "1")), {})


def test_hashed_split_fractions_and_determinism():
    splits = [hashed_split(str(p), 0.1, 0.2) for p in range(20_000)]
    assert splits == [hashed_split(str(p), 0.1, 0.2) for p in range(20_000)]
    assert splits.count("test") / 20_000 == pytest.approx(0.2, abs=0.01)
    assert splits.count("val") / 20_000 == pytest.approx(0.1, abs=0.01)


def test_index_table_derives_finding_columns():
    table = index_table([{"image_id": "a", "patient_id": "1", "findings": ["Mass", "Hernia"], "split": "train"}])
    row = table.to_pylist()[0]
    assert (row["Mass"], row["Hernia"], row["Nodule"]) == (True, True, False)


def test_gt_boxes_read_back_grouped_by_image_and_finding(tmp_path):
    from cxr_miner.storage.inputs.nih import GroundTruthBox
    from cxr_miner.storage.stages.atomic import write_parquet
    from cxr_miner.storage.stages.index import gt_boxes_table, read_gt_boxes

    boxes = [
        GroundTruthBox("a.png", "Mass", 1, 2, 3, 4),
        GroundTruthBox("a.png", "Mass", 5, 6, 7, 8),
        GroundTruthBox("b.png", "Nodule", 0, 0, 1, 1),
    ]
    write_parquet(tmp_path / "gt.parquet", gt_boxes_table(boxes))
    assert read_gt_boxes(tmp_path / "gt.parquet") == {
        "a.png": {"Mass": [[1, 2, 3, 4], [5, 6, 7, 8]]},
        "b.png": {"Nodule": [[0, 0, 1, 1]]},
    }
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_gt_boxes(tmp_path / "missing.parquet")


def test_image_sizes_prefer_the_files_size_then_the_metadatas():
    records = [
        {
            "image_id": "read",
            "patient_id": "1",
            "findings": [],
            "width": 800,
            "height": 600,
            "original_width": 1024,
            "original_height": 1024,
        },
        {
            "image_id": "metadata-only",
            "patient_id": "2",
            "findings": [],
            "original_width": 1024,
            "original_height": 990,
        },
        {"image_id": "unknown", "patient_id": "3", "findings": []},
    ]
    assert image_sizes(index_table(records)) == {"read": (800, 600), "metadata-only": (1024, 990)}
