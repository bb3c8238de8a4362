"""Write small DICOM files with pydicom for the reader and ingest tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid

IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19610314",
    "InstitutionName": "Saint Example Hospital",
    "AccessionNumber": "ACC8675309",
    "ReferringPhysicianName": "House^Gregory",
}


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    voi_lut: tuple[list[int], list[int]] | None = None,
    patient_id: str = "MRN-0042",
    sop_uid: str | None = None,
    age: str = "057Y",
    sex: str = "F",
    view: str = "PA",
    compressed: bool = False,
    frames: int | None = None,
) -> str:
    """A single-frame grayscale radiograph; returns its SOPInstanceUID."""
    rows, columns = stored.shape[-2:]
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGLSLossless if compressed else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DX"
    ds.PatientID = patient_id
    ds.PatientAge = age
    ds.PatientSex = sex
    ds.ViewPosition = view
    for keyword, value in IDENTIFIERS.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_lut is not None:
        descriptor, data = voi_lut
        item = Dataset()
        item.LUTDescriptor = descriptor
        item.LUTData = np.asarray(data, dtype=np.uint16).tobytes()
        ds.VOILUTSequence = Sequence([item])
    if compressed:
        ds.PixelData = encapsulate([b"\xff\xd8not-really-jpeg-ls\xff\xd9"])
    else:
        ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid
