"""Shard read throughput per core, and the raw-versus-PNG encoding choice.

Builds the same shards in both encodings from one demo collection, then reads every image
in one process (one core): from raw shards, from PNG shards, and by decoding and
letterboxing the source PNG files (what training would do without shards). Prints
images per second and bytes per image of each.

    python bench/shard_read.py [--images 500]
"""

from __future__ import annotations

import argparse
import time

from common import OUT, demo_collection, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    from cxr_miner.storage.inputs.images import read_image
    from cxr_miner.storage.stages.batches import batch_stream, list_row_groups
    from cxr_miner.storage.stages.shards import ShardSettings, build_shard, plan_shards
    from cxr_miner.storage.vocab.letterbox import Letterbox

    root = demo_collection(2000)
    names = sorted(root.glob("images_*/images/*.png"))[: args.images]
    rows = [
        {
            "image_id": p.name,
            "patient_id": p.name[:8],
            "split": "train",
            "source_path": str(p.relative_to(root)),
            "findings": [],
            "has_box": False,
            "view_position": "PA",
            "age": 50,
            "sex": "F",
        }
        for p in names
    ]
    results = {}
    for encoding in ("raw", "png"):
        shard_dir = OUT / f"read-{encoding}"
        started = time.perf_counter()
        built = [
            build_shard(spec, root, shard_dir, ShardSettings(size=args.size, encoding=encoding))
            for spec in plan_shards(rows, 256)
        ]
        write_seconds = time.perf_counter() - started
        size_bytes = sum(r.bytes for r in built)
        started = time.perf_counter()
        paths = [shard_dir / f"{spec.name}.parquet" for spec in plan_shards(rows, 256)]
        count = sum(len(batch) for batch in batch_stream(list_row_groups(paths), 64))
        read_seconds = time.perf_counter() - started
        results[encoding] = (count / read_seconds, size_bytes / count, count / write_seconds)

    started = time.perf_counter()
    for path in names:
        pixels = read_image(path)
        Letterbox.fit(pixels.shape[1], pixels.shape[0], args.size).apply(pixels)
    source_rate = len(names) / (time.perf_counter() - started)
    source_bytes = sum(p.stat().st_size for p in names) / len(names)

    print(f"machine: {machine()}; {len(names)} images, 1024 px sources, {args.size} px shards, one process")
    print(f"{'':26s}{'images/s':>10s}{'KiB/image':>11s}{'write images/s':>16s}")
    for encoding, (rate, per_image, write_rate) in results.items():
        print(f"{'shards, ' + encoding:26s}{rate:10.0f}{per_image / 1024:11.1f}{write_rate:16.0f}")
    print(f"{'source PNG + letterbox':26s}{source_rate:10.0f}{source_bytes / 1024:11.1f}")
    print(
        f"raw shards read {results['raw'][0] / source_rate:.1f}x faster than decoding the sources, "
        f"{results['raw'][0] / results['png'][0]:.1f}x faster than PNG shards"
    )


if __name__ == "__main__":
    main()
