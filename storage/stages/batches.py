"""Batches of shard images for training and inference, without torch.

The unit of reading is one Parquet row group (``ShardSettings.row_group_size`` images).
:func:`batch_stream` gives a data-loader worker its part of the row groups, shuffled per
epoch from ``(seed, epoch)`` and mixed across a few row groups, so any worker count and any
resumed epoch reproduces the same order. Raw shards decode with one copy per row group (out of
Arrow's read-only buffer); inference batches are views of it, a shuffle's are copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq

from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader, decode_image
from cxr_miner.storage.vocab.errors import InputError, MissingInput
from cxr_miner.storage.vocab.letterbox import Letterbox

META_COLUMNS = (
    "image_id",
    "patient_id",
    "split",
    "source_path",
    "has_box",
    "source_width",
    "source_height",
    "size",
    "content_width",
    "content_height",
    "offset_x",
    "offset_y",
)


class RowGroup(NamedTuple):
    """One row group of a shard; ``only_boxed`` keeps just its images with ground-truth boxes,
    ``images`` (when set) just those image ids."""

    path: str
    row_group: int  # its index in the shard file
    rows: int
    only_boxed: bool = False
    images: frozenset[str] | None = None


class ShardBatch(NamedTuple):
    """images uint8 (B, S, S); labels bool (B, 14) in FINDINGS order; meta: META_COLUMNS -> (B,) lists."""

    images: np.ndarray
    labels: np.ndarray
    meta: dict[str, list[Any]]

    def __len__(self) -> int:
        return len(self.images)

    def letterboxes(self) -> list[Letterbox]:
        """Each image's map back to its source pixels."""
        return [Letterbox.from_record({k: v[i] for k, v in self.meta.items()}) for i in range(len(self))]


def list_row_groups(
    paths: Sequence[Path | str], only_boxed: bool = False, images: Iterable[str] | None = None
) -> list[RowGroup]:
    """Row groups of the shards, in file order (reads the footers, and the has_box or image_id
    column when ``only_boxed`` or ``images`` filter them: then ``rows`` counts the images kept and
    groups without any are left out)."""
    groups = []
    kept = frozenset(images) if images is not None else None
    for path in paths:
        handle = pq.ParquetFile(path)
        for i in range(handle.metadata.num_row_groups):
            rows = handle.metadata.row_group(i).num_rows
            if only_boxed or kept is not None:
                rows = len(_filtered(handle.read_row_group(i, columns=["has_box", "image_id"]), only_boxed, kept))
            if rows:
                groups.append(RowGroup(str(path), i, rows, only_boxed, kept))
    return groups


def _filtered(table: pa.Table, only_boxed: bool, images: frozenset[str] | None) -> pa.Table:
    if only_boxed:
        table = table.filter(table.column("has_box"))
    if images is not None:
        table = table.filter(
            pa.compute.is_in(table.column("image_id"), value_set=pa.array(sorted(images), pa.string()))
        )
    return table


def split_row_groups(
    workdir: str | Path, splits: Sequence[str], only_boxed: bool = False, images: Iterable[str] | None = None
) -> list[RowGroup]:
    """Row groups of the workdir's shards of ``splits`` (see list_row_groups)."""
    paths = [path for split in splits for path in ShardReader(Path(workdir) / SHARD_DIR, split).paths]
    return list_row_groups(paths, only_boxed, images)


def label_prevalence(groups: Sequence[RowGroup]) -> np.ndarray:
    """Fraction of positive labels per finding (C,) over the groups' shards (label column only)."""
    total, positives = 0, None
    for path in sorted({g.path for g in groups}):
        labels = pq.read_table(path, columns=["labels"]).column("labels").combine_chunks()
        counts = np.asarray(labels.flatten(), dtype=bool).reshape(len(labels), -1).sum(axis=0)
        positives = counts if positives is None else positives + counts
        total += len(labels)
    if positives is None:
        raise MissingInput("no shards to count labels in (run `cxr-miner preprocess` first)")
    return positives / max(total, 1)


def _images(column: pa.ChunkedArray, size: int, encoding: str) -> np.ndarray:
    array = column.combine_chunks()
    if encoding == "raw":
        offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
        if np.all(np.diff(offsets) == size * size):
            data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
            return data.reshape(len(array), size, size).copy()  # one copy, out of Arrow's read-only buffer
    return np.stack([decode_image(value.as_py(), size, encoding) for value in array])


def read_row_group(group: RowGroup) -> ShardBatch:
    """Decode one row group (filtered to boxed images if the group says so)."""
    handle = pq.ParquetFile(group.path)
    metadata = handle.schema_arrow.metadata or {}
    encoding = metadata.get(b"cxr_miner.encoding", b"").decode()
    size = int(metadata.get(b"cxr_miner.size", b"0"))
    if not encoding or not size:
        raise InputError(group.path, "not a cxr-miner shard (no encoding/size in its schema metadata)")
    table = _filtered(
        handle.read_row_group(group.row_group, columns=["image", "labels", *META_COLUMNS]),
        group.only_boxed,
        group.images,
    )
    labels = np.asarray(table.column("labels").combine_chunks().flatten(), dtype=bool).reshape(len(table), -1)
    meta = {name: table.column(name).to_pylist() for name in META_COLUMNS}
    return ShardBatch(_images(table.column("image"), size, encoding), labels, meta)


def concat(batches: Sequence[ShardBatch]) -> ShardBatch:
    """One batch of ``batches`` in order (the one itself, not a copy, when there is one)."""
    if len(batches) == 1:
        return batches[0]
    return ShardBatch(
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.labels for b in batches]),
        {name: [v for b in batches for v in b.meta[name]] for name in META_COLUMNS},
    )


def take(batch: ShardBatch, rows: np.ndarray | slice) -> ShardBatch:
    """The batch's ``rows``: a view of its arrays for a slice (inference reads a row group's
    images once, with no copy per batch), a copy for an index array (a shuffle)."""
    if isinstance(rows, slice):
        return ShardBatch(batch.images[rows], batch.labels[rows], {k: v[rows] for k, v in batch.meta.items()})
    return ShardBatch(batch.images[rows], batch.labels[rows], {k: [v[i] for i in rows] for k, v in batch.meta.items()})


def batch_stream(
    groups: Sequence[RowGroup],
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    part: int = 0,
    parts: int = 1,
    mix: int = 4,
) -> Iterator[ShardBatch]:
    """Batches of ``batch_size`` (the last one may be smaller) from this part's row groups.

    With ``shuffle`` the row groups are permuted by a generator seeded with (seed, epoch),
    dealt round-robin to ``parts`` workers, and rows are shuffled within windows of ``mix``
    row groups. Without it, groups and rows keep their order (inference).
    """
    if batch_size < 1 or not 0 <= part < parts:
        raise ValueError(f"bad batch_size {batch_size} or part {part} of {parts}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    mine = [groups[i] for i in order[part::parts]]
    pending: ShardBatch | None = None
    window = mix if shuffle else 1
    for start in range(0, len(mine), window):
        parts_read = [read_row_group(g) for g in mine[start : start + window]]
        chunk = concat(([pending] if pending is not None else []) + parts_read)
        if shuffle:
            chunk = take(chunk, rng.permutation(len(chunk)))
        full = len(chunk) - len(chunk) % batch_size
        for begin in range(0, full, batch_size):
            yield take(chunk, slice(begin, begin + batch_size))
        pending = take(chunk, slice(full, None)) if full < len(chunk) else None
    if pending is not None and len(pending):
        yield pending
