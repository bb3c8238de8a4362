"""Harvest parts: the mined boxes of one shard, ``W/harvest/parts/<shard>.parquet``.

One row per box. Coordinates are xyxy in source pixels (the image as ingested, before the
letterbox), continuous: pixel (i, j) covers [i, i + 1) x [j, j + 1). ``rank`` 1 is the pair's
most confident box (ties, and a finding without confidence, in the rule's order); ``rule_rank``
is the box's rank in its box rule's own order (miner.rules; the paper's rule ranks by the mean
heatmap inside), and ``score`` that rule's ranking signal; ``probability`` the classifier's
sigmoid output for the finding on the whole image; ``confidence`` the calibrated probability that the box is right
(IoU >= 0.3 with a true lesion; null where the finding has no ground truth to calibrate on) and
``at_operating_point`` whether it reaches the finding's operating point (miner.calibration);
``method`` (the variant: ``cam``, ``am-t3``, ...) and ``model_id`` say what mined it.

A part carries in its schema metadata the harvest key (model, method, mode, settings) it was
made with and how many images of its shard it covers, so a rerun keeps the parts made with
the same key and redoes the others.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cxr_miner.storage.stages.atomic import read_json, write_parquet
from cxr_miner.storage.stages.provenance import code_version, file_sha256
from cxr_miner.storage.vocab.errors import InputError, MissingInput
from cxr_miner.storage.vocab.findings import FINDINGS

HARVEST_DIR = "harvest"
PARTS_DIR = "parts"
SUMMARY_FILE = "harvest.json"
KEY_META = b"cxr_miner.harvest_key"
IMAGES_META = b"cxr_miner.images"

PART_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("finding", pa.string()),
        ("rank", pa.int8()),
        ("rule_rank", pa.int8()),
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
        ("score", pa.float32()),
        ("probability", pa.float32()),
        ("confidence", pa.float32()),
        ("at_operating_point", pa.bool_()),
        ("method", pa.string()),
        ("model_id", pa.string()),
    ]
)


def harvest_summary_file(workdir: str | Path) -> Path:
    """``W/harvest/harvest.json``: it exists only after a complete harvest."""
    return Path(workdir) / HARVEST_DIR / SUMMARY_FILE


def parts_dir(workdir: str | Path) -> Path:
    return Path(workdir) / HARVEST_DIR / PARTS_DIR


def part_path(workdir: str | Path, shard: str | Path) -> Path:
    """The part of shard ``shards/<name>.parquet`` (or of the name alone)."""
    return parts_dir(workdir) / f"{Path(shard).stem}.parquet"


def harvest_key(identity: Mapping[str, Any], choices: Mapping[str, Any], tuning: Any) -> dict[str, Any]:
    """What a harvest's boxes depend on besides their shard (``identity``: model_id, checkpoints,
    method, mode, min_score, input_size; each finding's ``choices``; the ``tuning`` identity;
    the part layout), as a part's metadata reads it back (lists, not tuples): a part of an older
    layout or another key is made again."""
    key = {**identity, "choices": choices, "tuning": tuning, "columns": PART_SCHEMA.names}
    return dict(json.loads(json.dumps(key)))


def key_text(key: Mapping[str, Any]) -> str:
    return json.dumps(dict(key), sort_keys=True)


def part_rows(
    image_ids: Sequence[str], found: Sequence[Mapping[int, Any]], probability: np.ndarray, method: str, model_id: str
) -> list[dict[str, Any]]:
    """PART_SCHEMA rows of a batch: per image, per finding index (in order), per box by rank.

    ``found[i]`` maps a finding index to a miner.localize.Localization: ``boxes`` (K, 4) xyxy in
    source pixels and ``scores`` (K,), rank 1 first, ``variant`` (None: ``method``), ``confidence``
    (K,) (None or NaN: none), ``at_operating_point`` (K,) and ``rule_rank`` (K,) (None: the
    rank); ``probability`` (N, C) the classifier's sigmoid.
    """
    rows = []
    for i, image_id in enumerate(image_ids):
        for c, loc in sorted(found[i].items()):
            k = len(loc.boxes)
            confidence = np.full(k, np.nan) if loc.confidence is None else loc.confidence
            at_point = np.zeros(k, dtype=bool) if loc.at_operating_point is None else loc.at_operating_point
            rule_rank = np.arange(1, k + 1) if loc.rule_rank is None else loc.rule_rank
            for rank, (box, score) in enumerate(zip(loc.boxes, loc.scores), start=1):
                rows.append(
                    {
                        "image_id": image_id,
                        "finding": FINDINGS[c],
                        "rank": rank,
                        "rule_rank": int(rule_rank[rank - 1]),
                        "x_min": box[0],
                        "y_min": box[1],
                        "x_max": box[2],
                        "y_max": box[3],
                        "score": score,
                        "probability": probability[i, c],
                        "confidence": None if math.isnan(confidence[rank - 1]) else float(confidence[rank - 1]),
                        "at_operating_point": bool(at_point[rank - 1]),
                        "method": loc.variant or method,
                        "model_id": model_id,
                    }
                )
    return rows


def write_part(path: Path, rows: Sequence[Mapping[str, Any]], key: Mapping[str, Any], images: int) -> int:
    """Write one shard's boxes (dicts with PART_SCHEMA's fields) atomically; returns the row count."""
    table = pa.Table.from_pylist(list(rows), schema=PART_SCHEMA)
    metadata = {KEY_META: key_text(key).encode(), IMAGES_META: str(images).encode()}
    write_parquet(path, table.replace_schema_metadata(metadata))
    return len(table)


def part_key(path: Path) -> dict[str, Any] | None:
    """The harvest key a part was made with, or None if it is missing or unreadable."""
    try:
        metadata = pq.read_schema(path).metadata or {}
        return json.loads(metadata[KEY_META])
    except (OSError, KeyError, ValueError, pa.ArrowInvalid):
        return None


def read_part(path: Path) -> pa.Table:
    """A part, checked against PART_SCHEMA; a part of another shape raises ValueError naming it."""
    table = pq.read_table(path)
    missing = [name for name in PART_SCHEMA.names if name not in table.column_names]
    if missing:
        raise InputError(path, f"not a harvest part (missing columns {missing})")
    return table.select(PART_SCHEMA.names).cast(PART_SCHEMA)


def finding_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """{finding: {"boxes", "images"}} of a table of boxes (image_id, finding columns), every
    finding present (zeros included)."""
    grouped = table.group_by(["finding"]).aggregate([("image_id", "count"), ("image_id", "count_distinct")])
    found = dict(
        zip(
            grouped.column("finding").to_pylist(),
            zip(grouped.column("image_id_count").to_pylist(), grouped.column("image_id_count_distinct").to_pylist()),
        )
    )
    return {f: dict(zip(("boxes", "images"), found.get(f, (0, 0)))) for f in FINDINGS}


def remove_stale_parts(directory: Path, keep: Iterable[str]) -> list[str]:
    """Delete parts of shards no longer in the harvest (names without .parquet); returns them."""
    wanted = set(keep)
    stale = sorted(p.stem for p in directory.glob("*.parquet") if p.stem not in wanted)
    for name in stale:
        (directory / f"{name}.parquet").unlink()
    return stale


def harvest_summary(
    workdir: Path, shards: Sequence[Mapping[str, Any]], key: Mapping[str, Any], run: str, built: int, removed: list[str]
) -> dict[str, Any]:
    """harvest.json: the key, the run, and per finding the boxes and images covered (read from the parts)."""
    totals = {f: {"boxes": 0, "images": 0} for f in FINDINGS}
    for shard in shards:  # a part at a time; an image lies in one shard, so its counts add up
        for finding, counts in finding_counts(read_part(part_path(workdir, shard["file"]))).items():
            for name, n in counts.items():
                totals[finding][name] += n
    return {
        "key": dict(key),
        "run": run,
        "code_version": code_version(),
        "shards": [s["name"] for s in shards],
        "images": sum(s["rows"] for s in shards),
        "boxes": sum(c["boxes"] for c in totals.values()),
        "boxes_per_finding": {f: c["boxes"] for f, c in totals.items()},
        "images_per_finding": {f: c["images"] for f, c in totals.items()},
        "built": built,
        "removed": removed,
    }


def read_harvest_summary(workdir: Path) -> dict[str, Any]:
    """The summary of the complete harvest of ``workdir`` (FileNotFoundError if there is none)."""
    path = harvest_summary_file(workdir)
    if not path.exists():
        raise MissingInput(f"{path}: no complete harvest (run `cxr-miner harvest` first)")
    return read_json(path, f"run `cxr-miner harvest --workdir {workdir} --run RUN` again")


class StaleHarvest(InputError):
    """The harvest was made with another tuning than the run's current one (or with none)."""


def tuning_identity(tuning_json: Path) -> str | None:
    """sha256 of a run's tuning.json, None while it has none. The harvest key records it, so that
    a release can refuse a harvest whose boxes were not made with the tuning it would report."""
    return file_sha256(tuning_json) if tuning_json.exists() else None


def check_tuning_current(workdir: Path, key: Mapping[str, Any], run: str, tuning_json: Path) -> None:
    """StaleHarvest unless the harvest (its ``key``) was made with the run's current tuning.json.
    A harvest made before the key recorded its tuning passes here (the release compares its
    choices with the tuning instead)."""
    if "tuning" not in key or key["tuning"] == (now := tuning_identity(tuning_json)):
        return
    made = "without a tuning (evaluate had not run)" if key["tuning"] is None else "with another tuning.json"
    found = (
        f"{tuning_json} is gone"
        if now is None
        else (
            f"{tuning_json} exists now"
            if key["tuning"] is None
            else f"{tuning_json} has changed since (evaluated again)"
        )
    )
    raise StaleHarvest(
        harvest_summary_file(workdir),
        f"the harvest was made {made}, but {found}: run "
        f"`cxr-miner harvest --workdir {workdir} --run {run}` again, then release",
    )
