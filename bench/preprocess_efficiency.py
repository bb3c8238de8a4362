"""Preprocess efficiency: the Prefect + Dask flow against a bare process pool doing the same work.

Both sides read every source PNG, letterbox it to 512 px and encode it as the shards do
(raw bytes compressed with zstd, or PNG), with the same number of processes, on the same
images, in one run. The flow also writes Parquet shards, manifests and the quarantine;
its time includes starting the Dask cluster, not the Prefect API (started once before). Prints images per second of each and the
ratio flow / bare (target >= 0.85).

    python bench/preprocess_efficiency.py [--images 2000] [--workers 2] [--encoding raw]
"""

from __future__ import annotations

import argparse
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import OUT, demo_collection, machine, prefect_api


def bare_one(args: tuple[str, int, str]) -> int:
    """Decode, letterbox, encode one image; the bytes' length (nothing written)."""
    import pyarrow as pa

    from cxr_miner.storage.inputs.images import read_image
    from cxr_miner.storage.stages.shards import encode_image
    from cxr_miner.storage.vocab.letterbox import Letterbox

    path, size, encoding = args
    pixels = read_image(Path(path))
    data = encode_image(Letterbox.fit(pixels.shape[1], pixels.shape[0], size).apply(pixels), encoding)
    if encoding == "raw":  # the shard writer compresses the image column with zstd
        data = pa.compress(data, codec="zstd", asbytes=True)
    return len(data)


def bare_pool(paths: list[str], size: int, encoding: str, workers: int) -> float:
    started = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        total = sum(pool.map(bare_one, [(p, size, encoding) for p in paths], chunksize=16))
    assert total > 0
    return time.perf_counter() - started


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--encoding", default="raw", choices=["raw", "png"])
    args = parser.parse_args()

    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess

    root = demo_collection(args.images)
    work = OUT / "preprocess-work"
    shutil.rmtree(work, ignore_errors=True)
    ingest(root=str(root), workdir=str(work))
    paths = sorted(str(p) for p in root.glob("images_*/images/*.png"))
    n = len(paths)

    bare_first = bare_pool(paths, args.size, args.encoding, args.workers)  # also warms the page cache
    started = time.perf_counter()
    manifest = run_preprocess(
        str(work), workers=args.workers, size=args.size, shard_size=args.shard_size, encoding=args.encoding
    )
    flow_seconds = time.perf_counter() - started
    bare_second = bare_pool(paths, args.size, args.encoding, args.workers)
    bare_seconds = (bare_first + bare_second) / 2
    assert manifest["counts"]["shard_rows"] == n

    print(f"machine: {machine()}")
    print(
        f"{n} images of 1024 px -> {args.size} px, encoding {args.encoding}, {args.workers} processes, shards of {args.shard_size}"
    )
    print(f"bare process pool: {n / bare_seconds:7.1f} images/s  ({bare_first:.1f} s and {bare_second:.1f} s)")
    print(f"preprocess flow:   {n / flow_seconds:7.1f} images/s  ({flow_seconds:.1f} s, Dask cluster start included)")
    print(f"efficiency (flow / bare): {bare_seconds / flow_seconds:.2f}  (target >= 0.85)")


def main() -> None:
    with prefect_api():
        run()


if __name__ == "__main__":
    main()
