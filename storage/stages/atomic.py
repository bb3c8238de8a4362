"""Atomic writes: write to a temporary name beside the target, then rename over it."""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_miner.storage.vocab.errors import InputError, MissingInput

TMP_SUFFIX = ".tmp"
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a quota reached


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``target``, on error it is removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as error:
        if (
            error.errno in FULL or "No space left" in str(error)
        ) and not error.filename:  # a failed write() names no file
            code = error.errno if error.errno in FULL else errno.ENOSPC
            raise OSError(code, f"{os.strerror(code)}: could not write {target.name} into {target.parent}") from error
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (an undefined figure) replaced by None, so
    that it encodes as strict JSON (``null``), which every parser reads; tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, np.generic):
        return json_safe(value.item())
    return value


def json_text(data: Any, indent: int | None = 2) -> str:
    """The one JSON encoding of every file the project writes: strict JSON (undefined figures as
    ``null``, never ``NaN``; ``allow_nan=False`` makes a miss an error here, not in a reader),
    sorted keys; values JSON has no type for (paths, dates) as their text."""
    return json.dumps(json_safe(data), indent=indent, sort_keys=True, default=str, allow_nan=False)


def write_json(target: Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json_text(data) + "\n")


def read_json(path: Path, remake: str) -> Any:
    """The JSON file at ``path``; a file that is not JSON (truncated, overwritten) is an
    :class:`InputError` that names it and says how to make it again (``remake``: a command)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such file ({remake})")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise InputError(path, f"damaged: not JSON ({error}); {remake}") from None


def write_parquet(target: Path, table: pa.Table, **options: Any) -> None:
    """pq.write_table to a temporary name, then rename (zstd unless told otherwise)."""
    options.setdefault("compression", "zstd")
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp, **options)
