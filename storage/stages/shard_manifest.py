"""What a preprocessing run leaves besides the shards: manifest, quarantine, accounting.

``manifest.json`` exists only after a complete run; it lists every shard with its rows,
bytes and sha256, the settings, the index hash and the counts of the accounting
invariant ``index rows = shard rows + quarantined + missing``.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_miner.storage.stages.atomic import TMP_SUFFIX, write_json, write_parquet
from cxr_miner.storage.stages.index import SPLITS
from cxr_miner.storage.stages.shards import ShardResult, ShardSettings
from cxr_miner.storage.vocab.errors import InputError

MANIFEST = "manifest.json"
QUARANTINE_FILE = "quarantine.parquet"  # below the workdir

QUARANTINE_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("source_path", pa.string()), ("reason", pa.string()), ("shard", pa.string())]
)


class AccountingError(RuntimeError):
    """Some indexed image is neither in a shard, nor quarantined, nor missing."""


def check_accounting(index_rows: int, shard_rows: int, quarantined: int, missing: int) -> None:
    if index_rows != shard_rows + quarantined + missing:
        raise AccountingError(
            f"index has {index_rows} images but shards {shard_rows} + quarantined {quarantined} + missing {missing}"
            f" = {shard_rows + quarantined + missing}"
        )


MAX_LOST = 0.1  # a preprocess that loses more than 10% of the indexed images exits non-zero by default


class TooManyLost(InputError):
    """More than the allowed fraction of the indexed images is missing or unreadable."""


def check_losses(source: Path, index_rows: int, lost: list[dict[str, Any]], max_lost: float, what: str) -> None:
    """TooManyLost when ``lost`` (records with image_id and reason) is all of ``index_rows``, or
    more than ``max_lost`` of them; the message gives the count and the first reasons."""
    if not lost or (len(lost) < index_rows and len(lost) <= max_lost * index_rows):
        return
    first = "; ".join(f"{r['image_id']}: {r['reason']}" for r in lost[:3])
    raise TooManyLost(
        source,
        f"{len(lost)} of {index_rows} images {what} ({len(lost) / index_rows:.0%}, more than the {max_lost:.0%} "
        f"allowed by --max-lost), e.g. {first}",
    )


def remove_stale(shard_dir: Path, keep: set[str]) -> list[str]:
    """Delete shards of earlier plans and leftover temporary files; return their names."""
    removed = []
    for path in sorted(shard_dir.iterdir()):
        stale_tmp = path.name.endswith(TMP_SUFFIX)
        stale_shard = path.suffix in {".parquet", ".json"} and path.name != MANIFEST and path.stem not in keep
        if stale_tmp or stale_shard:
            path.unlink()
            removed.append(path.name)
    return removed


def quarantine_records(results: list[ShardResult]) -> list[dict[str, str]]:
    return [{**q, "shard": r.name} for r in results for q in r.quarantined]


def quarantined_count(workdir: Path) -> int:
    """How many images preprocess quarantined (W/quarantine.parquet; 0 before it ran)."""
    path = Path(workdir) / QUARANTINE_FILE
    return pq.read_metadata(path).num_rows if path.exists() else 0


def write_quarantine(path: Path, results: list[ShardResult]) -> int:
    """Every unreadable image with its reason (an empty table when there is none)."""
    records = quarantine_records(results)
    write_parquet(path, pa.Table.from_pylist(records, schema=QUARANTINE_SCHEMA))
    return len(records)


def write_manifest(
    shard_dir: Path,
    results: list[ShardResult],
    settings: ShardSettings,
    *,
    index_rows: int,
    missing: int,
    index_sha256: str | None,
    code_version: str,
    removed: list[str],
) -> dict[str, Any]:
    """Check the accounting, then write manifest.json; returns it."""
    shard_rows = sum(r.rows for r in results)
    quarantined = sum(len(r.quarantined) for r in results)
    check_accounting(index_rows, shard_rows, quarantined, missing)
    manifest = {
        "format": 1,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version,
        "index_sha256": index_sha256,
        "settings": asdict(settings),
        "shards": [
            {
                "name": r.name,
                "file": Path(r.path).name,
                "split": r.name.split("-")[0],
                "rows": r.rows,
                "quarantined": len(r.quarantined),
                "bytes": r.bytes,
                "sha256": r.sha256,
            }
            for r in results
        ],
        "counts": {"index_rows": index_rows, "shard_rows": shard_rows, "quarantined": quarantined, "missing": missing},
        "splits": {split: sum(r.rows for r in results if r.name.startswith(f"{split}-")) for split in SPLITS},
        "run": {
            "built": sum(not r.skipped for r in results),
            "skipped": sum(r.skipped for r in results),
            "removed_stale": removed,
        },
    }
    write_json(shard_dir / MANIFEST, manifest)
    return manifest
