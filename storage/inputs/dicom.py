"""DICOM through pydicom: headers for ingest, display pixels for preprocessing.

Pixel pipeline (DICOM PS3.3 C.11 and C.7.6.3.1.2), in this order:
  1. Modality LUT: rescale slope/intercept or Modality LUT Sequence (pydicom).
  2. VOI: the VOI LUT Sequence when present (pydicom), else the first Window
     Center/Width (PS3.3 C.11.2.1.2, written out below to give [0, 1] directly),
     else the full range of the modality values.
  3. MONOCHROME1 is inverted, so that high values are always bright.
  4. [0, 1] -> 8 bit by round(255 * y).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, get_decoder

from cxr_miner.storage.inputs.images import DEFAULT_MAX_PIXELS, ImageReadError, check_pixel_count

_HEADER_TAGS = [
    "SOPInstanceUID",
    "PatientID",
    "PatientAge",
    "PatientSex",
    "ViewPosition",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "PhotometricInterpretation",
    "Modality",
]
MAX_REPORTED_AGE = 90  # HIPAA Safe Harbor: ages over 89 are reported as 90


@dataclass(frozen=True)
class DicomHeader:
    """What ingest takes from a DICOM header. ``patient_id`` is the raw ID: pseudonymise it."""

    sop_instance_uid: str
    patient_id: str
    age: int | None
    sex: str | None
    view_position: str | None
    rows: int
    columns: int
    frames: int
    photometric: str
    transfer_syntax: str


def parse_age(text: str | None) -> int | None:
    """DICOM AS ('065Y', '006M', '003W', '010D') -> whole years, capped at 90."""
    match = re.fullmatch(r"(\d{3})([DWMY])", (text or "").strip().upper())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    years = {"D": value / 365.25, "W": value * 7 / 365.25, "M": value / 12, "Y": value}[unit]
    return min(int(years), MAX_REPORTED_AGE)


def read_header(path: Path) -> DicomHeader:
    """Header only (no pixel data read); raises ImageReadError for non-DICOM files."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise ImageReadError(path, f"not a readable DICOM file: {error}") from None
    for tag in ("SOPInstanceUID", "Rows", "Columns"):
        if tag not in ds:
            raise ImageReadError(path, f"DICOM header lacks {tag}")
    sex = str(ds.get("PatientSex", "") or "").strip().upper() or None
    view = str(ds.get("ViewPosition", "") or "").strip().upper() or None
    return DicomHeader(
        sop_instance_uid=str(ds.SOPInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""),
        age=parse_age(ds.get("PatientAge")),
        sex=sex,
        view_position=view,
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        photometric=str(ds.get("PhotometricInterpretation", "")),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else "",
    )


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """VOI windowing to [0, 1] (PS3.3 C.11.2.1.2.1 LINEAR, C.11.2.1.3.1 SIGMOID, C.11.2.1.3.2 LINEAR_EXACT).

    LINEAR:  x <= c - 0.5 - (w - 1) / 2 -> 0;  x > c - 0.5 + (w - 1) / 2 -> 1;
             else ((x - (c - 0.5)) / (w - 1) + 0.5).
    """
    x = np.asarray(values, dtype=np.float64)
    function = function.upper()
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width} < 1 for LINEAR windowing")
        c, w = center - 0.5, width - 1
        if w == 0:  # width 1 is a pure threshold
            return (x > c).astype(np.float64)
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width {width} <= 0 for LINEAR_EXACT windowing")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width {width} <= 0 for SIGMOID windowing")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    raise ValueError(f"unsupported VOI LUT Function {function!r}")


def _first(value: Any) -> float:
    """Window Center/Width may be multi-valued: the first is the default view."""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return float(value[0])
    return float(value)


def to_display(ds: Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored values (rows, columns) -> uint8 display image (steps 1-4 above)."""
    if stored.ndim == 3:  # colour secondary capture: ITU-R BT.601 luma
        stored = stored[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        modality = stored
    else:
        modality = apply_modality_lut(stored, ds).astype(np.float64)
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        lut_input = np.rint(modality).astype(np.int64)  # a LUT is indexed by integer input values
        y = apply_voi(lut_input, ds).astype(np.float64) / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        y = window(modality, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        low, high = float(modality.min()), float(modality.max())
        y = (modality - low) / (high - low) if high > low else np.zeros_like(modality)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        y = 1.0 - y
    return np.rint(np.clip(y, 0.0, 1.0) * 255.0).astype(np.uint8)


def read_dicom_pixels(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A DICOM file -> uint8 (rows, columns) display image, or ImageReadError with the reason."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as error:
        raise ImageReadError(path, f"not a readable DICOM file: {error}") from None
    if "PixelData" not in ds:
        raise ImageReadError(path, "DICOM file has no Pixel Data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageReadError(path, f"multi-frame DICOM ({frames} frames) is not a single radiograph")
    check_pixel_count(path, int(ds.Columns), int(ds.Rows), max_pixels)
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise ImageReadError(
                path, f"no decoder for transfer syntax {syntax.name} ({syntax}) exists in pydicom"
            ) from None
        if not decoder.is_available:
            raise ImageReadError(
                path,
                f"no decoder installed for transfer syntax {syntax.name} ({syntax}); "
                f"install one of: {'; '.join(decoder.missing_dependencies)}",
            )
    try:
        stored = ds.pixel_array
        return to_display(ds, stored)
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, OSError) as error:
        encoding = f" ({syntax.name})" if syntax is not None and syntax.is_compressed else ""
        raise ImageReadError(path, f"cannot decode DICOM pixels{encoding}: {error}") from None
