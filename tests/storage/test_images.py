"""Raster readers and letterboxing: known pixels, known boxes, and every kind of broken file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from cxr_miner.storage.inputs.images import (
    ImageReadError,
    ends_black,
    png_expected_bytes,
    read_image,
    png_size,
    read_size,
)
from cxr_miner.storage.vocab.letterbox import Letterbox


def test_fit_landscape():
    box = Letterbox.fit(1024, 768, 512)
    assert (box.content_width, box.content_height, box.offset_x, box.offset_y) == (512, 384, 0, 64)
    assert (box.scale_x, box.scale_y) == (0.5, 0.5)


def test_fit_portrait_with_odd_padding():
    box = Letterbox.fit(600, 1000, 256)  # 600 * 0.256 = 153.6 -> 154 wide, (256 - 154) // 2 = 51
    assert (box.content_width, box.content_height, box.offset_x, box.offset_y) == (154, 256, 51, 0)
    assert box.scale_x == pytest.approx(154 / 600)


def test_box_maps_to_shard_and_back_exactly():
    box = Letterbox.fit(2500, 2048, 512)
    source = np.array([[100.0, 50.0, 300.5, 250.25], [0, 0, 2500, 2048]])
    shard = box.boxes_to_shard(source)
    assert shard[1].tolist() == pytest.approx(
        [box.offset_x, box.offset_y, box.offset_x + box.content_width, box.offset_y + box.content_height]
    )
    assert box.boxes_to_source(shard) == pytest.approx(source)


def test_boxes_to_a_network_input_and_back_clipped_to_the_source():
    """200 x 100 source in a 64 square: scale 0.32, content 64 x 32, offset (0, 16); on a 128 px
    input every shard coordinate doubles. A detection that reaches into the padding comes back
    clipped to the image; one wholly in the padding comes back with no area."""
    box = Letterbox.fit(200, 100, 64)
    np.testing.assert_allclose(box.boxes_to_input([[50, 25, 150, 75]], 128), [[32, 48, 96, 80]])
    back = box.input_boxes_to_source([[32, 48, 96, 80], [-10, 20, 40, 40], [0, 0, 128, 20]], 128)
    np.testing.assert_allclose(back, [[50, 25, 150, 75], [0, 0, 62.5, 12.5], [0, 0, 200, 0]])


def test_drawn_rectangle_round_trip():
    """A white rectangle at a known source box is found where the transform says, and maps back."""
    source = np.zeros((400, 600), dtype=np.uint8)
    source[50:250, 100:300] = 255  # xyxy (100, 50, 300, 250)
    box = Letterbox.fit(600, 400, 256)  # scale 256/600, content 256 x 171, offset (0, 42)
    assert (box.content_height, box.offset_y) == (171, 42)
    shard = box.apply(source)
    assert shard.shape == (256, 256)
    assert shard[:42].max() == 0 and shard[42 + 171 :].max() == 0  # padding stays black
    ys, xs = np.nonzero(shard > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=float)
    # expected in the shard: x 42.67..128.0, y 63.3..148.6 (0.4267 scale, +42 rows)
    back = box.boxes_to_source(found)[0]
    assert back == pytest.approx([100, 50, 300, 250], abs=1 / box.scale_x)


def test_png_8_and_16_bit_and_rgb(tmp_path):
    gray = np.array([[0, 128, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png").tolist() == [[0, 128, 255]]
    deep = np.array([[0, 32768, 65535]], dtype=np.uint16)  # * 255 / 65535 -> 0, 127.5 -> 128, 255
    Image.fromarray(deep).save(tmp_path / "d.png")
    assert read_image(tmp_path / "d.png").tolist() == [[0, 128, 255]]
    Image.new("RGB", (2, 1), (255, 255, 255)).save(tmp_path / "c.jpg", quality=100)
    assert read_image(tmp_path / "c.jpg").tolist() == [[255, 255]]


def _png_bytes(tmp_path) -> bytes:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "ok.png")
    return (tmp_path / "ok.png").read_bytes()


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda data: data[: len(data) // 3], "cannot decode: image file is truncated"),
        (lambda data: b"", "empty file (0 bytes)"),
        (lambda data: b"just some text\n", "not a recognised image format"),
    ],
)
def test_broken_files_give_a_reason(tmp_path, make, reason):
    path = tmp_path / "broken.png"
    path.write_bytes(make(_png_bytes(tmp_path)))
    with pytest.raises(ImageReadError) as raised:
        read_image(path)
    assert reason in raised.value.reason


def test_decompression_bomb_guard_reads_header_only(tmp_path):
    Image.new("L", (300, 200)).save(tmp_path / "wide.png")
    with pytest.raises(ImageReadError, match="300x200 = 60000 px exceeds the 59999 px limit"):
        read_image(tmp_path / "wide.png", max_pixels=59_999)
    assert read_image(tmp_path / "wide.png", max_pixels=60_000).shape == (200, 300)


def test_sizes_are_read_from_headers_as_pillow_reads_them(tmp_path):
    """read_size takes a PNG's size from its IHDR bytes, other rasters through Pillow; a file cut
    inside its header, or one that is no image, has none."""
    for name, size in (
        ("wide.png", (300, 200)),
        ("tall.png", (7, 1024)),
        ("photo.jpg", (64, 48)),
        ("scan.bmp", (33, 21)),
    ):
        Image.new("L", size).save(tmp_path / name)
        assert read_size(tmp_path / name) == size == Image.open(tmp_path / name).size
        assert png_size(tmp_path / name) == (size if name.endswith(".png") else None)
    (tmp_path / "cut.png").write_bytes((tmp_path / "wide.png").read_bytes()[:20])
    (tmp_path / "text.png").write_text("not an image at all, but long enough")
    assert read_size(tmp_path / "cut.png") is None and read_size(tmp_path / "text.png") is None


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")


def test_letterbox_record_round_trip():
    from cxr_miner.storage.vocab.letterbox import Letterbox

    box = Letterbox.fit(120, 90, 64)
    assert Letterbox.from_record({**box.to_record(), "image_id": "x.png"}) == box


def _rewrap_png(data: bytes, keep_rows: int, row_bytes: int) -> bytes:
    """The same PNG with its image data cut to the first ``keep_rows`` rows, recompressed, every
    CRC valid: a file that decodes without error, only shorter than its header says."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    position, chunks = 8, []
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    header = next(body for kind, body in chunks if kind == b"IHDR")
    return (
        data[:8]
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw[: keep_rows * row_bytes]))
        + chunk(b"IEND", b"")
    )


def test_a_png_with_fewer_rows_of_data_than_its_header_is_quarantined(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.full((20, 10), 200, np.uint8)).save(buffer, format="PNG")
    path = tmp_path / "short.png"
    path.write_bytes(_rewrap_png(buffer.getvalue(), keep_rows=10, row_bytes=1 + 10))
    with Image.open(path) as image:  # Pillow alone decodes it, the missing rows black
        assert np.asarray(image)[15].tolist() == [0] * 10
    with pytest.raises(ImageReadError, match="PNG pixel data ends early: 110 of 220 bytes"):
        read_image(path)


@pytest.mark.parametrize("progressive", [False, True])
def test_a_jpeg_cut_short_and_closed_with_eoi_is_quarantined(tmp_path, progressive):
    noisy = np.random.default_rng(1).integers(0, 255, (64, 48), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90, progressive=progressive)
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(buffer.getvalue())
    assert read_image(whole).shape == (64, 48)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2] + b"\xff\xd9")
    with Image.open(path) as image:  # Pillow alone decodes it, without a word
        image.load()
    with pytest.raises(ImageReadError, match="JPEG data ends early .*premature end"):
        read_image(path)


@pytest.mark.parametrize(
    "width, height, depth, colour, interlace, expected",
    [(10, 20, 8, 0, 0, 20 * 11), (10, 20, 16, 2, 0, 20 * (1 + 60)), (5, 3, 1, 0, 0, 3 * 2), (8, 8, 8, 0, 1, 79)],
)
def test_png_image_data_size_worked_by_hand(width, height, depth, colour, interlace, expected):
    """Adam7 8 x 8 gray: passes of 1x1, 1x1, 2x1, 2x2, 4x2, 4x4, 8x4 pixels, each row with a filter
    byte: 2 + 2 + 3 + 6 + 10 + 20 + 36 = 79 bytes."""
    assert png_expected_bytes(width, height, depth, colour, interlace) == expected


@pytest.mark.parametrize("mode", ["L", "I;16", "RGB", "P", "LA", "RGBA"])
def test_complete_pngs_that_end_black_pass_the_size_check(tmp_path, mode):
    pixels = np.zeros((12, 9), np.uint8)
    pixels[:6] = 180  # bottom half black: the size check runs
    image = Image.fromarray(pixels).convert(mode) if mode != "I;16" else Image.fromarray(pixels.astype(np.uint16) * 257)
    image.save(tmp_path / "ok.png")
    assert ends_black(read_image(tmp_path / "ok.png"))
    assert read_image(tmp_path / "ok.png")[:6].min() > 0
