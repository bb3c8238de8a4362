"""Checkpoints as safetensors files: named arrays plus a JSON record, safe to load (no pickle).

Torch-free: arrays are numpy (``miner.checkpoint`` converts models and optimisers to and
from them). The JSON record (config, epoch, metrics, ...) is stored in the safetensors
header's metadata under ``cxr_miner``, so one file carries everything a resume needs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

from cxr_miner.storage.stages.atomic import atomic_path
from cxr_miner.storage.vocab.errors import InputError, MissingInput, UserError

META_KEY = "cxr_miner"


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read; the message names the file and how to remake it."""

    def __init__(self, path: Path, error: Exception) -> None:
        path = Path(path)
        last = path.with_name(path.stem.removesuffix("-last") + "-last" + path.suffix)
        super().__init__(
            f"{path}: damaged, not a readable cxr-miner checkpoint ({type(error).__name__}: {error}); delete it "
            f"and {last.name}, then run `cxr-miner train` with the same --run: that model is trained again"
        )


def write_checkpoint(path: Path, arrays: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Write atomically: a crash leaves the previous checkpoint, never a partial one."""
    data = save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata={META_KEY: json.dumps(record, default=str)}
    )
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, record) of a checkpoint written by write_checkpoint."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such checkpoint")
    try:
        with safe_open(path, framework="numpy") as handle:
            record = json.loads((handle.metadata() or {})[META_KEY])
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle is no dict)
    except (SafetensorError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(path, error) from error
    return arrays, record


def read_checkpoint_record(path: Path) -> dict[str, Any]:
    """The JSON record alone (reads the header, not the arrays)."""
    try:
        with safe_open(Path(path), framework="numpy") as handle:
            return json.loads((handle.metadata() or {})[META_KEY])
    except (SafetensorError, ValueError, KeyError, OSError) as error:
        raise CheckpointError(path, error) from error


def read_weights_file(path: Path) -> dict[str, np.ndarray]:
    """All arrays of a ``.safetensors`` weights file (e.g. a converted torchvision ResNet)."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="numpy") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle is no dict)
    except (SafetensorError, OSError) as error:
        raise InputError(path, f"not a safetensors weights file ({type(error).__name__}: {error})") from error
