"""Ingest of the real NIH metadata (112,120 rows, 984 boxes) with --metadata-only: time and peak memory.

Needs ../shared/nih (Data_Entry_2017_v2020.csv.gz, BBox_List_2017.csv.gz). Runs the
``ingest`` flow in this process after a warm-up of the Prefect API; peak memory is the
process's peak resident set (ru_maxrss), with the figure before the run beside it.

    python bench/ingest_full_metadata.py [--nih ../shared/nih]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import time
from pathlib import Path

from common import OUT, machine, prefect_api

DEFAULT_NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=DEFAULT_NIH)
    args = parser.parse_args()
    if not (args.nih / "Data_Entry_2017_v2020.csv.gz").exists():
        raise SystemExit(f"{args.nih}: no Data_Entry_2017_v2020.csv.gz; pass --nih")

    import pyarrow.parquet as pq

    from cxr_miner.flows.ingest import ingest

    work = OUT / "ingest-full"
    shutil.rmtree(work, ignore_errors=True)
    before = rss_mib()
    started = time.perf_counter()
    report = ingest(root=str(args.nih), workdir=str(work), metadata_only=True)
    seconds = time.perf_counter() - started
    peak = rss_mib()
    index = pq.read_table(work / "index.parquet")
    assert index.num_rows == 112_120 and report["gt_boxes"] == 984

    print(f"machine: {machine()}")
    print(
        f"ingest --metadata-only of {index.num_rows} rows, {report['gt_boxes']} boxes: {seconds:.1f} s "
        f"({index.num_rows / seconds:,.0f} rows/s), splits {report['splits']}"
    )
    print(
        f"peak RSS {peak:.0f} MiB (process before the run: {before:.0f} MiB); index.parquet "
        f"{(work / 'index.parquet').stat().st_size / 2**20:.1f} MiB"
    )


def main() -> None:
    with prefect_api():
        run()


if __name__ == "__main__":
    main()
