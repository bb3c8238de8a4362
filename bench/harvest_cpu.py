"""The harvest's CPU side, apart from the forward pass: boxing per (image, finding) pair and shard
decoding per image, and the rate they allow one GPU box.

- Boxing: what TunedLocalizer does on the CPU for one wanted pair once its map is upsampled
  to the network input (miner.methods.tuned.FindingChoice.score): the rule's component table,
  its boxes, their source-pixel boxes (and prior sizing), signals and calibrated confidence;
  the upsampling timed apart. Timed for every box rule a tuning can choose, on heatmaps of the
  preset's own map size (found by running its model once) with 1 to 3 smooth blobs.
- Decoding: row groups of shards of the preset's shard size read as harvest reads them
  (storage.stages.batches.batch_stream), per image.
- Bound: cores / (decode + pairs per image x boxing), the images per second the CPU side can
  feed when every core does only that (a GPU harvest runs a worker per core, and the GPU
  upsamples each pair's map: the bound leaves the upsampling out, and gives it with it as a CPU
  harvest does it); pairs per image from the real NIH labels (mining mode: every labelled
  finding) when ../shared/nih is there.

    python bench/harvest_cpu.py [--preset cpu-small] [--pairs 300] [--cores 16]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import time
from pathlib import Path

import numpy as np
from common import OUT, machine

NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"


def map_side(preset_name: str) -> tuple[int, int]:
    """(heatmap side, input side) of the preset's model."""
    from cxr_miner.miner.models import create_model
    from cxr_miner.miner.training import preset

    config = preset(preset_name)
    return config.input_size // create_model(config.model).stride, config.input_size


def heatmaps(count: int, side: int, seed: int = 0) -> np.ndarray:
    """(count, side, side) maps in [0, 1]: 1 to 3 Gaussian blobs and a little noise, min-max normalised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] + 0.5
    out = np.empty((count, side, side), dtype=np.float32)
    for k in range(count):
        m = rng.random((side, side)) * 0.05
        for _ in range(rng.integers(1, 4)):
            cx, cy, r = rng.random() * side, rng.random() * side, side * (0.03 + 0.12 * rng.random())
            m += rng.random() * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        out[k] = (m - m.min()) / (m.max() - m.min())
    return out


def boxing_seconds(preset_name: str, pairs: int) -> dict[str, float]:
    """Seconds per pair of FindingChoice.score, per box rule, and of upsampling a pair's map to
    the network input (``upsample``: on a GPU harvest the GPU does it, TunedLocalizer.batch_maps)."""
    import torch

    from cxr_miner.miner.calibration import BOX_SIGNALS, Calibration
    from cxr_miner.miner.localize import upsample
    from cxr_miner.miner.methods.tuned import FindingChoice
    from cxr_miner.miner.rules import BOX_RULES
    from cxr_miner.storage.vocab.letterbox import Letterbox

    side, input_size = map_side(preset_name)
    maps = torch.from_numpy(heatmaps(pairs, side))
    calibration = Calibration("logistic", -1.0, coef=(0.5,) * len(BOX_SIGNALS), boxes=100, hits=40)
    letterbox = Letterbox.fit(1024, 1024, input_size)
    started = time.perf_counter()
    upsampled = [upsample(maps[k], input_size).numpy() for k in range(pairs)]
    result = {"map_side": side, "input_size": input_size, "upsample": (time.perf_counter() - started) / pairs}
    for rule in BOX_RULES:
        choice = FindingChoice("am-t3", rule, calibration, 0.5, (0.1, 0.1) if rule.size == "prior" else None)
        started = time.perf_counter()
        for heatmap in upsampled:
            choice.score(heatmap, 0.7, input_size, letterbox)
        result[rule.name] = (time.perf_counter() - started) / pairs
    return result


def decode_seconds(shard_px: int, passes: int = 5) -> float:
    """Seconds per image to read shards of ``shard_px`` px as harvest does: the median of
    ``passes`` passes over 256 images (the first pays for its fresh buffers' pages, as a
    harvest's first row groups do, and the machine is noisy; a long harvest is the steady state)."""
    from harvest_efficiency import make_workdir

    from cxr_miner.storage.stages.batches import batch_stream, split_row_groups
    from cxr_miner.storage.stages.index import SPLITS

    work = make_workdir(256, 128, shard_px)
    groups = split_row_groups(work, SPLITS)
    times = []
    for _ in range(passes):
        started, images = time.perf_counter(), 0
        for batch in batch_stream(groups, 32):
            images += len(batch)
        times.append((time.perf_counter() - started) / images)
    return float(np.median(times))


def pairs_per_image() -> float | None:
    """Mean labelled findings per NIH image (mining mode's pairs), None without ../shared/nih."""
    path = NIH / "Data_Entry_2017_v2020.csv.gz"
    if not path.exists():
        return None
    with gzip.open(path, "rt", newline="") as handle:
        rows = csv.reader(handle)
        next(rows)
        return float(np.mean([0 if row[1] == "No Finding" else len(row[1].split("|")) for row in rows]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--cores", type=int, default=16, help="cores of the GPU box the bound is for")
    parser.add_argument(
        "--shard-px", type=int, default=None, help="shard image side (default: 512 for paper, else 256)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # one core's figures: a harvest worker per core
    boxing = boxing_seconds(args.preset, args.pairs)
    rules = {k: v for k, v in boxing.items() if k not in ("map_side", "input_size", "upsample")}
    decode = decode_seconds(args.shard_px or (512 if args.preset == "paper" else 256))
    pairs = pairs_per_image() or 1.5
    worst, paper, upsampling = max(rules.values()), rules["peak-mean"], boxing["upsample"]

    def bound(per_pair: float) -> int:
        return round(args.cores / (decode + pairs * per_pair))

    result = {
        "machine": machine(),
        "preset": args.preset,
        **{k: boxing[k] for k in ("map_side", "input_size")},
        "boxing_ms_per_pair": {k: round(1000 * v, 3) for k, v in rules.items()},
        "upsample_ms_per_pair": round(1000 * upsampling, 3),
        "decode_ms_per_image": round(1000 * decode, 3),
        "pairs_per_image": round(pairs, 3),
        "bound_images_per_s": {
            "GPU box, paper rule": bound(paper),
            "GPU box, slowest rule": bound(worst),
            "CPU harvest (upsampling too), paper rule": bound(paper + upsampling),
        },
        "cores": args.cores,
    }
    print(json.dumps(result, indent=2))
    (OUT / f"harvest_cpu-{args.preset}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
