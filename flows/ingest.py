"""Flow ``ingest``: a collection on disk -> W/index.parquet, W/gt_boxes.parquet, W/ingest_report.json."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.progress import progress_bar
from storage.atomic import write_json, write_parquet
from storage.index import SPLITS, assign_splits, gt_boxes_table, index_table
from storage.pseudonym import load_or_create_key
from storage.sources import SourceScan, scan_dicom, scan_nih

INDEX_FILE = "index.parquet"
GT_BOXES_FILE = "gt_boxes.parquet"
REPORT_FILE = "ingest_report.json"


def scan(root: Path, workdir: Path, dicom: bool, labels: Path | None, metadata_only: bool) -> SourceScan:
    if dicom:
        if labels is None:
            raise ValueError("--dicom needs --labels CSV (columns: path or sop_instance_uid, findings)")
        key = load_or_create_key(workdir / "secrets" / "pseudonym.key")
        with progress_bar("reading DICOM headers", None) as advance:
            return scan_dicom(root, labels, key, progress=advance)
    with progress_bar("indexing NIH metadata", None) as advance:
        return scan_nih(root, metadata_only=metadata_only, progress=advance)


def write_outputs(scan: SourceScan, root: Path, workdir: Path, val_fraction: float, test_fraction: float, source: str) -> dict[str, Any]:
    assign_splits(
        scan.records, scan.official_split, val_fraction=val_fraction, test_fraction=test_fraction,
        source=scan.metadata_files.get("test_list", str(root)),
    )
    boxed = {box.image_id for box in scan.boxes}
    for record in scan.records:
        record["has_box"] = record["image_id"] in boxed
    write_parquet(workdir / INDEX_FILE, index_table(scan.records))
    write_parquet(workdir / GT_BOXES_FILE, gt_boxes_table(scan.boxes))
    index_sha = hashlib.sha256((workdir / INDEX_FILE).read_bytes()).hexdigest()
    report = {
        "source": source,
        "root": str(root.resolve()),
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


# One task: the records (hundreds of thousands of dicts) never cross a task boundary,
# where Prefect would walk every one of them.
@task(cache_policy=NO_CACHE)
def index_collection(
    root: Path, workdir: Path, dicom: bool, labels: Path | None, metadata_only: bool, val_fraction: float, test_fraction: float
) -> dict[str, Any]:
    """Scan the source, assign splits, write index, ground-truth boxes and the report."""
    found = scan(root, workdir, dicom, labels, metadata_only)
    return write_outputs(found, root, workdir, val_fraction, test_fraction, "dicom" if dicom else "nih")


@flow(name="ingest", log_prints=True)
def ingest(
    root: str,
    workdir: str,
    dicom: bool = False,
    labels: str | None = None,
    metadata_only: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> dict[str, Any]:
    """Index a collection: NIH layout (default) or a DICOM tree with a labels CSV."""
    root_path, work = Path(root), Path(workdir)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root_path}: dataset root is not a folder")
    work.mkdir(parents=True, exist_ok=True)
    report = index_collection(root_path, work, dicom, Path(labels) if labels else None, metadata_only, val_fraction, test_fraction)
    logger = get_run_logger()
    logger.info(
        "indexed %d images (%d missing, %d unlisted files, %d ground-truth boxes) into %s",
        report["rows"], len(report["missing"]), len(report["unlisted"]), report["gt_boxes"], work / INDEX_FILE,
    )
    return report
