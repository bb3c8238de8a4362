"""The accounting invariant and the clean-up of earlier runs' leftovers."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cxr_miner.storage.stages.shard_manifest import (
    AccountingError,
    check_accounting,
    remove_stale,
    write_manifest,
    write_quarantine,
)
from cxr_miner.storage.stages.shards import ShardResult, ShardSettings


def test_accounting_holds_or_names_the_numbers():
    check_accounting(10, 6, 3, 1)
    with pytest.raises(AccountingError, match=r"index has 10 images but shards 6 \+ quarantined 2 \+ missing 1 = 9"):
        check_accounting(10, 6, 2, 1)


def test_manifest_refuses_a_run_that_lost_an_image(tmp_path):
    results = [
        ShardResult(
            "train-00000",
            str(tmp_path / "train-00000.parquet"),
            rows=4,
            quarantined=[{"image_id": "x", "source_path": "x.png", "reason": "empty file (0 bytes)"}],
        )
    ]
    with pytest.raises(AccountingError):
        write_manifest(
            tmp_path, results, ShardSettings(), index_rows=7, missing=1, index_sha256=None, code_version="t", removed=[]
        )
    assert not (tmp_path / "manifest.json").exists()
    manifest = write_manifest(
        tmp_path, results, ShardSettings(), index_rows=6, missing=1, index_sha256=None, code_version="t", removed=[]
    )
    assert manifest["counts"] == {"index_rows": 6, "shard_rows": 4, "quarantined": 1, "missing": 1}
    assert json.loads((tmp_path / "manifest.json").read_text())["splits"] == {"train": 4, "val": 0, "test": 0}
    assert write_quarantine(tmp_path / "q.parquet", results) == 1
    assert pq.read_table(tmp_path / "q.parquet").to_pylist() == [
        {"image_id": "x", "source_path": "x.png", "reason": "empty file (0 bytes)", "shard": "train-00000"}
    ]


def test_remove_stale_keeps_current_shards_and_manifest(tmp_path):
    for name in [
        "train-00000.parquet",
        "train-00000.json",
        "train-00007.parquet",
        "train-00007.json",
        ".test-00000.parquet.123.tmp",
        "manifest.json",
    ]:
        (tmp_path / name).write_text("x")
    removed = remove_stale(tmp_path, {"train-00000"})
    assert removed == [".test-00000.parquet.123.tmp", "train-00007.json", "train-00007.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train-00000.json", "train-00000.parquet"]
