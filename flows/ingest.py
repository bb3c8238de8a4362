"""Flow ``ingest``: a collection on disk -> W/index.parquet, W/gt_boxes.parquet, W/ingest_report.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import check_ingest
from cxr_miner.flows.progress import progress_bar
from cxr_miner.storage.inputs.pseudonym import load_or_create_key
from cxr_miner.storage.inputs.sources import SourceScan, scan_dicom, scan_nih
from cxr_miner.storage.stages.index import INDEX_FILE, MAX_SHRINK, write_index
from cxr_miner.storage.vocab.errors import MissingInput, SettingError

__all__ = ["ingest"]


def scan(
    root: Path, workdir: Path, dicom: bool, labels: Path | None, metadata_only: bool, allow_outside_links: bool
) -> SourceScan:
    if dicom:
        if labels is None:
            raise SettingError("--dicom needs --labels CSV (columns: path or sop_instance_uid, findings)")
        key = load_or_create_key(workdir / "secrets" / "pseudonym.key")
        with progress_bar("reading DICOM headers", None) as advance:
            return scan_dicom(root, labels, key, progress=advance, allow_outside_links=allow_outside_links)
    with progress_bar("indexing NIH metadata", None) as advance:
        return scan_nih(root, metadata_only=metadata_only, progress=advance, allow_outside_links=allow_outside_links)


# One task: the records (hundreds of thousands of dicts) never cross a task boundary,
# where Prefect would walk every one of them.
@task(cache_policy=NO_CACHE)
def index_collection(
    root: Path,
    workdir: Path,
    dicom: bool,
    labels: Path | None,
    metadata_only: bool,
    val_fraction: float,
    test_fraction: float,
    max_shrink: float | None,
    allow_outside_links: bool,
) -> dict[str, Any]:
    """Scan the source, assign splits, write index, ground-truth boxes and the report."""
    found = scan(root, workdir, dicom, labels, metadata_only, allow_outside_links)
    return write_index(
        found,
        root,
        workdir,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        source="dicom" if dicom else "nih",
        max_shrink=max_shrink,
        allow_outside_links=allow_outside_links,
        before_report=lambda: maybe_fail("ingest"),
    )


@flow(name="ingest", log_prints=True)
@writes_into("workdir", creates=("workdir",))
def ingest(
    root: str,
    workdir: str,
    dicom: bool = False,
    labels: str | None = None,
    metadata_only: bool = False,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    allow_shrink: bool = False,
    max_shrink: float = MAX_SHRINK,
    allow_outside_links: bool = False,
) -> dict[str, Any]:
    """Index a collection: NIH layout (default) or a DICOM tree with a labels CSV.

    An ingest that finds no images, or (unless ``allow_shrink``) more than ``max_shrink`` fewer
    usable images than the existing index, is refused before anything is written. A symbolic link
    out of ROOT stops the ingest unless ``allow_outside_links``; files that are not regular files
    (FIFOs, devices) are reported in the ingest report's ``skipped``, never opened."""
    check_ingest(val_fraction, test_fraction, max_shrink)
    root_path, work = Path(root), Path(workdir)
    if not root_path.is_dir():
        raise MissingInput(f"{root_path}: dataset root is not a folder")
    report = index_collection(
        root_path,
        work,
        dicom,
        Path(labels) if labels else None,
        metadata_only,
        val_fraction,
        test_fraction,
        None if allow_shrink else max_shrink,
        allow_outside_links,
    )
    logger = get_run_logger()
    logger.info(
        "indexed %d images (%d missing, %d unlisted files, %d skipped, %d ground-truth boxes) into %s",
        report["rows"],
        len(report["missing"]),
        len(report["unlisted"]),
        len(report["skipped"]),
        report["gt_boxes"],
        work / INDEX_FILE,
    )
    return report
