"""Write small DICOM files with pydicom for the reader and ingest tests."""

from __future__ import annotations

from pathlib import Path

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

IDENTIFIERS = {
    "PatientName": "Doe^Jane",
    "PatientBirthDate": "19610314",
    "InstitutionName": "Saint Example Hospital",
    "AccessionNumber": "ACC8675309",
    "ReferringPhysicianName": "House^Gregory",
}


def _rle(stored: np.ndarray, bits: int) -> bytes:
    from pydicom.pixels.encoders.base import RLELosslessEncoder

    return RLELosslessEncoder.encode(
        stored.astype(np.uint16),
        rows=stored.shape[0],
        columns=stored.shape[1],
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=bits,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )


# Encoders of single-frame unsigned grayscale pixels: imagecodecs (libjpeg-turbo, CharLS, OpenJPEG)
# and pydicom's own RLE; the project reads them through pydicom's pylibjpeg plugins.
ENCODERS = {
    RLELossless: _rle,
    JPEGLosslessSV1: lambda stored, bits: imagecodecs.jpeg8_encode(
        stored.astype(np.uint16), lossless=True, predictor=1, bitspersample=bits
    ),
    JPEGLSLossless: lambda stored, bits: imagecodecs.jpegls_encode(stored.astype(np.uint16), level=0),
    JPEG2000Lossless: lambda stored, bits: imagecodecs.jpeg2k_encode(
        stored.astype(np.uint16), level=0, codecformat="J2K", reversible=True, bitspersample=bits
    ),
    JPEGBaseline8Bit: lambda stored, bits: imagecodecs.jpeg8_encode(stored.astype(np.uint8), level=95),
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
    transfer_syntax: str | None = None,
) -> str:
    """A single-frame grayscale radiograph; returns its SOPInstanceUID.

    ``transfer_syntax``: store the pixels compressed with it (see ENCODERS; JPEG baseline needs
    ``bits_stored=8``). ``compressed``: a JPEG-LS transfer syntax over bytes that are no JPEG-LS."""
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
    ds.BitsAllocated = 8 if transfer_syntax == JPEGBaseline8Bit else 16
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
    elif transfer_syntax is not None:
        ds.PixelData = encapsulate([ENCODERS[transfer_syntax](stored, bits_stored)])
        meta.TransferSyntaxUID = transfer_syntax
    else:
        ds.PixelData = stored.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return sop_uid
