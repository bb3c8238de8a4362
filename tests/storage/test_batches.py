"""Shard batches: every image once per epoch whatever the worker count, reproducible shuffles,
the boxed-only filter, and the zero-copy raw decode equal to the per-image reader."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cxr_miner.storage.stages.batches import batch_stream, label_prevalence, list_row_groups, read_row_group
from cxr_miner.storage.stages.shards import ShardSettings, build_shard, decode_image, plan_shards


@pytest.fixture(scope="module", params=["raw", "png"])
def shards(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(23):
        name = f"{i:08d}_000.png"
        Image.fromarray(rng.integers(0, 255, (40, 50), dtype=np.uint8)).save(tmp / name)
        rows.append(
            {
                "image_id": name,
                "patient_id": str(i),
                "split": "train",
                "source_path": name,
                "findings": ["Mass"] if i % 5 == 0 else [],
                "has_box": i % 5 == 0,
                "view_position": "PA",
                "age": 40,
                "sex": "M",
            }
        )
    settings = ShardSettings(size=32, encoding=request.param, row_group_size=4)
    specs = plan_shards(rows, shard_size=10)  # shards of 10, 10, 3 images; row groups of 4
    return [build_shard(spec, tmp, tmp / "shards", settings).path for spec in specs]


def ids(batches):
    return [i for b in batches for i in b.meta["image_id"]]


def test_row_groups_and_boxed_counts(shards):
    groups = list_row_groups(shards)
    assert [g.rows for g in groups] == [4, 4, 2, 4, 4, 2, 3]
    boxed = list_row_groups(shards, only_boxed=True)
    assert sum(g.rows for g in boxed) == 5  # images 0, 5, 10, 15, 20
    assert ids(read_row_group(g) for g in boxed) == [f"{i:08d}_000.png" for i in (0, 5, 10, 15, 20)]


def test_decoded_pixels_and_labels_match_a_row_by_row_decode(shards):
    """The zero-copy raw path against decoding each row's bytes on its own."""
    expected = {}
    for path in shards:
        for row in pq.read_table(path, columns=["image_id", "image", "labels", "size"]).to_pylist():
            encoding = pq.read_schema(path).metadata[b"cxr_miner.encoding"].decode()
            expected[row["image_id"]] = (
                decode_image(row["image"], row["size"], encoding),
                np.array(row["labels"], dtype=bool),
            )
    for group in list_row_groups(shards):
        batch = read_row_group(group)
        for i, image_id in enumerate(batch.meta["image_id"]):
            assert np.array_equal(batch.images[i], expected[image_id][0])
            assert np.array_equal(batch.labels[i], expected[image_id][1])


@pytest.mark.parametrize("parts", [1, 2, 3])
def test_each_epoch_covers_every_image_once(shards, parts):
    groups = list_row_groups(shards)
    seen = [
        i
        for part in range(parts)
        for i in ids(batch_stream(groups, 5, shuffle=True, seed=1, epoch=2, part=part, parts=parts))
    ]
    assert sorted(seen) == sorted(f"{i:08d}_000.png" for i in range(23))


def test_shuffle_is_reproducible_per_epoch_and_differs_between_epochs(shards):
    groups = list_row_groups(shards)
    first = ids(batch_stream(groups, 5, shuffle=True, seed=1, epoch=0))
    assert first == ids(batch_stream(groups, 5, shuffle=True, seed=1, epoch=0))
    assert first != ids(batch_stream(groups, 5, shuffle=True, seed=1, epoch=1))
    assert ids(batch_stream(groups, 5)) == [f"{i:08d}_000.png" for i in range(23)]  # no shuffle: file order
    sizes = [len(b) for b in batch_stream(groups, 5, shuffle=True, seed=1, epoch=0)]
    assert sizes == [5, 5, 5, 5, 3]


def test_label_prevalence_counts_positives_per_finding(shards):
    from cxr_miner.storage.vocab.findings import FINDINGS

    prevalence = label_prevalence(list_row_groups(shards))
    assert prevalence[FINDINGS.index("Mass")] == pytest.approx(5 / 23)
    assert prevalence.sum() == pytest.approx(5 / 23)
