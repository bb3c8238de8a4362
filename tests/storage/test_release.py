"""Release building blocks on hand-made rows: normalised coordinates, COCO records, the box
diff between releases, versions, publishing and the ``latest`` pointer."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_miner.storage.releases.coco import coco_annotation, write_coco
from cxr_miner.storage.releases.release import (
    RELEASE_SCHEMA,
    ReleaseExists,
    box_id,
    count_boxes,
    diff_boxes,
    latest_release,
    new_version,
    publish,
    release_rows,
    staging_dir,
)
from cxr_miner.storage.stages.harvest import PART_SCHEMA, part_key, read_part, write_part

IMAGES = pa.table(
    {
        "image_id": ["a.png", "b.png"],
        "patient_id": ["1", "2"],
        "split": ["train", "test"],
        "source_path": ["images/a.png", "images/b.png"],
        "width": pa.array([200, 100], pa.int32()),
        "height": pa.array([100, 50], pa.int32()),
    }
)


def box(image_id, finding, rank, x0, y0, x1, y1, score=0.5, at_point=False, rule_rank=None):
    return {
        "image_id": image_id,
        "finding": finding,
        "rank": rank,
        "rule_rank": rule_rank or rank,
        "x_min": x0,
        "y_min": y0,
        "x_max": x1,
        "y_max": y1,
        "score": score,
        "probability": 0.9,
        "confidence": None,
        "at_operating_point": at_point,
        "method": "am",
        "model_id": "t@abc",
    }


def part(rows) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=PART_SCHEMA)


def test_release_rows_join_the_image_and_normalise_by_its_size():
    rows = release_rows(
        part([box("b.png", "Mass", 1, 10, 5, 60, 25), box("a.png", "Nodule", 1, 50, 20, 150, 80)]), IMAGES
    )
    assert rows.schema.equals(RELEASE_SCHEMA)
    first, second = rows.to_pylist()  # sorted by image id
    assert (first["image_id"], first["split"], first["patient_id"]) == ("a.png", "train", "1")
    assert [first[k] for k in ("x_min_norm", "y_min_norm", "x_max_norm", "y_max_norm")] == pytest.approx(
        [0.25, 0.2, 0.75, 0.8]
    )
    assert [second[k] for k in ("x_min_norm", "y_min_norm", "x_max_norm", "y_max_norm")] == pytest.approx(
        [0.1, 0.1, 0.6, 0.5]
    )
    assert (second["method"], second["model_id"], second["image_width"]) == ("am", "t@abc", 100)
    assert (first["rank"], first["rule_rank"]) == (1, 1)


def test_a_box_is_named_by_its_image_finding_and_corners_alone():
    """box_id is the first 16 hex digits of SHA-256 over 'image/finding/x0,y0,x1,y1' (2 decimals):
    the same box in a later release, ranked, scored and made otherwise, keeps its id."""
    import hashlib

    expected = hashlib.sha256(b"a.png/Nodule/50.00,20.00,150.00,80.00").hexdigest()[:16]
    assert box_id("a.png", "Nodule", [50, 20, 150, 80]) == expected
    first = release_rows(part([box("a.png", "Nodule", 1, 50, 20, 150, 80)]), IMAGES)
    again = release_rows(part([{**box("a.png", "Nodule", 2, 50, 20, 150, 80, score=0.1), "method": "cam"}]), IMAGES)
    moved = release_rows(part([box("a.png", "Nodule", 1, 50, 20, 150, 80.5)]), IMAGES)
    other = release_rows(part([box("a.png", "Mass", 1, 50, 20, 150, 80)]), IMAGES)
    ids = [t.column("box_id")[0].as_py() for t in (first, again, moved, other)]
    assert ids[0] == ids[1] == expected and len(set(ids)) == 3
    twice = release_rows(part([box("a.png", "Nodule", k, 50, 20, 150, 80) for k in (1, 2)]), IMAGES)
    assert twice.column("box_id").to_pylist() == [expected, f"{expected}-2"]


def test_boxes_of_images_outside_the_index_are_refused():
    with pytest.raises(ValueError, match="not in the index, e.g. 'zzz.png'"):
        release_rows(part([box("zzz.png", "Mass", 1, 0, 0, 1, 1)]), IMAGES)


def test_coco_annotation_by_hand():
    a = coco_annotation(7, 3, {**box("a.png", "Cardiomegaly", 2, 10, 20, 40, 60, 0.25, rule_rank=1), "method": "cam"})
    assert a == {
        "id": 7,
        "image_id": 3,
        "category_id": 2,
        "bbox": [10.0, 20.0, 30.0, 40.0],
        "area": 1200.0,
        "iscrowd": 0,
        "segmentation": [[10.0, 20.0, 40.0, 20.0, 40.0, 60.0, 10.0, 60.0]],
        "score": 0.25,
        "confidence": None,
        "rank": 2,
        "rule_rank": 1,
        "method": "cam",
    }
    # a calibrated box: its COCO score is its confidence (what detector evaluation ranks by)
    b = coco_annotation(1, 1, {**box("a.png", "Mass", 1, 0, 0, 1, 1, 0.25), "confidence": 0.6})
    assert (b["score"], b["confidence"]) == (0.6, 0.6)


def test_write_coco_numbers_images_and_annotations_from_one(tmp_path):
    from pycocotools.coco import COCO

    images = [{"image_id": i, "source_path": f"images/{i}", "width": 100, "height": 80} for i in ("c.png", "a.png")]
    chunks = [[box("c.png", "Mass", 1, 1, 2, 11, 22)], [box("a.png", "Edema", 1, 0, 0, 5, 5)]]
    counts = write_coco(tmp_path / "x.json", images, chunks, {"version": "v"})
    coco = COCO(str(tmp_path / "x.json"))
    assert counts == {"images": 2, "annotations": 2}
    assert [(i["id"], i["image_name"]) for i in coco.loadImgs(coco.getImgIds())] == [(1, "a.png"), (2, "c.png")]
    assert coco.loadAnns(1)[0]["image_id"] == 2 and coco.loadAnns(2)[0]["image_id"] == 1
    with pytest.raises(ValueError, match="box of image 'q.png'"):
        write_coco(tmp_path / "y.json", images, [[box("q.png", "Mass", 1, 0, 0, 1, 1)]], {})
    assert not (tmp_path / "y.json").exists()


def test_diff_counts_added_and_removed_boxes(tmp_path):
    def write(name, rows):
        pq.write_table(release_rows(part(rows), IMAGES), tmp_path / name)
        return tmp_path / name

    old = write(
        "old.parquet",
        [
            box("a.png", "Mass", 1, 0, 0, 10, 10),
            box("a.png", "Mass", 2, 0, 0, 20, 20),
            box("b.png", "Edema", 1, 1, 1, 2, 2),
        ],
    )
    new = write(
        "new.parquet",
        [
            box("a.png", "Mass", 1, 0, 0, 10, 10, at_point=True),
            box("a.png", "Mass", 2, 0, 0, 21, 20),
            box("b.png", "Nodule", 1, 1, 1, 2, 2),
        ],
    )
    changes = diff_boxes(old, new)
    assert changes["Mass"] == {"before": 2, "after": 2, "added": 1, "removed": 1}  # rank 2 moved
    assert changes["Edema"] == {"before": 1, "after": 0, "added": 0, "removed": 1}
    assert changes["Nodule"] == {"before": 0, "after": 1, "added": 1, "removed": 0}
    assert diff_boxes(None, new)["Mass"] == {"before": 0, "after": 2, "added": 2, "removed": 0}
    assert count_boxes(new)["Mass"] == {"boxes": 2, "images": 1, "at_operating_point": 1}
    assert count_boxes(new)["Hernia"] == {"boxes": 0, "images": 0, "at_operating_point": 0}


def test_versions_sort_by_time_and_publish_moves_latest(tmp_path):
    early = new_version(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert early == "20260102T030405Z" and early < new_version(datetime(2026, 1, 2, 3, 4, 6, tzinfo=timezone.utc))
    assert latest_release(tmp_path) is None
    for version in ("20260102T030405Z", "20260102T030406Z"):
        staging = staging_dir(tmp_path, version)
        (staging / "f.txt").write_text(version)
        publish(staging, tmp_path, version)
        assert latest_release(tmp_path).name == version and not staging.exists()
    staging = staging_dir(tmp_path, "20260102T030405Z")
    with pytest.raises(ReleaseExists):
        publish(staging, tmp_path, "20260102T030405Z")
    assert (tmp_path / "20260102T030405Z" / "f.txt").read_text() == "20260102T030405Z"


def test_latest_never_moves_back_to_an_older_version(tmp_path):
    """Two releases that finish in the other order than they started: latest stays on the newer."""
    newer, older = staging_dir(tmp_path, "20260102T030406Z"), staging_dir(tmp_path, "20260102T030405Z")
    assert newer != staging_dir(tmp_path, "20260102T030406Z")  # each builder has a staging folder of its own
    publish(newer, tmp_path, "20260102T030406Z")
    publish(older, tmp_path, "20260102T030405Z")
    assert latest_release(tmp_path).name == "20260102T030406Z"
    assert (tmp_path / "20260102T030405Z").is_dir()


def test_parts_carry_their_key_and_image_count(tmp_path):
    path = tmp_path / "parts" / "train-00000.parquet"
    assert part_key(path) is None
    write_part(path, [box("a.png", "Mass", 1, 0, 0, 1, 1)], {"model_id": "m", "shard": "abc"}, images=5)
    assert part_key(path) == {"model_id": "m", "shard": "abc"}
    assert json.loads(pq.read_schema(path).metadata[b"cxr_miner.images"]) == 5
    assert read_part(path).num_rows == 1
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: not a harvest part"):
        read_part(tmp_path / "bad.parquet")


def test_coco_categories_state_each_findings_operating_point_and_pycocotools_reads_them(tmp_path):
    from pycocotools.coco import COCO

    from cxr_miner.storage.releases.coco import categories_with_points

    points = {
        "Mass": {
            "confidence_at_least": 0.42, "kind": "best achievable", "box_val_precision_at_least": 0.31,
            "box_test": {"pairs": 25, "precision": 0.36},
        },
        "Nodule": {"confidence_at_least": 0.7, "kind": "target", "box_val_precision_at_least": 0.55, "box_test": {}},
        "Effusion": {"confidence_at_least": None, "kind": None},  # no point: nothing stated
    }  # fmt: skip
    images = [{"image_id": "a.png", "source_path": "a.png", "width": 100, "height": 80}]
    write_coco(tmp_path / "x.json", images, [[box("a.png", "Mass", 1, 0, 0, 5, 5)]], {}, categories_with_points(points))
    categories = {c["name"]: c for c in COCO(str(tmp_path / "x.json")).loadCats(list(range(1, 15)))}
    assert categories["Mass"]["operating_point"] == {
        "confidence_at_least": 0.42, "kind": "best achievable", "box_val_precision_at_least": 0.31,
        "box_test_precision": 0.36, "box_test_pairs": 25,
    }  # fmt: skip
    assert categories["Nodule"]["operating_point"]["kind"] == "target"
    assert "operating_point" not in categories["Effusion"] and "operating_point" not in categories["Edema"]
    assert [c["id"] for c in categories.values()] == list(range(1, 15))
