"""Collections on disk -> index records: the NIH folder layout and DICOM trees.

A record is a dict with the fields of ``storage.stages.index.INDEX_SCHEMA`` except the 14
finding booleans and ``split``, which ``storage.stages.index`` derives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_miner.storage.inputs.csvtable import read_rows
from cxr_miner.storage.inputs.dicom import DicomHeader, read_header
from cxr_miner.storage.inputs.files import walk_files
from cxr_miner.storage.inputs.images import RASTER_SUFFIXES, ImageReadError, read_size
from cxr_miner.storage.inputs.nih import (
    BBOX_LIST,
    DATA_ENTRY,
    TEST_LIST,
    TRAIN_VAL_LIST,
    EntryRow,
    GroundTruthBox,
    read_bbox_list,
    read_data_entry,
    read_image_list,
)
from cxr_miner.storage.inputs.pseudonym import pseudonym
from cxr_miner.storage.vocab.errors import InputError
from cxr_miner.storage.vocab.findings import UnknownFindingError, parse_findings

Progress = Callable[[int], None]


@dataclass
class SourceScan:
    """What ingest found: index records, ground-truth boxes, and everything left out."""

    records: list[dict[str, Any]]
    boxes: list[GroundTruthBox] = field(default_factory=list)
    official_split: dict[str, str] | None = None
    missing: list[dict[str, str]] = field(default_factory=list)  # listed, no file
    unlisted: list[str] = field(default_factory=list)  # file, not listed
    unmatched_boxes: list[dict[str, Any]] = field(default_factory=list)  # box of an unknown image
    skipped: list[dict[str, str]] = field(default_factory=list)  # files that are no image
    metadata_files: dict[str, str] = field(default_factory=dict)
    root: Path | None = None

    def skip(self, path: Path, reason: str) -> None:
        """Record a file left out, with the reason (the ingest report lists them)."""
        self.skipped.append(
            {"source_path": relative_to_root(self.root, path) if self.root else str(path), "reason": reason}
        )


def relative_to_root(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def find_metadata(root: Path, name: str) -> Path | None:
    """``name`` or ``name.gz`` at the root or one folder down."""
    for candidate in [
        root / name,
        root / f"{name}.gz",
        *sorted(root.glob(f"*/{name}")),
        *sorted(root.glob(f"*/{name}.gz")),
    ]:
        if candidate.is_file():
            return candidate
    return None


def scan_nih(
    root: Path, *, metadata_only: bool = False, progress: Progress | None = None, allow_outside_links: bool = False
) -> SourceScan:
    """The NIH ChestX-ray14 layout: Data_Entry CSV, BBox list, split lists, images anywhere below.

    With ``metadata_only`` the image folders are listed but no image file is opened: sizes are
    unknown and ``file_present`` is None; an image not found gets no source path."""
    entry_path = find_metadata(root, DATA_ENTRY) or find_metadata(root, "Data_Entry_2017.csv")
    if entry_path is None:
        raise InputError(root, f"no {DATA_ENTRY} (or Data_Entry_2017.csv, optionally .gz) found")
    scan = SourceScan(records=[], metadata_files={"data_entry": str(entry_path)}, root=root)
    entries = read_data_entry(entry_path)

    files = image_files(root, scan, allow_outside_links)
    for entry in entries:
        found = files.pop(entry.image_id, None)
        if metadata_only:
            source_path, present, size = (relative_to_root(root, found) if found else None), None, None
        elif found is None:
            source_path, present, size = None, False, None
            scan.missing.append({"image_id": entry.image_id, "reason": "listed in the metadata, no file found"})
        else:
            source_path, present, size = relative_to_root(root, found), True, read_size(found)
        scan.records.append(entry_record(entry, source_path, present, size))
        if progress:
            progress(1)
    scan.unlisted = sorted(relative_to_root(root, p) for p in files.values())
    add_nih_boxes(scan, root, {entry.image_id for entry in entries})
    add_official_split(scan, root)
    return scan


def image_files(root: Path, scan: SourceScan, allow_outside_links: bool) -> dict[str, Path]:
    """file name -> path of every raster image below ``root`` (what walk_files skips is recorded in
    ``scan``); InputError for a name found twice."""
    files: dict[str, Path] = {}
    for path in walk_files(root, RASTER_SUFFIXES, on_skip=scan.skip, allow_outside_links=allow_outside_links):
        if path.name in files:
            raise InputError(path, f"image name {path.name!r} also at {files[path.name]}; image ids must be unique")
        files[path.name] = path
    return files


def entry_record(
    entry: EntryRow, source_path: str | None, present: bool | None, size: tuple[int, int] | None
) -> dict[str, Any]:
    """The index record of a Data_Entry row and what was found of its file."""
    return {
        "image_id": entry.image_id,
        "patient_id": entry.patient_id,
        "source_path": source_path,
        "source_format": "png" if entry.image_id.lower().endswith(".png") else "jpeg",
        "findings": entry.findings,
        "view_position": entry.view_position,
        "age": entry.age,
        "sex": entry.sex,
        "width": size[0] if size else None,
        "height": size[1] if size else None,
        "original_width": entry.original_width,
        "original_height": entry.original_height,
        "pixel_spacing_x": entry.pixel_spacing_x,
        "pixel_spacing_y": entry.pixel_spacing_y,
        "follow_up": entry.follow_up,
        "file_present": present,
    }


def add_nih_boxes(scan: SourceScan, root: Path, known: set[str]) -> None:
    """BBox_List_2017.csv's boxes, where there is one: of indexed images, else unmatched."""
    bbox_path = find_metadata(root, BBOX_LIST)
    if bbox_path is None:
        return
    scan.metadata_files["bbox_list"] = str(bbox_path)
    for box in read_bbox_list(bbox_path):
        if box.image_id in known:
            scan.boxes.append(box)
        else:
            scan.unmatched_boxes.append({**vars(box), "reason": "image not in the Data_Entry CSV"})


def add_official_split(scan: SourceScan, root: Path) -> None:
    """train_val_list.txt and test_list.txt, where both are: each listed image's official split;
    InputError for an image in both."""
    train_val, test = find_metadata(root, TRAIN_VAL_LIST), find_metadata(root, TEST_LIST)
    if train_val is None or test is None:
        return
    scan.metadata_files.update(train_val_list=str(train_val), test_list=str(test))
    scan.official_split = {name: "train_val" for name in read_image_list(train_val)}
    for name in read_image_list(test):
        if scan.official_split.get(name) == "train_val":
            raise InputError(test, f"image {name!r} is in both {TRAIN_VAL_LIST} and {TEST_LIST}")
        scan.official_split[name] = "test"


def read_dicom_labels(path: Path, root: Path) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Labels CSV -> ({relative path: findings}, {SOPInstanceUID: findings}).

    Columns: ``findings`` (NIH style, "A|B" or "No Finding") and ``path`` (relative to
    ROOT) or ``sop_instance_uid``, one of them per row.
    """
    by_path: dict[str, list[str]] = {}
    by_uid: dict[str, list[str]] = {}
    for line, cells in read_rows(path, {"findings": 1}, {"path": 1, "sop_instance_uid": 1}):
        try:
            findings = parse_findings(cells["findings"][0])
        except UnknownFindingError as error:
            raise InputError(path, str(error), line=line) from None
        rel = cells.get("path", [""])[0]
        uid = cells.get("sop_instance_uid", [""])[0]
        if bool(rel) == bool(uid):
            raise InputError(path, "each row needs exactly one of 'path' and 'sop_instance_uid'", line=line)
        if rel:
            key = check_inside(root, rel, path, line)
            if key in by_path:
                raise InputError(path, f"duplicate path {rel!r}", line=line)
            by_path[key] = findings
        else:
            if uid in by_uid:
                raise InputError(path, f"duplicate sop_instance_uid {uid!r}", line=line)
            by_uid[uid] = findings
    return by_path, by_uid


def check_inside(root: Path, relative: str, source: Path, line: int) -> str:
    """A path from a CSV, relative to ``root``; one that escapes ``root`` raises InputError."""
    candidate = (root / relative).resolve()
    try:
        inside = candidate.relative_to(root.resolve())
    except ValueError:
        raise InputError(source, f"path {relative!r} escapes the dataset root {root}", line=line) from None
    return inside.as_posix()


def scan_dicom(
    root: Path, labels: Path, key: bytes, *, progress: Progress | None = None, allow_outside_links: bool = False
) -> SourceScan:
    """A DICOM tree with a labels CSV; headers only. PatientID and SOPInstanceUID are pseudonymised."""
    by_path, by_uid = read_dicom_labels(labels, root)
    scan = SourceScan(records=[], metadata_files={"labels": str(labels)}, root=root)
    seen: dict[str, str] = {}
    for path in walk_files(root, on_skip=scan.skip, allow_outside_links=allow_outside_links):
        rel = relative_to_root(root, path)
        if path.resolve() == labels.resolve():
            continue
        try:
            header = read_header(path)
        except ImageReadError as error:
            scan.skipped.append({"source_path": rel, "reason": error.reason})
            continue
        findings = by_path.pop(rel, None)
        if findings is None:
            findings = by_uid.pop(header.sop_instance_uid, None)
        if findings is None:
            scan.unlisted.append(rel)
            continue
        image_id = pseudonym(key, header.sop_instance_uid, prefix="I")
        if image_id in seen:
            raise InputError(path, f"duplicate SOPInstanceUID (also in {seen[image_id]})")
        seen[image_id] = rel
        scan.records.append(dicom_record(image_id, key, header, rel, findings))
        if progress:
            progress(1)
    add_missing_dicoms(scan, key, by_path, by_uid)
    return scan


def dicom_record(image_id: str, key: bytes, header: DicomHeader, rel: str, findings: list[str]) -> dict[str, Any]:
    """The index record of a labelled DICOM file, its patient pseudonymised with ``key``."""
    return {
        "image_id": image_id,
        "patient_id": pseudonym(key, header.patient_id, prefix="P") if header.patient_id else None,
        "source_path": rel,
        "source_format": "dicom",
        "findings": findings,
        "view_position": header.view_position,
        "age": header.age,
        "sex": header.sex,
        "width": header.columns,
        "height": header.rows,
        "original_width": header.columns,
        "original_height": header.rows,
        "pixel_spacing_x": None,
        "pixel_spacing_y": None,
        "follow_up": None,
        "file_present": True,
    }


def add_missing_dicoms(
    scan: SourceScan, key: bytes, by_path: dict[str, list[str]], by_uid: dict[str, list[str]]
) -> None:
    """A record and a missing entry for each labels row no DICOM file answered (by path or by UID)."""
    for rel, findings in sorted(by_path.items()):
        image_id = pseudonym(key, f"path:{rel}", prefix="I")
        scan.records.append(_missing_dicom_record(image_id, rel, findings))
        scan.missing.append(
            {"image_id": image_id, "source_path": rel, "reason": "listed in the labels CSV, no DICOM file found"}
        )
    for uid, findings in sorted(by_uid.items()):
        image_id = pseudonym(key, uid, prefix="I")
        scan.records.append(_missing_dicom_record(image_id, None, findings))
        scan.missing.append({"image_id": image_id, "reason": "SOPInstanceUID in the labels CSV, no DICOM file found"})


def _missing_dicom_record(image_id: str, rel: str | None, findings: list[str]) -> dict[str, Any]:
    """An index row for a labelled DICOM whose file is absent (counted, never dropped)."""
    return {
        "image_id": image_id,
        "patient_id": None,
        "source_path": rel,
        "source_format": "dicom",
        "findings": findings,
        "file_present": False,
    }
