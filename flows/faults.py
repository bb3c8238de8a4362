"""Fault injection for the resume tests: one-shot faults planted through a file.

Set ``CXR_MINER_FAULT_FILE`` to a JSON file ``{"shard": NAME, "mode": "raise" | "exit"}``.
The first process that reaches the fault point NAME deletes the file and then raises (a task
failure) or exits at once, without any cleanup (a killed worker or command). The points:

- a shard or harvest part's name: its temporary file is written, not yet renamed;
- ``ingest``: index.parquet and gt_boxes.parquet are written, the ingest report not yet;
- ``train-step<t>-epoch<e>-batch<b>``: in the middle of an epoch, after batch b;
- ``release``: the release is complete in its staging folder, not yet published.

Without the variable this is a single environment lookup.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cxr_miner.storage.stages.shards import ShardSpec

FAULT_ENV = "CXR_MINER_FAULT_FILE"


class InjectedFault(RuntimeError):
    """The planted failure: proves a stopped run resumes correctly."""


def plant_fault(path: Path, shard: str, mode: str) -> None:
    if mode not in {"raise", "exit"}:
        raise ValueError(f"fault mode {mode!r} is not 'raise' or 'exit'")
    path.write_text(json.dumps({"shard": shard, "mode": mode}))


def maybe_fail(shard: ShardSpec | str, images_done: int = 0) -> None:
    """Called at each fault point (module doc)."""
    name = shard if isinstance(shard, str) else shard.name
    plan_path = os.environ.get(FAULT_ENV)
    if not plan_path:
        return
    try:
        plan = json.loads(Path(plan_path).read_text())
    except (OSError, ValueError):
        return
    if plan.get("shard") != name:
        return
    try:
        Path(plan_path).unlink()
    except FileNotFoundError:
        return  # another attempt took it first
    if plan.get("mode") == "exit":
        os._exit(70)
    raise InjectedFault(f"injected fault in shard {name} after {images_done} images")
