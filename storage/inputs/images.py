"""Image readers behind one interface: path -> 8-bit grayscale array.

Every reader returns ``uint8 (height, width)`` in display orientation (bright = dense)
or raises :class:`ImageReadError` whose ``reason`` is what the quarantine records.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

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
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if is_dicom(path):
        from cxr_miner.storage.inputs.dicom import read_dicom_pixels

        return read_dicom_pixels(path, max_pixels=max_pixels)
    return read_raster(path, max_pixels=max_pixels)


def check_pixel_count(path: Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageReadError(
            path, f"image of {width}x{height} = {width * height} px exceeds the {max_pixels} px limit (decompression bomb guard)"
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
                return to_gray8(image)
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageReadError(path, f"decompression bomb guard: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(path, f"cannot decode: {error}") from None


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


def read_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None when the header is unreadable."""
    try:
        if is_dicom(path):
            from cxr_miner.storage.inputs.dicom import read_header

            header = read_header(path)
            return header.columns, header.rows
        with Image.open(path) as image:
            return image.width, image.height
    except (ImageReadError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # preprocess quarantines the file with the full reason
