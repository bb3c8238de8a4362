"""DICOM pixels against hand-computed values: rescale, window, VOI LUT, MONOCHROME1, 16 bit."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from cxr_miner.storage.inputs.dicom import parse_age, read_dicom_pixels, read_header, window
from cxr_miner.storage.inputs.images import ImageReadError, read_image
from tests.dicom_factory import write_dicom

STORED = np.array([[0, 200, 300, 550, 4095]], dtype=np.uint16)


def test_rescale_then_linear_window(tmp_path):
    # x = 2 * stored - 100; LINEAR window c = 500, w = 1001:
    # y = clip((x - 499.5) / 1000 + 0.5, 0, 1), out = round(255 * y)
    # stored 200 -> x 300 -> y 0.3005 -> 76.63 -> 77;  300 -> 500 -> 0.5005 -> 127.63 -> 128
    path = tmp_path / "a.dcm"
    write_dicom(path, STORED, slope=2.0, intercept=-100.0, window=(500, 1001))
    assert read_dicom_pixels(path).tolist() == [[0, 77, 128, 255, 255]]


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    # 1 - 0.3005 = 0.6995 -> 178.37 -> 178;  1 - 0.5005 = 0.4995 -> 127.37 -> 127
    path = tmp_path / "m1.dcm"
    write_dicom(path, STORED, photometric="MONOCHROME1", slope=2.0, intercept=-100.0, window=(500, 1001))
    assert read_dicom_pixels(path).tolist() == [[255, 178, 127, 0, 0]]


def test_full_range_without_voi(tmp_path):
    # no window: (x - min) / (max - min) over the modality values 0..4095
    # 200 / 4095 * 255 = 12.45 -> 12;  300 -> 18.68 -> 19;  550 -> 34.25 -> 34
    path = tmp_path / "plain.dcm"
    write_dicom(path, STORED)
    assert read_dicom_pixels(path).tolist() == [[0, 12, 19, 34, 255]]


def test_voi_lut_sequence_takes_precedence_over_window(tmp_path):
    # LUT descriptor (entries 4, first mapped 0, 8 bit): stored 0..3 -> 0, 50, 100, 255; beyond -> last
    path = tmp_path / "lut.dcm"
    write_dicom(
        path, np.array([[0, 1, 2, 3, 9]], dtype=np.uint16), window=(1, 1), voi_lut=([4, 0, 8], [0, 50, 100, 255])
    )
    assert read_dicom_pixels(path).tolist() == [[0, 50, 100, 255, 255]]


def test_signed_16_bit_with_rescale(tmp_path):
    # signed 16 bit, HU-like: x = stored - 1024; window c = -600, w = 1500 (lung):
    # stored -1000 -> x -2024 -> 0;  stored 424 -> x -600 -> (-600 + 600.5)/1499 + 0.5 = 0.50033 -> 127.59 -> 128
    # stored 1500 -> x 476 -> (476 + 600.5)/1499 + 0.5 = 1.218 -> 255
    path = tmp_path / "signed.dcm"
    write_dicom(
        path,
        np.array([[-1000, 424, 1500]]),
        bits_stored=16,
        signed=True,
        slope=1.0,
        intercept=-1024.0,
        window=(-600, 1500),
    )
    assert read_dicom_pixels(path).tolist() == [[0, 128, 255]]


def test_non_square_keeps_rows_and_columns(tmp_path):
    path = tmp_path / "wide.dcm"
    stored = np.arange(15, dtype=np.uint16).reshape(3, 5) * 100
    write_dicom(path, stored)
    pixels = read_image(path)
    assert pixels.shape == (3, 5) and pixels.dtype == np.uint8
    assert pixels[0, 0] == 0 and pixels[2, 4] == 255
    assert pixels[1, 2] == round(700 / 1400 * 255)  # 127.5 -> 128 (round half to even: 128)


def test_compressed_without_decoder_names_the_plugins(tmp_path, monkeypatch):
    """The decoders are installed with the project; a syntax whose plugin is absent says which to install."""
    import cxr_miner.storage.inputs.dicom as dicom

    class Absent:
        is_available = False
        missing_dependencies = ["pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1"]

    monkeypatch.setattr(dicom, "get_decoder", lambda syntax: Absent())
    path = tmp_path / "jpegls.dcm"
    write_dicom(path, STORED, compressed=True)
    with pytest.raises(
        ImageReadError, match=r"no decoder installed for transfer syntax JPEG-LS Lossless.*pylibjpeg-libjpeg"
    ):
        read_dicom_pixels(path)


def test_a_syntax_nobody_decodes_is_quarantined_with_its_name(tmp_path):
    path = tmp_path / "video.dcm"
    write_dicom(path, STORED, compressed=True)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(path)
    with pytest.raises(ImageReadError, match=r"no decoder for transfer syntax MPEG2 Main Profile / Main Level"):
        read_dicom_pixels(path)


# A 12-bit radiograph-like ramp with noise: every value differs from its neighbours, so no codec
# gets away with run lengths alone.
RAMP = (np.add.outer(np.arange(40) * 97, np.arange(56) * 13) % 4096).astype(np.uint16)


@pytest.mark.parametrize(
    "syntax", [RLELossless, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name
)
def test_lossless_compressed_dicom_decodes_to_the_uncompressed_pixels(tmp_path, syntax):
    plain, packed = tmp_path / "plain.dcm", tmp_path / "packed.dcm"
    write_dicom(plain, RAMP, window=(2048, 4096))
    write_dicom(packed, RAMP, window=(2048, 4096), transfer_syntax=syntax)
    assert pydicom.dcmread(packed).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(pydicom.dcmread(packed).pixel_array, RAMP)
    np.testing.assert_array_equal(read_dicom_pixels(packed), read_dicom_pixels(plain))


def test_jpeg_baseline_dicom_decodes_close_to_its_source(tmp_path):
    smooth = (np.add.outer(np.arange(48), np.arange(64)) * 2).astype(np.uint16)  # 0..220, 8 bit
    plain, packed = tmp_path / "plain.dcm", tmp_path / "packed.dcm"
    write_dicom(plain, smooth, bits_stored=8, window=(128, 256))
    write_dicom(packed, smooth, bits_stored=8, window=(128, 256), transfer_syntax=JPEGBaseline8Bit)
    difference = np.abs(read_dicom_pixels(packed).astype(int) - read_dicom_pixels(plain).astype(int))
    assert difference.mean() < 1.5 and difference.max() <= 8


def test_multi_frame_and_pixel_limit(tmp_path):
    path = tmp_path / "multi.dcm"
    write_dicom(path, np.zeros((2, 4, 4), dtype=np.uint16), frames=2)
    with pytest.raises(ImageReadError, match="multi-frame"):
        read_dicom_pixels(path)
    big = tmp_path / "big.dcm"
    write_dicom(big, np.zeros((40, 50), dtype=np.uint16))
    with pytest.raises(ImageReadError, match="2000 px exceeds the 1999 px limit"):
        read_dicom_pixels(big, max_pixels=1999)


def test_header(tmp_path):
    path = tmp_path / "h.dcm"
    uid = write_dicom(path, np.zeros((6, 8), dtype=np.uint16), age="093Y", sex="M", view="AP")
    header = read_header(path)
    assert (header.sop_instance_uid, header.rows, header.columns) == (uid, 6, 8)
    assert (header.age, header.sex, header.view_position, header.patient_id) == (90, "M", "AP", "MRN-0042")


@pytest.mark.parametrize(
    "text, years", [("057Y", 57), ("018M", 1), ("010D", 0), ("104W", 1), ("095Y", 90), ("", None), ("57", None)]
)
def test_parse_age(text, years):
    assert parse_age(text) == years


@pytest.mark.parametrize(
    "center, width, function, x, expected",
    [
        (40, 400, "LINEAR", [-160.5, -159.5, 39.5, 239.5], [0.0, 0.0012531, 0.5, 1.0]),
        (40, 400, "LINEAR_EXACT", [-160, 40, 240], [0.0, 0.5, 1.0]),
        (0, 4, "SIGMOID", [0.0, 1.0], [0.5, 1 / (1 + np.exp(-1.0))]),
    ],
)
def test_window_functions(center, width, function, x, expected):
    assert window(np.array(x), center, width, function) == pytest.approx(expected, abs=1e-6)
