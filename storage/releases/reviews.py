"""Reviewers' verdicts on released boxes: ``W/reviews.sqlite`` (SQLite in WAL mode), append only.

One row per verdict: the box (``box_id``, boxes.parquet's, stable across releases while the box
is the same; its image, finding and corners as released), the release version, the verdict
(``accept``, ``reject``, ``redraw`` with the new box, ``skip``), the reviewer and the UTC time.
Nothing is updated in place but ``undone``: undo marks a reviewer's latest verdict in a release
undone, and the box's verdict is then its latest row not undone. Every write is its own
transaction (``BEGIN IMMEDIATE``), committed before the call returns, so a verdict survives a
crash of the process that wrote it, and reviewers in several processes at once wait for each other
(``busy_timeout``) instead of failing. Boxes are in source pixels, xyxy, continuous coordinates
(pixel (i, j) covers [i, i + 1) x [j, j + 1)), as in boxes.parquet.
"""

from __future__ import annotations

import math
import numbers
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa

from cxr_miner.storage.releases.coco import CATEGORIES
from cxr_miner.storage.stages.atomic import write_json, write_parquet
from cxr_miner.storage.stages.index import GT_BOXES_FILE, read_gt_boxes
from cxr_miner.storage.vocab.errors import InputError
from cxr_miner.storage.vocab.findings import FINDINGS

REVIEWS_FILE = "reviews.sqlite"
VERDICTS = ("accept", "reject", "redraw", "skip")
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    box_id TEXT NOT NULL,
    release TEXT NOT NULL,
    image_id TEXT NOT NULL,
    finding TEXT NOT NULL,
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    box_x_min REAL NOT NULL, box_y_min REAL NOT NULL, box_x_max REAL NOT NULL, box_y_max REAL NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('accept', 'reject', 'redraw', 'skip')),
    x_min REAL, y_min REAL, x_max REAL, y_max REAL,
    reviewer TEXT NOT NULL,
    at TEXT NOT NULL,
    undone INTEGER NOT NULL DEFAULT 0,
    CHECK ((verdict = 'redraw') = (x_min IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS verdicts_by_box ON verdicts (box_id, seq);
CREATE INDEX IF NOT EXISTS verdicts_by_release ON verdicts (release, reviewer, seq);
"""

# One row of verdicts, as export writes it (reviews.parquet).
VERDICT_SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("box_id", pa.string()),
        ("release", pa.string()),
        ("image_id", pa.string()),
        ("finding", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("box_x_min", pa.float32()),
        ("box_y_min", pa.float32()),
        ("box_x_max", pa.float32()),
        ("box_y_max", pa.float32()),
        ("verdict", pa.string()),
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
        ("reviewer", pa.string()),
        ("at", pa.string()),
        ("undone", pa.bool_()),
        ("current", pa.bool_()),  # the box's verdict now: its latest row not undone
    ]
)


@dataclass(frozen=True)
class ReleasedBox:
    """What a release says of one box: its image (and size), finding and corners (source pixels)."""

    box_id: str
    image_id: str
    finding: str
    image_width: int
    image_height: int
    xyxy: tuple[float, float, float, float]


class UnknownBox(InputError):
    """A verdict for a box that the release does not hold."""


class ReviewStore:
    """The verdicts in ``path`` (created on first use). One instance per thread: SQLite
    connections are not shared across threads here."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed verdict survives power loss too
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ReviewStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so that two writers queue."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def record(
        self,
        release: str,
        boxes: Mapping[str, ReleasedBox],
        box_id: str,
        verdict: str,
        reviewer: str,
        redrawn: Any = None,
    ) -> int:
        """Store a verdict on ``box_id`` of ``release`` (``boxes``: the release's boxes by id);
        returns its sequence number. A box not in the release raises UnknownBox; a bad verdict,
        reviewer or redrawn box (``redraw`` only: xyxy inside the image, with area) InputError."""
        box = boxes.get(box_id)
        if box is None:
            raise UnknownBox(f"release {release}", f"no box {shown(box_id)} in this release; verdict not stored")
        corners = check_verdict(box, verdict, reviewer, redrawn)
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO verdicts (box_id, release, image_id, finding, image_width, image_height, box_x_min,"
                " box_y_min, box_x_max, box_y_max, verdict, x_min, y_min, x_max, y_max, reviewer, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    box_id,
                    release,
                    box.image_id,
                    box.finding,
                    box.image_width,
                    box.image_height,
                    *box.xyxy,
                    verdict,
                    *corners,
                    reviewer,
                    utc_now(),
                ),
            )
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def undo(self, release: str, reviewer: str) -> dict[str, Any] | None:
        """Mark ``reviewer``'s latest verdict in ``release`` that is not undone yet as undone, and
        return it (None when there is none)."""
        with self._write() as db:
            row = db.execute(
                "SELECT * FROM verdicts WHERE release = ? AND reviewer = ? AND undone = 0 ORDER BY seq DESC LIMIT 1",
                (release, reviewer),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE verdicts SET undone = 1 WHERE seq = ?", (row["seq"],))
            return {**dict(row), "undone": 1}

    def current(self, release: str | None = None) -> list[dict[str, Any]]:
        """Each box's verdict: its latest row not undone (of ``release``, or of any release; a box
        reviewed in an earlier release keeps that verdict while its id stays), by sequence."""
        where, args = ("AND release = ?", (release,)) if release is not None else ("", ())
        rows = self._db.execute(
            "SELECT * FROM verdicts WHERE seq IN (SELECT MAX(seq) FROM verdicts WHERE undone = 0 "
            f"{where} GROUP BY box_id) ORDER BY seq",
            args,
        ).fetchall()
        return [dict(row) for row in rows]

    def progress(self, release: str | None) -> dict[str, dict[str, int]]:
        """finding -> verdict -> number of boxes of ``release`` (None: of any) with that verdict now."""
        counts: dict[str, dict[str, int]] = {}
        for row in self.current(release):
            by_verdict = counts.setdefault(row["finding"], dict.fromkeys(VERDICTS, 0))
            by_verdict[row["verdict"]] += 1
        return counts

    def rows(self) -> pa.Table:
        """Every verdict ever stored, undone ones included, by sequence (VERDICT_SCHEMA; ``current``
        marks each box's verdict now)."""
        now = {row["seq"] for row in self.current()}
        rows = [dict(row) for row in self._db.execute("SELECT * FROM verdicts ORDER BY seq")]
        marked = [{**row, "undone": bool(row["undone"]), "current": row["seq"] in now} for row in rows]
        return pa.Table.from_pylist(marked, schema=VERDICT_SCHEMA)


def check_verdict(box: ReleasedBox, verdict: str, reviewer: str, redrawn: Any) -> tuple[float | None, ...]:
    """The redrawn corners to store ((None,) * 4 unless ``redraw``), once the verdict is checked."""
    if verdict not in VERDICTS:
        raise InputError("verdict", f"{shown(verdict)} is not one of {', '.join(VERDICTS)}")
    if not reviewer.strip():
        raise InputError("reviewer", "a verdict needs the reviewer's name")
    if verdict != "redraw":
        if redrawn is not None:
            raise InputError("box", f"only a redraw carries a box, not {shown(verdict)}")
        return (None,) * 4
    x0, y0, x1, y1 = redrawn_corners(redrawn)
    if not (0 <= x0 < x1 <= box.image_width and 0 <= y0 < y1 <= box.image_height):
        raise InputError(
            "box",
            f"({x0:g}, {y0:g}, {x1:g}, {y1:g}) is not a box with area inside the "
            f"{box.image_width} x {box.image_height} image {box.image_id}",
        )
    return (x0, y0, x1, y1)


def redrawn_corners(redrawn: Any) -> tuple[float, float, float, float]:
    """A redrawn box as 4 finite floats x_min, y_min, x_max, y_max; InputError for anything else
    (not a list of 4, a value that is no real number, a bool, NaN, infinite or beyond a float)."""
    if not isinstance(redrawn, (list, tuple)) or len(redrawn) != 4:
        raise InputError(
            "box", f"a redraw needs the new box as 4 numbers x_min, y_min, x_max, y_max, not {shown(redrawn)}"
        )
    corners = []
    for value in redrawn:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputError("box", f"{shown(value)} is not a number (a redrawn box is 4 numbers)")
        try:
            corner = float(value)
        except OverflowError:
            corner = math.inf
        if not math.isfinite(corner):
            raise InputError("box", f"{shown(value)} is not a finite number (a redrawn box is 4 numbers)")
        corners.append(corner)
    x0, y0, x1, y1 = corners
    return x0, y0, x1, y1


def shown(value: Any) -> str:
    """``value`` in an error message: a scalar as written (cut at 40 characters), a container by its
    kind and length (its repr could be megabytes, or nested too deep to print)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        text = repr(value) if not isinstance(value, int) or abs(value) < 10**40 else "a huge integer"
        return text if len(text) <= 40 else text[:37] + "..."
    size = f" of {len(value)}" if isinstance(value, (list, tuple, dict)) else ""
    return f"a {type(value).__name__}{size}"


def released_boxes(table: pa.Table) -> dict[str, ReleasedBox]:
    """boxes.parquet's rows (box_id, image_id, finding, image_width, image_height, x_min..y_max)
    by box id."""
    columns = ("box_id", "image_id", "finding", "image_width", "image_height", "x_min", "y_min", "x_max", "y_max")
    data = table.select(list(columns)).to_pydict()
    return {
        b: ReleasedBox(b, i, f, w, h, (x0, y0, x1, y1))
        for b, i, f, w, h, x0, y0, x1, y1 in zip(*(data[c] for c in columns))
        if f in FINDINGS
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


REVIEWS_PARQUET = "reviews.parquet"
REVIEWED_COCO = "reviewed.json"


def ground_truth_box(row: Mapping[str, Any]) -> tuple[float, float, float, float] | None:
    """The ground-truth box a current verdict gives: the released box if accepted, the redrawn one
    if redrawn, none for a rejected or skipped box."""
    if row["verdict"] == "accept":
        return (row["box_x_min"], row["box_y_min"], row["box_x_max"], row["box_y_max"])
    if row["verdict"] == "redraw":
        return (row["x_min"], row["y_min"], row["x_max"], row["y_max"])
    return None


def reviewed_coco(current: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """COCO detection JSON of the accepted and redrawn boxes (``current``: ReviewStore.current rows)
    as ground truth: images (ids from 1 in image_id order; ``file_name`` the image id) and the 14
    findings as categories (ids as in the releases' COCO files); each annotation carries its
    ``box_id``, ``verdict``, ``release`` and ``reviewer``."""
    truth = [(row, box) for row in current if (box := ground_truth_box(row)) is not None]
    sizes = {row["image_id"]: (row["image_width"], row["image_height"]) for row, _ in truth}
    ids = {image: k for k, image in enumerate(sorted(sizes), start=1)}
    images = [{"id": k, "file_name": i, "width": sizes[i][0], "height": sizes[i][1]} for i, k in ids.items()]
    annotations = []
    for k, (row, (x0, y0, x1, y1)) in enumerate(truth, start=1):
        annotations.append(
            {
                "id": k,
                "image_id": ids[row["image_id"]],
                "category_id": FINDINGS.index(row["finding"]) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
                **{key: row[key] for key in ("box_id", "verdict", "release", "reviewer")},
            }
        )
    info = {"description": "cxr-miner reviewed boxes (accepted and redrawn) as ground truth"}
    return {"info": info, "licenses": [], "categories": CATEGORIES, "images": images, "annotations": annotations}


def export_reviews(store: ReviewStore, out: Path) -> dict[str, int]:
    """``out/reviews.parquet`` (every verdict, VERDICT_SCHEMA) and ``out/reviewed.json`` (COCO of
    the accepted and redrawn boxes), each written atomically; returns the counts written."""
    table = store.rows()
    coco = reviewed_coco(store.current())
    write_parquet(out / REVIEWS_PARQUET, table)
    write_json(out / REVIEWED_COCO, coco)
    return {"verdicts": table.num_rows, "boxes": len(coco["annotations"]), "images": len(coco["images"])}


def reviewed_truth(current: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """The ground truth reviews give (``current``: ReviewStore.current rows): image id -> finding ->
    the accepted and redrawn boxes [[x_min, y_min, x_max, y_max], ...] in source pixels, in the
    shape of storage.stages.index.read_gt_boxes (NIH's boxes), to be kept apart from them."""
    truth: dict[str, dict[str, list[list[float]]]] = {}
    for row in current:
        if (box := ground_truth_box(row)) is not None:
            truth.setdefault(row["image_id"], {}).setdefault(row["finding"], []).append([float(v) for v in box])
    return truth


def reviewed_rejections(current: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """The boxes reviewers rejected (``current``: ReviewStore.current rows): image id -> finding ->
    [[x_min, y_min, x_max, y_max], ...] in source pixels, as released."""
    rejected: dict[str, dict[str, list[list[float]]]] = {}
    for row in current:
        if row["verdict"] == "reject":
            box = [float(row[k]) for k in ("box_x_min", "box_y_min", "box_x_max", "box_y_max")]
            rejected.setdefault(row["image_id"], {}).setdefault(row["finding"], []).append(box)
    return rejected


def _current_verdicts(workdir: Path) -> list[Mapping[str, Any]]:
    """``workdir``'s review store's current verdicts (none without a store)."""
    path = Path(workdir) / REVIEWS_FILE
    if not path.exists():
        return []
    with ReviewStore(path) as store:
        return list(store.current())


def read_reviewed_truth(workdir: Path) -> dict[str, dict[str, list[list[float]]]]:
    """``reviewed_truth`` of ``workdir``'s review store (empty without one)."""
    return reviewed_truth(_current_verdicts(workdir))


def read_rejections(workdir: Path) -> dict[str, dict[str, list[list[float]]]]:
    """``reviewed_rejections`` of ``workdir``'s review store (empty without one)."""
    return reviewed_rejections(_current_verdicts(workdir))


def read_negatives(workdir: Path, truth: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """The rejected boxes (reviewed_rejections) of ``workdir``'s (image, finding) pairs that have no
    box in ``truth`` (image id -> finding -> boxes): the pairs whose boxes are known only to be
    wrong, negatives for calibration and precision (miner.evaluation.score_rejected_pair). A
    rejected box of a pair with truth needs no such use: it is scored against that truth."""
    rejected = read_rejections(workdir)
    negatives: dict[str, dict[str, list[list[float]]]] = {}
    for image, found in rejected.items():
        for finding, boxes in found.items():
            if finding not in truth.get(image, {}):
                negatives.setdefault(image, {})[finding] = boxes
    return negatives


def count_negatives(
    sources: dict[str, dict[str, int]], negatives: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """``sources`` (finding -> images boxed by "nih" and "review") with each finding's images of
    ``negatives`` (read_negatives) counted as "rejected"."""
    for finding in (f for found in negatives.values() for f in found):
        counts = sources.setdefault(finding, {"nih": 0, "review": 0})
        counts["rejected"] = counts.get("rejected", 0) + 1
    return sources


def merged_truth(
    nih: Mapping[str, Mapping[str, list[list[float]]]], reviewed: Mapping[str, Mapping[str, list[list[float]]]]
) -> tuple[dict[str, dict[str, list[list[float]]]], dict[str, dict[str, int]]]:
    """NIH's boxes and the reviewers' as one truth (image id -> finding -> boxes), and per finding
    how many images each source gives it: {finding: {"nih": n, "review": m}}."""
    truth = {image: {f: list(boxes) for f, boxes in found.items()} for image, found in nih.items()}
    for image, found in reviewed.items():
        for finding, boxes in found.items():
            truth.setdefault(image, {}).setdefault(finding, []).extend(boxes)
    sources: dict[str, dict[str, int]] = {}
    for source, found_by_image in (("nih", nih), ("review", reviewed)):
        for finding in (f for found in found_by_image.values() for f in found):
            sources.setdefault(finding, {"nih": 0, "review": 0})[source] += 1
    return truth, sources


def read_ground_truth(workdir: Path) -> tuple[dict[str, dict[str, list[list[float]]]], dict[str, dict[str, int]]]:
    """merged_truth of ``workdir``: NIH's boxes (gt_boxes.parquet) and its reviewers' (reviews.sqlite),
    what evaluate scores on and MIL learns from."""
    return merged_truth(read_gt_boxes(Path(workdir) / GT_BOXES_FILE), read_reviewed_truth(workdir))
