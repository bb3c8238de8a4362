"""Parsers for the NIH ChestX-ray14 metadata files.

``Data_Entry_2017_v2020.csv`` gives one row per image; ``BBox_List_2017.csv`` the
ground-truth boxes as ``x, y, w, h`` in the pixels of the distributed 1024 px PNGs;
``train_val_list.txt`` / ``test_list.txt`` the official patient-level split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cxr_miner.storage.inputs.csvtable import not_utf8, read_rows
from cxr_miner.storage.vocab.errors import InputError
from cxr_miner.storage.vocab.findings import UnknownFindingError, canonical_finding, parse_findings

DATA_ENTRY = "Data_Entry_2017_v2020.csv"
BBOX_LIST = "BBox_List_2017.csv"
TRAIN_VAL_LIST = "train_val_list.txt"
TEST_LIST = "test_list.txt"

_ENTRY_REQUIRED = {
    "Image Index": 1,
    "Finding Labels": 1,
    "Follow-up #": 1,
    "Patient ID": 1,
    "Patient Age": 1,
    "Patient Gender": 1,
    "View Position": 1,
}
_ENTRY_OPTIONAL = {"OriginalImage[Width,Height]": 2, "OriginalImagePixelSpacing[x,y]": 2}
_BBOX_REQUIRED = {"Image Index": 1, "Finding Label": 1, "Bbox [x,y,w,h]": 4}


@dataclass(frozen=True)
class EntryRow:
    """One image of Data_Entry: labels and patient data as NIH gives them."""

    image_id: str
    findings: list[str]
    follow_up: int
    patient_id: str
    age: int | None
    sex: str | None
    view_position: str | None
    original_width: int | None
    original_height: int | None
    pixel_spacing_x: float | None
    pixel_spacing_y: float | None


@dataclass(frozen=True)
class GroundTruthBox:
    """A ground-truth box, xyxy in source pixels (pixel i covers [i, i + 1))."""

    image_id: str
    finding: str
    x_min: float
    y_min: float
    x_max: float
    y_max: float


def check_image_name(path: Path, line: int, name: str) -> str:
    """An image id must be a plain relative file name: no folders, no '..'."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or pure.is_absolute() or ".." in pure.parts or len(pure.parts) != 1:
        raise InputError(
            path, f"image name {name!r} is not a plain file name (it would escape the image folder)", line=line
        )
    if not name.isprintable():
        raise InputError(path, f"image name {name!r} holds a control character (a NUL byte or the like)", line=line)
    return name


def _int(path: Path, line: int, column: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(path, f"column {column!r}: {text!r} is not an integer", line=line) from None


def _optional_int(path: Path, line: int, column: str, text: str) -> int | None:
    return _int(path, line, column, text) if text else None


def _float(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InputError(path, f"column {column!r}: {text!r} is not a finite number", line=line)
    return value


def _optional_float(path: Path, line: int, column: str, text: str) -> float | None:
    return _float(path, line, column, text) if text else None


def _age(path: Path, line: int, text: str) -> int | None:
    """'58' (v2020) or '058Y' (2017 release) -> 58; '' -> None."""
    if not text:
        return None
    digits = text[:-1] if text[-1:].upper() == "Y" else text
    return _int(path, line, "Patient Age", digits)


def read_data_entry(path: Path) -> list[EntryRow]:
    """Parse Data_Entry_2017(_v2020).csv; unknown findings and duplicate ids raise InputError."""
    rows: list[EntryRow] = []
    seen: dict[str, int] = {}
    for line, cells in read_rows(path, _ENTRY_REQUIRED, _ENTRY_OPTIONAL):
        image_id = check_image_name(path, line, cells["Image Index"][0])
        if image_id in seen:
            raise InputError(path, f"duplicate image id {image_id!r} (first on line {seen[image_id]})", line=line)
        seen[image_id] = line
        try:
            findings = parse_findings(cells["Finding Labels"][0])
        except UnknownFindingError as error:
            raise InputError(path, str(error), line=line) from None
        patient = cells["Patient ID"][0]
        if not patient:
            raise InputError(path, f"empty Patient ID for {image_id!r}", line=line)
        size = cells.get("OriginalImage[Width,Height]", ["", ""])
        spacing = cells.get("OriginalImagePixelSpacing[x,y]", ["", ""])
        sex = cells["Patient Gender"][0].upper() or None
        rows.append(
            EntryRow(
                image_id=image_id,
                findings=findings,
                follow_up=_int(path, line, "Follow-up #", cells["Follow-up #"][0]),
                patient_id=patient,
                age=_age(path, line, cells["Patient Age"][0]),
                sex=sex,
                view_position=cells["View Position"][0] or None,
                original_width=_optional_int(path, line, "OriginalImage[Width", size[0]),
                original_height=_optional_int(path, line, "Height]", size[1]),
                pixel_spacing_x=_optional_float(path, line, "OriginalImagePixelSpacing[x", spacing[0]),
                pixel_spacing_y=_optional_float(path, line, "y]", spacing[1]),
            )
        )
    return rows


def read_bbox_list(path: Path) -> list[GroundTruthBox]:
    """Parse BBox_List_2017.csv (x, y, w, h) into xyxy boxes; 'Infiltrate' -> 'Infiltration'."""
    boxes: list[GroundTruthBox] = []
    for line, cells in read_rows(path, _BBOX_REQUIRED):
        image_id = check_image_name(path, line, cells["Image Index"][0])
        try:
            finding = canonical_finding(cells["Finding Label"][0])
        except UnknownFindingError as error:
            raise InputError(path, str(error), line=line) from None
        x, y, w, h = (_float(path, line, "Bbox [x,y,w,h]", v) for v in cells["Bbox [x,y,w,h]"])
        if w <= 0 or h <= 0:
            raise InputError(path, f"box of {image_id!r} has width {w} and height {h}; both must be > 0", line=line)
        boxes.append(GroundTruthBox(image_id, finding, x, y, x + w, y + h))
    return boxes


def read_image_list(path: Path) -> list[str]:
    """One image file name per line (train_val_list.txt, test_list.txt)."""
    names = []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    for line, row in enumerate(text.splitlines(), start=1):
        if row.strip():
            names.append(check_image_name(path, line, row.strip()))
    return names
