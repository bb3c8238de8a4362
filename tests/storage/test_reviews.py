"""The review store (W/reviews.sqlite): verdicts, undo, refusals, two writing processes at once, a
writer killed mid-session, and the export read back with pycocotools and DuckDB."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3

import pyarrow as pa
import pytest

from cxr_miner.storage.releases.reviews import (
    REVIEWED_COCO,
    REVIEWS_FILE,
    REVIEWS_PARQUET,
    ReleasedBox,
    ReviewStore,
    UnknownBox,
    export_reviews,
    read_negatives,
    released_boxes,
    reviewed_rejections,
    reviewed_truth,
)
from cxr_miner.storage.vocab.errors import InputError

RELEASE = "20261205T000000Z"


def boxes(count: int = 4) -> dict[str, ReleasedBox]:
    """Box k: image img<k // 2>.png (200 x 100), Edema, corners (10 k, 10, 10 k + 20, 40)."""
    made = [
        ReleasedBox(f"b{k}", f"img{k // 2}.png", "Edema", 200, 100, (10.0 * k, 10.0, 10.0 * k + 20, 40.0))
        for k in range(count)
    ]
    return {box.box_id: box for box in made}


def test_the_latest_verdict_not_undone_is_the_boxs(tmp_path):
    known = boxes()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        store.record(RELEASE, known, "b0", "accept", "ann")
        store.record(RELEASE, known, "b1", "reject", "ann")
        store.record(RELEASE, known, "b0", "reject", "bob")  # bob overrides ann on b0
        store.record(RELEASE, known, "b2", "redraw", "ann", [1, 2, 30, 40])
        undone = store.undo(RELEASE, "ann")  # ann's latest: the redraw of b2
        assert (undone["box_id"], undone["verdict"]) == ("b2", "redraw")
        store.record(RELEASE, known, "b2", "redraw", "ann", [5, 5, 50, 50])
        now = {row["box_id"]: (row["verdict"], row["reviewer"], row["x_min"]) for row in store.current(RELEASE)}
        assert now == {"b0": ("reject", "bob", None), "b1": ("reject", "ann", None), "b2": ("redraw", "ann", 5.0)}
        assert store.progress(RELEASE) == {"Edema": {"accept": 0, "reject": 2, "redraw": 1, "skip": 0}}
        assert store.undo(RELEASE, "carol") is None
        history = store.rows()
        assert history.column("verdict").to_pylist() == ["accept", "reject", "reject", "redraw", "redraw"]
        assert history.column("undone").to_pylist() == [False, False, False, True, False]
        assert history.column("current").to_pylist() == [False, True, True, False, True]


def test_unknown_boxes_and_bad_verdicts_are_refused_and_nothing_is_stored(tmp_path):
    known = boxes()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        with pytest.raises(UnknownBox, match="release 20261205T000000Z: no box 'b9' in this release"):
            store.record(RELEASE, known, "b9", "accept", "ann")
        with pytest.raises(InputError, match="'maybe' is not one of accept, reject, redraw, skip"):
            store.record(RELEASE, known, "b0", "maybe", "ann")
        with pytest.raises(InputError, match=r"\(150, 10, 210, 40\) is not a box with area inside the 200 x 100"):
            store.record(RELEASE, known, "b0", "redraw", "ann", [150, 10, 210, 40])
        with pytest.raises(InputError, match="a redraw needs the new box"):
            store.record(RELEASE, known, "b0", "redraw", "ann")
        with pytest.raises(InputError, match="only a redraw carries a box"):
            store.record(RELEASE, known, "b0", "accept", "ann", [0, 0, 1, 1])
        with pytest.raises(InputError, match="reviewer's name"):
            store.record(RELEASE, known, "b0", "accept", " ")
        assert store.rows().num_rows == 0
    journal = sqlite3.connect(tmp_path / REVIEWS_FILE).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"


def _review_many(path, reviewer, ids, start):
    with ReviewStore(path) as store:
        known = boxes(200)
        start.wait()
        for box_id in ids:
            store.record(RELEASE, known, box_id, "accept" if int(box_id[1:]) % 3 else "reject", reviewer)


def test_two_processes_writing_at_once_lose_nothing_and_see_each_other(tmp_path):
    path = tmp_path / REVIEWS_FILE
    context = multiprocessing.get_context("spawn")
    start = context.Event()
    halves = {"ann": [f"b{k}" for k in range(0, 200, 2)], "bob": [f"b{k}" for k in range(1, 200, 2)]}
    workers = [context.Process(target=_review_many, args=(path, name, ids, start)) for name, ids in halves.items()]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    with ReviewStore(path) as store:
        now = store.current(RELEASE)
        assert sorted(row["box_id"] for row in now) == sorted(f"b{k}" for k in range(200))
        assert {row["reviewer"] for row in now} == {"ann", "bob"}
        assert store.progress(RELEASE)["Edema"]["reject"] == len(range(0, 200, 3))


def _record_and_die(path):
    store = ReviewStore(path)
    store.record(RELEASE, boxes(), "b3", "redraw", "ann", [0, 0, 10, 10])
    os._exit(9)  # no close, no cleanup: a killed server


def test_a_verdict_survives_its_writer_being_killed(tmp_path):
    path = tmp_path / REVIEWS_FILE
    worker = multiprocessing.get_context("spawn").Process(target=_record_and_die, args=(path,))
    worker.start()
    worker.join(timeout=60)
    assert worker.exitcode == 9
    with ReviewStore(path) as store:
        assert [(r["box_id"], r["verdict"], r["x_max"]) for r in store.current()] == [("b3", "redraw", 10.0)]


def test_the_export_reads_back_with_pycocotools_and_duckdb(tmp_path):
    import duckdb
    from pycocotools.coco import COCO

    known = boxes()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        store.record(RELEASE, known, "b0", "accept", "ann")  # img0, (0, 10, 20, 40)
        store.record(RELEASE, known, "b1", "reject", "ann")
        store.record(RELEASE, known, "b3", "redraw", "bob", [100, 20, 160, 90])  # img1
        store.record(RELEASE, known, "b2", "skip", "bob")
        counts = export_reviews(store, tmp_path / "export")
    assert counts == {"verdicts": 4, "boxes": 2, "images": 2}
    coco = COCO(str(tmp_path / "export" / REVIEWED_COCO))
    assert [coco.imgs[i]["file_name"] for i in sorted(coco.imgs)] == ["img0.png", "img1.png"]
    by_image = {coco.imgs[a["image_id"]]["file_name"]: a for a in coco.anns.values()}
    assert by_image["img0.png"]["bbox"] == [0.0, 10.0, 20.0, 30.0] and by_image["img0.png"]["verdict"] == "accept"
    assert by_image["img1.png"]["bbox"] == [100.0, 20.0, 60.0, 70.0] and by_image["img1.png"]["box_id"] == "b3"
    assert coco.cats[by_image["img0.png"]["category_id"]]["name"] == "Edema"
    parquet = str(tmp_path / "export" / REVIEWS_PARQUET)
    rows = duckdb.sql(f"SELECT verdict, count(*) FROM '{parquet}' WHERE current GROUP BY verdict ORDER BY 1").fetchall()
    assert rows == [("accept", 1), ("redraw", 1), ("reject", 1), ("skip", 1)]
    assert json.loads((tmp_path / "export" / REVIEWED_COCO).read_text())["annotations"][1]["reviewer"] == "bob"


def test_released_boxes_are_read_from_boxes_parquet_columns():
    table = pa.table(
        {
            "box_id": ["x1"],
            "image_id": ["a.png"],
            "finding": ["Mass"],
            "image_width": pa.array([300], pa.int32()),
            "image_height": pa.array([200], pa.int32()),
            **{k: pa.array([v], pa.float32()) for k, v in zip(("x_min", "y_min", "x_max", "y_max"), (1, 2, 3, 4))},
        }
    )
    assert released_boxes(table) == {"x1": ReleasedBox("x1", "a.png", "Mass", 300, 200, (1.0, 2.0, 3.0, 4.0))}


def test_reviewed_truth_is_the_accepted_and_redrawn_boxes_in_gt_boxes_shape(tmp_path):
    known = boxes()
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        store.record(RELEASE, known, "b0", "accept", "ann")
        store.record(RELEASE, known, "b1", "redraw", "ann", [1, 1, 9, 9])
        store.record(RELEASE, known, "b2", "reject", "ann")
        store.record(RELEASE, known, "b3", "accept", "ann")
        store.undo(RELEASE, "ann")
        assert reviewed_truth(store.current()) == {
            "img0.png": {"Edema": [[0.0, 10.0, 20.0, 40.0], [1.0, 1.0, 9.0, 9.0]]}
        }


def test_rejected_boxes_of_a_pair_without_truth_are_its_negatives(tmp_path):
    """img0: b0 rejected, b1 accepted (truth: the rejection needs no other use); img1: b2 rejected,
    b3 skipped (no truth: b2 is a negative); NIH boxes img2's Edema, where b4 is rejected."""
    known = boxes(6)
    with ReviewStore(tmp_path / REVIEWS_FILE) as store:
        for box, verdict in (("b0", "reject"), ("b1", "accept"), ("b2", "reject"), ("b3", "skip"), ("b4", "reject")):
            store.record(RELEASE, known, box, verdict, "ann")
        assert reviewed_rejections(store.current()) == {
            "img0.png": {"Edema": [[0.0, 10.0, 20.0, 40.0]]},
            "img1.png": {"Edema": [[20.0, 10.0, 40.0, 40.0]]},
            "img2.png": {"Edema": [[40.0, 10.0, 60.0, 40.0]]},
        }
    truth = {"img0.png": {"Edema": [[10.0, 10.0, 30.0, 40.0]]}, "img2.png": {"Edema": [[0.0, 0.0, 9.0, 9.0]]}}
    assert read_negatives(tmp_path, truth) == {"img1.png": {"Edema": [[20.0, 10.0, 40.0, 40.0]]}}
    assert read_negatives(tmp_path / "elsewhere", truth) == {}  # no store, no negatives


def test_rejected_only_images_are_counted_beside_the_sources():
    from cxr_miner.storage.releases.reviews import count_negatives

    sources = {"Edema": {"nih": 0, "review": 2}}
    negatives = {"a.png": {"Edema": [[0, 0, 1, 1]], "Hernia": [[0, 0, 2, 2]]}, "b.png": {"Edema": [[1, 1, 2, 2]]}}
    assert count_negatives(sources, negatives) == {
        "Edema": {"nih": 0, "review": 2, "rejected": 2},
        "Hernia": {"nih": 0, "review": 0, "rejected": 1},
    }
