"""Which CPU settings make the demo localise (issue 11, part 4): train and evaluate variants of
the ``cpu-small`` preset on one demo collection and print their box-test localisation.

    python bench/demo_presets.py [--images 1600] [--seed 0] [--only NAME,NAME] [--box-val-fraction 0.5]

Each variant is a set of overrides of ``cpu-small`` (VARIANTS below), trained as its own run
(step 1 alone: the CAM baseline) on shards made once (512 px, as ``make demo`` makes them), then
evaluated: the released boxes (per
finding the variant and box rule chosen on box-val) are scored on box-test. Prints one row per
variant: training time, mean Acc at T(IoU) = 0.3 over the 8 boxed findings with all boxes and
with rank 1 alone, the lowest finding's Acc, the CAM baseline and AM (t = T) by the paper's rule,
and MaxBoxAccV2; results accumulate in bench/out/demo_presets.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time

from common import OUT, machine, mean, prefect_api, undefined

BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
BF16 = {"precision": "bf16"}
# overrides of cpu-small; each trains step 1 alone (the CAM baseline), as the BENCHMARKS table did
VARIANTS = {
    "cpu-small": {},
    "resnet18-stages3-128": {"model": {"stages": 3}},
    "resnet18-stages3-256-bf16-e6": {"model": {"stages": 3}, "input_size": 256, "epochs": 6, **BF16},
    "resnet10-stages3-256-bf16": {"model": {"stages": 3, "trunk": "resnet10"}, "input_size": 256, "epochs": 12, **BF16},
    "resnet10-stages3-256-bf16-wcel": {
        "model": {"stages": 3, "trunk": "resnet10"},
        "input_size": 256,
        "epochs": 12,
        "step1_loss": "w-cel",
        **BF16,
    },
}


def row(name: str, report: dict, seconds: float) -> dict:
    results = report["results"]
    last = max((k for k in results if k.startswith("am-t")), default="cam")
    acc = {k: mean(results[k][f]["iou"][0.3]["acc"] for f in BOXED) for k in ("cam", last) if k in results}
    released = report["released"] or {}
    heatmaps = {k: mean(v[f]["max_box_acc_v2"] for f in BOXED) for k, v in report["max_box_acc_v2"].items()}
    return {
        "variant": name,
        "train_s": round(seconds),
        "released_acc": released.get("mean_acc", math.nan),
        "released_acc_rank1": released.get("mean_acc_rank1", math.nan),
        "released_min_acc": released.get("min_acc", math.nan),
        "per_finding": {f: r["acc"] for f, r in released.get("findings", {}).items()},
        "cam_acc": acc.get("cam", math.nan),
        "am_acc": acc.get(last, math.nan),
        "am_key": last,
        "max_box_acc_v2": heatmaps,
        "images": report["images"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=",".join(VARIANTS))
    parser.add_argument("--box-val-fraction", type=float, default=0.5)
    args = parser.parse_args()

    from cxr_miner.flows.evaluate import evaluate
    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess
    from cxr_miner.flows.train import train
    from cxr_miner.storage.phantoms.generator import generate

    root, work = OUT / f"presets-demo-{args.images}-{args.seed}", OUT / f"presets-work-{args.images}-{args.seed}"
    if not (root / "demo_manifest.json").exists():
        generate(root, n_images=args.images, size=1024, seed=args.seed, box_fraction=0.15, workers=2)
    results_file = OUT / "demo_presets.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    with prefect_api():
        if not (work / "shards" / "manifest.json").exists():
            ingest(root=str(root), workdir=str(work))
            run_preprocess(str(work), workers=2, size=512)
        for name in args.only.split(","):
            config = work / f"{name}.json"
            config.write_text(json.dumps(VARIANTS[name]))
            started = time.perf_counter()
            train(workdir=str(work), preset="cpu-small", config_file=str(config), run=name, method="cam")
            seconds = time.perf_counter() - started
            report = evaluate(workdir=str(work), run=name, box_val_fraction=args.box_val_fraction)
            results[f"{name}@{args.images}/{args.seed}"] = row(name, report, seconds)
            results_file.write_text(json.dumps(results, indent=2))

    print(
        f"\nbox-test, T(IoU) = 0.3, mean over the 8 boxed findings ({machine()}, {args.images} images, seed {args.seed})"
    )
    print(
        "| variant | train s | released Acc | rank 1 | lowest finding | CAM (paper rule) | AM (paper rule) | MaxBoxAccV2 (best) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key.endswith(f"@{args.images}/{args.seed}"):
            best = max(r["max_box_acc_v2"].values(), default=math.nan)
            print(
                f"| {r['variant']} | {r['train_s']} | {r['released_acc']:.2f} | {r['released_acc_rank1']:.2f} | "
                f"{r['released_min_acc']:.2f} | {r['cam_acc']:.2f} | {r['am_acc']:.2f} ({r['am_key']}) | {best:.2f} |"
            )


if __name__ == "__main__":
    main()
