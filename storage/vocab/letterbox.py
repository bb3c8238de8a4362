"""Square letterboxing and the affine map between shard pixels and source pixels.

Coordinates are continuous pixel coordinates: pixel (i, j) covers [i, i + 1) x [j, j + 1),
so a box is (x_min, y_min, x_max, y_max) with x_max = x_min + width. The map is

    x_shard = x_source * scale_x + offset_x,    y_shard = y_source * scale_y + offset_y

with scale_x = content_width / source_width (exact, not the nominal size / max side),
so a box mapped to the shard and back returns unchanged up to float rounding.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR  # Pillow's resize is antialiased when shrinking


@dataclass(frozen=True)
class Letterbox:
    """Placement of a source image of ``source_width x source_height`` in a ``size`` square."""

    size: int
    source_width: int
    source_height: int
    content_width: int
    content_height: int
    offset_x: int
    offset_y: int

    @classmethod
    def fit(cls, source_width: int, source_height: int, size: int) -> Letterbox:
        """Scale the longer side to ``size``, centre the shorter one, pad with black."""
        if source_width <= 0 or source_height <= 0 or size <= 0:
            raise ValueError(f"bad sizes: source {source_width}x{source_height}, target {size}")
        longer = max(source_width, source_height)
        content_width = max(1, round(source_width * size / longer))
        content_height = max(1, round(source_height * size / longer))
        return cls(
            size=size,
            source_width=source_width,
            source_height=source_height,
            content_width=content_width,
            content_height=content_height,
            offset_x=(size - content_width) // 2,
            offset_y=(size - content_height) // 2,
        )

    @property
    def scale_x(self) -> float:
        return self.content_width / self.source_width

    @property
    def scale_y(self) -> float:
        return self.content_height / self.source_height

    def apply(self, image: np.ndarray) -> np.ndarray:
        """uint8 (source_height, source_width) -> uint8 (size, size), padding 0."""
        if image.shape != (self.source_height, self.source_width):
            raise ValueError(f"image shape {image.shape} != ({self.source_height}, {self.source_width})")
        content = Image.fromarray(image).resize((self.content_width, self.content_height), RESAMPLE)
        out = np.zeros((self.size, self.size), dtype=np.uint8)
        rows = slice(self.offset_y, self.offset_y + self.content_height)
        out[rows, self.offset_x : self.offset_x + self.content_width] = np.asarray(content)
        return out

    def _affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset), each (4,) for xyxy."""
        scale = np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y])
        offset = np.array([self.offset_x, self.offset_y, self.offset_x, self.offset_y], dtype=np.float64)
        return scale, offset

    def boxes_to_source(self, boxes: ArrayLike) -> np.ndarray:
        """Boxes (N, 4) xyxy in shard pixels -> (N, 4) xyxy in source pixels (float64)."""
        scale, offset = self._affine()
        return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) - offset) / scale

    def boxes_to_shard(self, boxes: ArrayLike) -> np.ndarray:
        """Boxes (N, 4) xyxy in source pixels -> (N, 4) xyxy in shard pixels (float64)."""
        scale, offset = self._affine()
        return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale + offset

    def boxes_to_input(self, boxes: ArrayLike, input_size: int) -> np.ndarray:
        """Boxes (N, 4) xyxy in source pixels -> (N, 4) xyxy on a network input of ``input_size``
        square (the shard resized: shard pixels x input_size / size)."""
        return self.boxes_to_shard(boxes) * (input_size / self.size)

    def input_boxes_to_source(self, boxes: ArrayLike, input_size: int) -> np.ndarray:
        """The inverse of ``boxes_to_input``, clipped to the source image: a box wholly in the
        padding comes back with no area."""
        source = self.boxes_to_source(np.asarray(boxes, dtype=np.float64) * (self.size / input_size))
        return np.clip(source, 0, [self.source_width, self.source_height] * 2)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Letterbox:
        """The inverse of to_record (extra keys, such as a shard row's others, are ignored)."""
        return cls(**{name: record[name] for name in cls.__dataclass_fields__})

    def to_record(self) -> dict[str, float | int]:
        """The columns a shard row stores (see README: shard schema)."""
        record: dict[str, float | int] = asdict(self)
        record.update(scale_x=self.scale_x, scale_y=self.scale_y)
        return record
