"""The index (one row per image) and ground-truth box tables, their schemas and splits.

``index.parquet`` columns are listed in INDEX_SCHEMA; README.md documents each one.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_miner.storage.inputs.nih import GroundTruthBox
from cxr_miner.storage.inputs.sources import SourceScan
from cxr_miner.storage.stages.atomic import read_json, write_json, write_parquet
from cxr_miner.storage.vocab.errors import InputError, MissingInput, SettingError
from cxr_miner.storage.vocab.findings import FINDINGS, label_vector

SPLITS = ("train", "val", "test")
INDEX_FILE = "index.parquet"
GT_BOXES_FILE = "gt_boxes.parquet"
REPORT_FILE = "ingest_report.json"

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("source_path", pa.string()),
        ("source_format", pa.string()),
        ("findings", pa.list_(pa.string())),
        *[(finding, pa.bool_()) for finding in FINDINGS],
        ("view_position", pa.string()),
        ("age", pa.int16()),
        ("sex", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("pixel_spacing_x", pa.float32()),
        ("pixel_spacing_y", pa.float32()),
        ("follow_up", pa.int32()),
        ("split", pa.string()),
        ("has_box", pa.bool_()),
        ("file_present", pa.bool_()),
    ]
)

GT_BOX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("finding", pa.string()),
        ("x_min", pa.float64()),
        ("y_min", pa.float64()),
        ("x_max", pa.float64()),
        ("y_max", pa.float64()),
    ]
)


def unit_hash(text: str, salt: str = "cxr-miner/split/v1") -> float:
    """A deterministic number in [0, 1) from ``text`` (same on every machine and run)."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def hashed_split(patient_id: str, val_fraction: float, test_fraction: float) -> str:
    u = unit_hash(patient_id)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def assign_splits(
    records: list[dict[str, Any]],
    official: Mapping[str, str] | None,
    *,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    source: str = "split lists",
) -> None:
    """Set ``record["split"]`` for every record, patient-disjoint.

    ``official`` maps image_id -> "train_val" | "test" (NIH's lists); train_val images are
    divided into train and val by patient hash. Without lists, every patient goes to
    train, val or test by hash. A patient found in two splits raises InputError.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise SettingError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    for record in records:
        patient = record["patient_id"] or record["image_id"]
        if official is None:
            record["split"] = hashed_split(patient, val_fraction, test_fraction)
            continue
        listed = official.get(record["image_id"])
        if listed is None:
            raise InputError(source, f"image {record['image_id']!r} is in neither train_val_list.txt nor test_list.txt")
        if listed == "test":
            record["split"] = "test"
        else:
            record["split"] = "val" if unit_hash(patient) < val_fraction else "train"
    check_patient_disjoint(records, source)


def check_patient_disjoint(records: Iterable[Mapping[str, Any]], source: str) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    example: dict[tuple[str, str], str] = {}
    for record in records:
        if record["patient_id"] is None:
            continue
        splits_of[record["patient_id"]].add(record["split"])
        example.setdefault((record["patient_id"], record["split"]), record["image_id"])
    for patient, splits in splits_of.items():
        if len(splits) > 1:
            where = ", ".join(f"{example[(patient, s)]} in {s}" for s in sorted(splits))
            raise InputError(source, f"patient {patient!r} is in more than one split ({where})")


def index_table(records: list[dict[str, Any]]) -> pa.Table:
    """Records with the INDEX_SCHEMA fields (the 14 booleans are derived from findings)."""
    rows = []
    for record in records:
        row = dict(record)
        row.update(zip(FINDINGS, label_vector(record["findings"])))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)


def gt_boxes_table(boxes: Iterable[GroundTruthBox]) -> pa.Table:
    return pa.Table.from_pylist([vars(box) for box in boxes], schema=GT_BOX_SCHEMA)


def read_ingest_report(workdir: Path) -> dict[str, Any]:
    """``W/ingest_report.json`` (FileNotFoundError before ingest has run)."""
    return read_json(Path(workdir) / REPORT_FILE, f"run `cxr-miner ingest ROOT --workdir {workdir}` again")


def read_gt_boxes(path: Path) -> dict[str, dict[str, list[list[float]]]]:
    """gt_boxes.parquet as image_id -> finding -> boxes [[x_min, y_min, x_max, y_max], ...] (source pixels)."""
    if not path.exists():
        raise MissingInput(f"{path}: no ground-truth boxes; run `cxr-miner ingest` first")
    grouped: dict[str, dict[str, list[list[float]]]] = defaultdict(lambda: defaultdict(list))
    for row in pq.read_table(path, columns=GT_BOX_SCHEMA.names).to_pylist():
        grouped[row["image_id"]][row["finding"]].append([row["x_min"], row["y_min"], row["x_max"], row["y_max"]])
    return {image: dict(by_finding) for image, by_finding in grouped.items()}


def read_index(path: Path) -> pa.Table:
    """index.parquet, checked against INDEX_SCHEMA."""
    if not path.exists():
        raise MissingInput(f"{path}: no index; run `cxr-miner ingest` first")
    table = pq.read_table(path)
    missing = [name for name in INDEX_SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(path, f"index lacks columns {missing}; re-run ingest")
    return table.select(INDEX_SCHEMA.names)


def image_sizes(index: pa.Table) -> dict[str, tuple[int, int]]:
    """image id -> (width, height) of its source image, from an index table: the size read from
    the file, else the metadata's original size; images with neither are left out."""
    sizes = {}
    for row in index.select(["image_id", "width", "height", "original_width", "original_height"]).to_pylist():
        width, height = row["width"] or row["original_width"], row["height"] or row["original_height"]
        if width and height:
            sizes[row["image_id"]] = (int(width), int(height))
    return sizes


MAX_SHRINK = 0.1  # an index with more than 10% fewer usable images than the last one is refused by default


def usable_images(file_present: Iterable[bool | None]) -> int:
    """Images a preprocess would read: found at ingest (True) or not checked (None, --metadata-only)."""
    return sum(present is not False for present in file_present)


def check_new_index(scan: SourceScan, root: Path, workdir: Path, max_shrink: float | None) -> None:
    """InputError, before anything is written, for an ingest that yields no images or (unless
    ``max_shrink`` is None) one with more than ``max_shrink`` fewer usable images than the index
    in ``workdir``: a half-synced collection must not make the next preprocess delete shards."""
    source = scan.metadata_files.get("data_entry") or scan.metadata_files.get("labels") or root
    usable = usable_images(r.get("file_present") for r in scan.records)
    kept = "nothing was written; the previous index and everything built from it are kept"
    if not scan.records:
        raise InputError(source, f"lists no images: {kept}")
    if usable == 0:
        raise InputError(source, f"none of its {len(scan.records)} images was found below {root}: {kept}")
    previous = workdir / INDEX_FILE
    if max_shrink is None or not previous.exists():
        return
    before = usable_images(pq.read_table(previous, columns=["file_present"]).column("file_present").to_pylist())
    if before and usable < before * (1 - max_shrink):
        raise InputError(
            source,
            f"the new index would have {usable} usable images against {before} in {previous} "
            f"({1 - usable / before:.0%} fewer, more than the {max_shrink:.0%} allowed): {kept}; "
            "pass --allow-shrink if the collection really shrank",
        )


def write_index(
    scan: SourceScan,
    root: Path,
    workdir: Path,
    *,
    val_fraction: float,
    test_fraction: float,
    source: str,
    max_shrink: float | None = MAX_SHRINK,
    allow_outside_links: bool = False,
    before_report: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Check the scan (check_new_index), assign splits and has_box, then write W/index.parquet,
    W/gt_boxes.parquet and W/ingest_report.json (``before_report()`` runs before the last)."""
    check_new_index(scan, root, workdir, max_shrink)
    assign_splits(
        scan.records,
        scan.official_split,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        source=scan.metadata_files.get("test_list", str(root)),
    )
    boxed = {box.image_id for box in scan.boxes}
    for record in scan.records:
        record["has_box"] = record["image_id"] in boxed
    write_parquet(workdir / INDEX_FILE, index_table(scan.records))
    write_parquet(workdir / GT_BOXES_FILE, gt_boxes_table(scan.boxes))
    index_sha = hashlib.sha256((workdir / INDEX_FILE).read_bytes()).hexdigest()
    if before_report:
        before_report()
    report = {
        "source": source,
        "root": str(root.resolve()),
        "allow_outside_links": allow_outside_links,
        "metadata_files": scan.metadata_files,
        "index_sha256": index_sha,
        "rows": len(scan.records),
        "files_present": sum(r.get("file_present") is True for r in scan.records),
        "files_unchecked": sum(r.get("file_present") is None for r in scan.records),
        "missing": scan.missing,
        "unlisted": scan.unlisted,
        "skipped": scan.skipped,
        "gt_boxes": len(scan.boxes),
        "unmatched_boxes": scan.unmatched_boxes,
        "splits": {split: sum(r["split"] == split for r in scan.records) for split in SPLITS},
        "split_source": "official lists" if scan.official_split else "patient hash",
        "findings": dict(Counter(f for r in scan.records for f in r["findings"])),
        "no_finding": sum(not r["findings"] for r in scan.records),
    }
    write_json(workdir / REPORT_FILE, report)
    return report
