"""Image readers behind one interface: path -> 8-bit grayscale array.

Every reader returns ``uint8 (height, width)`` in display orientation (bright = dense)
or raises :class:`ImageReadError` whose ``reason`` is what the quarantine records.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_miner.storage.inputs.files import not_regular

# Default decompression-bomb guard: 50 megapixels (a 7000 x 7000 radiograph) is far
# above any chest detector; Pillow's own guard stays in force beyond it.
DEFAULT_MAX_PIXELS = 50_000_000


class ImageReadError(Exception):
    """An image that cannot be turned into pixels; ``reason`` says why."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


RASTER_SUFFIXES = {".png", ".jpg", ".jpeg"}


def is_dicom(path: Path) -> bool:
    """A .dcm suffix, or the 'DICM' magic at byte 128 (Part 10 files); PNG and JPEG names are not opened."""
    suffix = path.suffix.lower()
    if suffix in {".dcm", ".dicom"}:
        return True
    if suffix in RASTER_SUFFIXES:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_image(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any supported file (PNG, JPEG, DICOM) -> uint8 (height, width)."""
    path = Path(path)
    if (reason := not_regular(path)) is not None:
        raise ImageReadError(
            path, "file not found" if reason.startswith("missing") else f"{reason}, not a regular file: not opened"
        )
    if is_dicom(path):
        from cxr_miner.storage.inputs.dicom import read_dicom_pixels

        return read_dicom_pixels(path, max_pixels=max_pixels)
    return read_raster(path, max_pixels=max_pixels)


def check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            path,
            f"image of {width}x{height} = {width * height} px exceeds the {max_pixels} px limit (decompression bomb "
            "guard)",
        )


def read_raster(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """PNG or JPEG through Pillow: 8-bit as is, 16-bit scaled by 255/65535, colour to luma."""
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                check_pixel_count(path, image.width, image.height, max_pixels)
                image.load()
                pixels = to_gray8(image)
                if image.format == "PNG" and ends_black(pixels):
                    check_png_data_complete(path)
                if image.format == "JPEG":
                    check_jpeg_data_complete(path)
                return pixels
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(path, f"decompression bomb guard: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"cannot decode: {error}") from None


# Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by colour type (PNG spec, 11.2.2 IHDR)


def ends_black(pixels: np.ndarray) -> bool:
    """Whether one of the last two rows is all 0: what missing PNG data leaves behind (Pillow
    fills rows the data does not reach with 0; with Adam7 interlacing, the last pass fills
    every odd row, so a short stream leaves an odd row among the last two black)."""
    return bool(np.any(~pixels[-2:].any(axis=1)))


def png_expected_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlace: int) -> int:
    """Decompressed size of a PNG's image data: per row a filter byte and its packed samples."""
    bits = _PNG_CHANNELS[colour_type] * bit_depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def check_png_data_complete(path: Path) -> None:
    """ImageReadError when the PNG's IDAT stream inflates to fewer bytes than its header implies.

    Pillow decodes such a file without an error and leaves the missing rows black; this
    check inflates the stream once more, so it runs only for images that end black."""
    data = path.read_bytes()
    position, idat, header = 8, [], None
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, body = data[position + 4 : position + 8], data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        position += 12 + length
    if header is None or header[3] not in _PNG_CHANNELS:
        raise ImageReadError(path, "PNG without a valid IHDR header")
    width, height, bit_depth, colour_type, _, _, interlace = header
    expected = png_expected_bytes(width, height, bit_depth, colour_type, interlace)
    inflater = zlib.decompressobj()
    try:
        found = len(inflater.decompress(b"".join(idat), expected + 1))
    except zlib.error as error:
        raise ImageReadError(path, f"cannot decode: PNG image data is corrupt ({error})") from None
    if found < expected:
        raise ImageReadError(path, f"PNG pixel data ends early: {found} of {expected} bytes (rows missing)")


# libjpeg's warnings (JWRN_HIT_MARKER, JWRN_JPEG_EOF) for entropy-coded data that stops early.
_JPEG_SHORT = ("premature end of data segment", "premature end of jpeg file")


def check_jpeg_data_complete(path: Path) -> None:
    """ImageReadError when the JPEG's compressed data ends before its last block.

    libjpeg decodes such a file (one cut and closed with an EOI marker, say) with only a warning,
    filling the missing blocks grey, and Pillow drops the warning. libjpeg-turbo through
    simplejpeg in strict mode turns it into an error; decoding at 1/8 scale keeps the check cheap
    (the entropy decoding, where the warning arises, is whole). Other complaints (a JPEG variant
    simplejpeg does not read) are left to Pillow, which decoded the file."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(path.read_bytes(), colorspace="GRAY", strict=True, min_height=1, min_width=1)
    except ValueError as error:
        if any(short in str(error).lower() for short in _JPEG_SHORT):
            raise ImageReadError(
                path, f"JPEG data ends early ({error}); the missing blocks would decode grey"
            ) from None


def to_gray8(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image -> uint8 (height, width)."""
    if image.mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if image.mode in {"I;16", "I;16B", "I;16L", "I"}:
        pixels = np.asarray(image).astype(np.float64)
        return np.clip(np.rint(pixels * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        scaled = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        return np.rint(scaled * 255).astype(np.uint8)
    return np.asarray(image.convert("L"), dtype=np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's first 24 bytes (signature, IHDR length and type, width,
    height: PNG spec 5.2, 11.2.2), None for anything else: a tenth of Pillow's opening time,
    which ingest pays for each of NIH's 112,120 images at every run."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return (width, height) if width and height else None


def read_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header is unreadable."""
    try:
        if is_dicom(path):
            from cxr_miner.storage.inputs.dicom import read_header

            header = read_header(path)
            return header.columns, header.rows
        if size := png_size(path):
            return size
        with Image.open(path) as image:
            return image.width, image.height
    except (ImageReadError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # preprocess quarantines the file with the full reason
