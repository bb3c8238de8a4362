"""Training shards: Parquet files of letterboxed 8-bit images with labels and the transform.

One shard holds up to ``shard_size`` images of one split. Each shard is written
atomically, and its completion record ``<name>.json`` (written after the shard) holds the
fingerprint of its inputs and settings, so a rerun skips shards that are already done.
Images are stored PNG-encoded or raw (see ShardSettings.encoding and BENCHMARKS.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cxr_miner.storage.inputs.files import source_problem
from cxr_miner.storage.inputs.images import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from cxr_miner.storage.stages.atomic import atomic_path, read_json, write_json
from cxr_miner.storage.stages.index import SPLITS
from cxr_miner.storage.stages.provenance import file_sha256
from cxr_miner.storage.vocab.errors import MissingInput, SettingError
from cxr_miner.storage.vocab.findings import FINDINGS, label_vector
from cxr_miner.storage.vocab.letterbox import Letterbox

SHARD_FORMAT_VERSION = 1
SHARD_DIR = "shards"  # below the workdir
ENCODINGS = ("png", "raw")

# Per-image metadata copied from the index into every shard row.
CARRIED_COLUMNS = (
    "image_id",
    "patient_id",
    "split",
    "source_path",
    "findings",
    "has_box",
    "view_position",
    "age",
    "sex",
)

SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("source_path", pa.string()),
        ("findings", pa.list_(pa.string())),
        ("labels", pa.list_(pa.bool_(), len(FINDINGS))),
        ("has_box", pa.bool_()),
        ("view_position", pa.string()),
        ("age", pa.int16()),
        ("sex", pa.string()),
        ("source_width", pa.int32()),
        ("source_height", pa.int32()),
        ("size", pa.int32()),
        ("content_width", pa.int32()),
        ("content_height", pa.int32()),
        ("offset_x", pa.int32()),
        ("offset_y", pa.int32()),
        ("scale_x", pa.float64()),
        ("scale_y", pa.float64()),
        ("image", pa.binary()),
    ]
)


@dataclass(frozen=True)
class ShardSettings:
    """How images become shard rows; part of every shard's fingerprint."""

    size: int = 512  # side of the square shard image, pixels
    encoding: str = "raw"  # "raw" (uint8 bytes, zstd by Parquet) or "png"; chosen in BENCHMARKS.md
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard on the source image
    row_group_size: int = 64  # images per Parquet row group: the reader's unit of memory

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise SettingError(f"unknown encoding {self.encoding!r}; known: {ENCODINGS}")
        if not 16 <= self.size <= 4096:
            raise SettingError(f"shard image size {self.size} outside 16..4096")


@dataclass(frozen=True)
class ShardSpec:
    """A shard to build: its name and the index rows (CARRIED_COLUMNS) of its images."""

    name: str
    rows: tuple[dict[str, Any], ...]


@dataclass
class ShardResult:
    """What building a shard returns to the flow: paths and counts, never pixels."""

    name: str
    path: str
    rows: int
    quarantined: list[dict[str, str]] = field(default_factory=list)
    skipped: bool = False
    sha256: str = ""
    bytes: int = 0


def plan_shards(rows: Sequence[dict[str, Any]], shard_size: int) -> list[ShardSpec]:
    """Index rows (files present or unchecked) -> shards of one split each, in index order."""
    if shard_size < 1:
        raise SettingError(f"shard size {shard_size} < 1")
    specs = []
    for split in SPLITS:
        members = [{c: row[c] for c in CARRIED_COLUMNS} for row in rows if row["split"] == split]
        for number, start in enumerate(range(0, len(members), shard_size)):
            specs.append(ShardSpec(f"{split}-{number:05d}", tuple(members[start : start + shard_size])))
    return specs


def fingerprint(spec: ShardSpec, root: Path, settings: ShardSettings) -> str:
    """sha256 over the settings, the rows, and each source file's size and mtime."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": SHARD_FORMAT_VERSION, **asdict(settings)}, sort_keys=True).encode())
    for row in spec.rows:
        digest.update(json.dumps(row, sort_keys=True, default=str).encode())
        path = root / row["source_path"] if row["source_path"] else None
        try:
            stat = path.stat() if path else None
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode() if stat else b"none")
        except OSError:
            digest.update(b"missing")
    return digest.hexdigest()


def completion_path(shard_path: Path) -> Path:
    return shard_path.with_suffix(".json")


def encode_image(image: np.ndarray, encoding: str) -> bytes:
    """uint8 (size, size) -> bytes: raw row-major, or PNG (Pillow, compress level 1)."""
    if encoding == "raw":
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(data: bytes, size: int, encoding: str) -> np.ndarray:
    """Shard bytes -> uint8 (size, size)."""
    if encoding == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size)
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image, dtype=np.uint8)


def load_completion(shard_path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(completion_path(shard_path).read_text())
    except (OSError, ValueError):
        return None


def completed_shard(
    spec: ShardSpec, root: Path, shard_dir: Path, settings: ShardSettings, inputs_hash: str | None = None
) -> ShardResult | None:
    """The result (``skipped``) of a shard already written for these inputs and settings, else None."""
    shard_path = shard_dir / f"{spec.name}.parquet"
    done = load_completion(shard_path)
    if not done or done.get("fingerprint") != (inputs_hash or fingerprint(spec, root, settings)):
        return None
    if not shard_path.exists() or shard_path.stat().st_size != done.get("bytes"):
        return None
    return ShardResult(
        spec.name,
        str(shard_path),
        done["rows"],
        done["quarantined"],
        skipped=True,
        sha256=done["sha256"],
        bytes=done["bytes"],
    )


def build_shard(
    spec: ShardSpec,
    root: Path,
    shard_dir: Path,
    settings: ShardSettings,
    *,
    before_commit: Callable[[ShardSpec, int], None] | None = None,
    allow_outside_links: bool = False,
) -> ShardResult:
    """Read, letterbox and encode every image of ``spec``; write the shard and its record.

    Unreadable images are returned in ``quarantined`` with their reason; so are files that are not
    regular files (never opened) and links out of ``root`` unless ``allow_outside_links``. ``before_commit``
    (spec, images done) runs after the temporary file is written and before it is renamed:
    the place where a crash leaves no partial shard (the fault-injection tests use it).
    """
    shard_path = shard_dir / f"{spec.name}.parquet"
    inputs_hash = fingerprint(spec, root, settings)
    if done := completed_shard(spec, root, shard_dir, settings, inputs_hash):
        return done

    rows, quarantined = shard_rows(spec, root, settings, allow_outside_links)
    table = pa.Table.from_pylist(rows, schema=shard_schema(settings))
    completion_path(shard_path).unlink(missing_ok=True)
    with atomic_path(shard_path) as tmp:
        write_shard_table(table, tmp, settings)
        if before_commit is not None:
            before_commit(spec, len(rows))
    result = ShardResult(
        spec.name,
        str(shard_path),
        len(rows),
        quarantined,
        sha256=file_sha256(shard_path),
        bytes=shard_path.stat().st_size,
    )
    write_json(
        completion_path(shard_path),
        {
            "name": spec.name,
            "fingerprint": inputs_hash,
            "rows": result.rows,
            "quarantined": quarantined,
            "sha256": result.sha256,
            "bytes": result.bytes,
        },
    )
    return result


def shard_rows(
    spec: ShardSpec, root: Path, settings: ShardSettings, allow_outside_links: bool
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The shard's rows (each image read, letterboxed and encoded) and the quarantined images, each
    with its reason: unreadable, no source path, not a regular file, or a link out of ``root``."""
    rows: list[dict[str, Any]] = []
    quarantined: list[dict[str, str]] = []
    folders: dict[Path, Path] = {}  # real folder paths, for the outside-ROOT check
    for row in spec.rows:
        try:
            if not row["source_path"]:
                raise ImageReadError(row["image_id"], "no source path")
            if problem := source_problem(root, row["source_path"], allow_outside_links, folders):
                raise ImageReadError(root / row["source_path"], problem)
            pixels = read_image(root / row["source_path"], max_pixels=settings.max_pixels)
        except ImageReadError as error:
            quarantined.append({"image_id": row["image_id"], "source_path": row["source_path"], "reason": error.reason})
            continue
        height, width = pixels.shape
        box = Letterbox.fit(width, height, settings.size)
        image = encode_image(box.apply(pixels), settings.encoding)
        rows.append({**row, "labels": label_vector(row["findings"]), **box.to_record(), "image": image})
    return rows, quarantined


def write_shard_table(table: pa.Table, path: Path, settings: ShardSettings) -> None:
    """The shard's Parquet file: zstd for every column, the images too when raw (PNG bytes are
    compressed already), dictionaries for all but the images, row groups of ``settings.row_group_size``."""
    image_compression = "zstd" if settings.encoding == "raw" else "none"
    compression = {name: ("zstd" if name != "image" else image_compression) for name in table.column_names}
    pq.write_table(
        table,
        path,
        compression=compression,
        use_dictionary=[c for c in table.column_names if c != "image"],
        row_group_size=settings.row_group_size,
    )


def shard_schema(settings: ShardSettings) -> pa.Schema:
    """SHARD_SCHEMA with the settings needed to decode it in the schema metadata."""
    return SHARD_SCHEMA.with_metadata(
        {
            "cxr_miner.format": str(SHARD_FORMAT_VERSION),
            "cxr_miner.encoding": settings.encoding,
            "cxr_miner.size": str(settings.size),
            "cxr_miner.findings": json.dumps(FINDINGS),
        }
    )


class ShardReader:
    """A preprocessed workdir's shards (from their manifest), optionally of one split.

    ``shards`` are the manifest's entries (name, file, split, rows, bytes, sha256); ``paths``
    lets a data loader give each worker its own; ``batches`` reads them without torch.
    """

    def __init__(self, shard_dir: Path, split: str | None = None) -> None:
        manifest_path = Path(shard_dir) / "manifest.json"
        if not manifest_path.exists():
            raise MissingInput(f"{manifest_path}: no shard manifest; run `cxr-miner preprocess` first")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
        manifest = read_json(manifest_path, "run `cxr-miner preprocess` again to rebuild it (finished shards are kept)")
        self.settings = manifest["settings"]
        self.shards = [s for s in manifest["shards"] if split is None or s["split"] == split]
        self.paths = [Path(shard_dir) / s["file"] for s in self.shards]

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.shards)

    def batches(self, batch_size: int = 64):
        """Iterator of ``stages.batches.ShardBatch`` in shard order: images uint8 (B, S, S),
        labels bool (B, 14), meta (column -> B values)."""
        from cxr_miner.storage.stages.batches import batch_stream, list_row_groups  # batches builds on this module

        return batch_stream(list_row_groups(self.paths), batch_size)
