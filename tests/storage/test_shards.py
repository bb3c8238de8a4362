"""Shards: pixels survive the trip, completion records make reruns skip, the reader streams."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_miner.storage.inputs.images import read_image
from cxr_miner.storage.stages.batches import list_row_groups, read_row_group
from cxr_miner.storage.stages.shards import ShardReader, ShardSettings, build_shard, plan_shards
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox


def _rows(tmp_path, n=5):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        name = f"{i:08d}_000.png"
        height, width = (90, 120) if i % 2 else (100, 100)
        Image.fromarray(rng.integers(0, 255, (height, width), dtype=np.uint8)).save(tmp_path / name)
        rows.append(
            {
                "image_id": name,
                "patient_id": str(i),
                "split": "train" if i < 4 else "test",
                "source_path": name,
                "findings": ["Mass"] if i == 1 else [],
                "has_box": i == 1,
                "view_position": "PA",
                "age": 40 + i,
                "sex": "F",
            }
        )
    return rows


def test_plan_groups_by_split_in_index_order(tmp_path):
    specs = plan_shards(_rows(tmp_path), shard_size=3)
    assert [(s.name, [r["image_id"][:8] for r in s.rows]) for s in specs] == [
        ("train-00000", ["00000000", "00000001", "00000002"]),
        ("train-00001", ["00000003"]),
        ("test-00000", ["00000004"]),
    ]


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_pixels_and_labels_round_trip(tmp_path, encoding):
    rows = _rows(tmp_path)
    (spec,) = plan_shards(rows[:3], shard_size=8)
    settings = ShardSettings(size=64, encoding=encoding)
    result = build_shard(spec, tmp_path, tmp_path / "shards", settings)
    assert (result.rows, result.quarantined, result.skipped) == (3, [], False)
    path = tmp_path / "shards" / "train-00000.parquet"
    (batch,) = [read_row_group(g) for g in list_row_groups([path])]
    for i, row in enumerate(rows[:3]):
        source = read_image(tmp_path / row["source_path"])
        expected = Letterbox.fit(source.shape[1], source.shape[0], 64).apply(source)
        assert batch.meta["image_id"][i] == row["image_id"]
        np.testing.assert_array_equal(batch.images[i], expected)
        assert batch.labels[i].tolist() == [f in row["findings"] for f in FINDINGS]
    assert batch.meta["offset_y"][1] == (64 - 48) // 2
    assert pq.read_table(path, columns=["scale_x"]).column("scale_x")[1].as_py() == pytest.approx(64 / 120)


def test_rerun_skips_and_settings_change_rebuilds(tmp_path):
    (spec,) = plan_shards(_rows(tmp_path)[:2], shard_size=8)
    first = build_shard(spec, tmp_path, tmp_path / "s", ShardSettings(size=32))
    again = build_shard(spec, tmp_path, tmp_path / "s", ShardSettings(size=32))
    assert again.skipped and again.sha256 == first.sha256
    other = build_shard(spec, tmp_path, tmp_path / "s", ShardSettings(size=48))
    assert not other.skipped and other.sha256 != first.sha256
    (tmp_path / spec.rows[0]["source_path"]).write_bytes(b"")  # an input changed: rebuilt, now quarantined
    changed = build_shard(spec, tmp_path, tmp_path / "s", ShardSettings(size=48))
    assert not changed.skipped and changed.rows == 1
    assert changed.quarantined == [
        {
            "image_id": spec.rows[0]["image_id"],
            "source_path": spec.rows[0]["source_path"],
            "reason": "empty file (0 bytes)",
        }
    ]


def test_failure_before_commit_leaves_no_partial_shard(tmp_path):
    (spec,) = plan_shards(_rows(tmp_path)[:2], shard_size=8)

    def crash(spec, done):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_shard(spec, tmp_path, tmp_path / "s", ShardSettings(size=32), before_commit=crash)
    assert list((tmp_path / "s").iterdir()) == []


def test_reader_filters_by_split(tmp_path):
    rows = _rows(tmp_path)
    shard_dir = tmp_path / "shards"
    entries = []
    for spec in plan_shards(rows, shard_size=2):
        result = build_shard(spec, tmp_path, shard_dir, ShardSettings(size=32))
        entries.append(
            {"name": spec.name, "file": f"{spec.name}.parquet", "split": spec.name.split("-")[0], "rows": result.rows}
        )
    (shard_dir / "manifest.json").write_text(json.dumps({"settings": {}, "shards": entries}))
    assert len(ShardReader(shard_dir)) == 5
    test_ids = [i for batch in ShardReader(shard_dir, split="test").batches() for i in batch.meta["image_id"]]
    assert test_ids == ["00000004_000.png"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        ShardReader(shard_dir, split="dev")
