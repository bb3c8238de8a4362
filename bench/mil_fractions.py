"""The MIL patch model on demo data (issue 12): localisation against the share of boxed images it
learns from (Li et al. 2018, Figure 5, with K-fold cross-validation), and CAM, AM and MIL side by
side on the same box-test images, with training and harvest images/s.

    python bench/mil_fractions.py [--images 320] [--fractions 0,0.2,0.4,0.8] [--folds 5] [--settings JSON]
    python bench/mil_fractions.py --preset cpu-demo --settings '{}' --workdir W --from-run cpu-demo --fractions 0.4,0.8

The second form is the comparison at the demo preset (issue 23): ``W`` a demo working folder
whose run ``--from-run`` has AM trained (``make demo``'s, or bench/out/demo-seed0/work); the side
by side run starts from copies of that run's steps 1..T and adds MIL, and no harvest is timed.

A demo collection (``--images`` phantoms of 256 px, 20% of them boxed, shards of 128 px) is
generated and preprocessed once under bench/out. For each box fraction F, a run trains one MIL
model per fold on the boxes of F of the other folds' patients (cpu-small preset with
``--settings``), and evaluate scores each on its held-out fold; the table gives, per metric and
threshold, the mean over the findings of each finding's mean over the folds (and the mean of
their standard deviations), then per finding at T(IoR) = 0.1. The side-by-side run trains AM
(steps 1..T) and MIL (box-val's boxes, plus mil-all) under one config, evaluates both on box-test,
and harvests the whole collection by ``am`` and by ``mil``. Results go to bench/out/mil_fractions.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import OUT, machine, mean, prefect_api, undefined

BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
POINTS = (("iou", 0.1), ("iou", 0.3), ("iou", 0.5), ("ior", 0.1), ("ior", 0.5))
SETTINGS = {"mil_epochs": 6, "mil_lr": 4e-3, "batch_size": 16, "loader_workers": 1, "epochs": 10, "am_epochs": 1}


def workdir(images: int) -> Path:
    """Phantoms, index and shards, made once."""
    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess
    from cxr_miner.storage.phantoms.generator import generate

    base = OUT / f"mil-{images}"
    work = base / "work"
    if not (work / "shards" / "manifest.json").exists():
        generate(base / "nih", n_images=images, size=256, seed=11, box_fraction=0.2, workers=2)
        ingest(root=str(base / "nih"), workdir=str(work))
        run_preprocess(str(work), workers=2, size=128, shard_size=64)
    return work


def fraction_rows(
    work: Path, config: Path, fractions: list[float], folds: int, preset: str = "cpu-small"
) -> dict[str, dict]:
    from cxr_miner.flows.evaluate import evaluate
    from cxr_miner.flows.train import train

    rows = {}
    for fraction in fractions:
        run = f"mil-f{fraction:g}-k{folds}"
        started = time.perf_counter()
        train(
            workdir=str(work),
            preset=preset,
            config_file=str(config),
            run=run,
            method="mil",
            box_fraction=fraction,
            folds=folds,
            for_release=False,
        )
        seconds = time.perf_counter() - started
        summary = evaluate(workdir=str(work), run=run)["folds"]
        rows[f"{fraction:g}"] = {
            "train_seconds": seconds,
            "mean": {f"{m}@{t}": mean(summary["mean"][f][m][t]["acc"] for f in BOXED) for m, t in POINTS},
            "sd": {f"{m}@{t}": mean(summary["sd"][f][m][t]["acc"] for f in BOXED) for m, t in POINTS},
            "ior@0.1": {f: summary["mean"][f]["ior"][0.1]["acc"] for f in BOXED},
            "images": {f: summary["mean"][f]["images"] for f in BOXED},
        }
    return rows


def side_by_side(work: Path, config: Path, preset: str = "cpu-small", from_run: str | None = None) -> dict:
    """AM and MIL in one run, on the same box-test images; images/s of training and (without
    ``from_run``) harvest. ``from_run``: start from copies of that run's AM steps (same settings)."""
    import shutil

    from cxr_miner.flows.evaluate import evaluate
    from cxr_miner.flows.harvest import run_harvest
    from cxr_miner.flows.train import train
    from cxr_miner.storage.stages.runs import RunFolder

    run = "side-by-side"
    if from_run:
        source, target = RunFolder.of(work, from_run).directory, RunFolder.of(work, run).directory
        target.mkdir(parents=True, exist_ok=True)
        for path in [*source.glob("step*.safetensors"), source / "metrics.json"]:
            shutil.copy2(path, target / path.name)
    train(workdir=str(work), preset=preset, config_file=str(config), run=run, method="am")
    train(
        workdir=str(work), preset=preset, config_file=str(config), run=run, method="mil", for_release=from_run is None
    )
    report = evaluate(workdir=str(work), run=run)
    metrics = RunFolder.of(work, run).metrics()
    speed = {name: mean(row["images_per_second"] for row in history) for name, history in metrics.items()}
    harvest = {}
    for method in ("am", "mil") if from_run is None else ():
        started = time.perf_counter()
        summary = run_harvest(str(work), run, workers=2, method=method)
        harvest[method] = summary["images"] / (time.perf_counter() - started)
    keys = [k for k in report["results"] if k != "released"]
    return {
        "acc": {k: {f: report["results"][k][f]["iou"][0.3]["acc"] for f in BOXED} for k in [*keys, "released"]},
        "ior": {k: {f: report["results"][k][f]["ior"][0.1]["acc"] for f in BOXED} for k in keys},
        "pairs": {f: report["evaluated"][f] for f in BOXED},
        "chosen": {
            f: e["method"] for f, e in json.loads(RunFolder.of(work, run).tuning_json.read_text())["findings"].items()
        },
        "train_images_per_second": speed,
        "harvest_images_per_second": harvest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--fractions", default="0,0.2,0.4,0.8")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--settings", default=json.dumps(SETTINGS))
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--workdir", type=Path, help="an existing demo working folder (default: phantoms made here)")
    parser.add_argument("--from-run", help="with --workdir: the run whose AM steps the side by side run starts from")
    args = parser.parse_args()

    with prefect_api():
        work = args.workdir or workdir(args.images)
        config = work / "mil-bench.json"
        config.write_text(args.settings)
        rows = fraction_rows(work, config, [float(f) for f in args.fractions.split(",") if f], args.folds, args.preset)
        sides = None if args.skip_side_by_side else side_by_side(work, config, args.preset, args.from_run)
    name = "mil_fractions.json" if args.preset == "cpu-small" else f"mil_fractions-{args.preset}.json"
    (OUT / name).write_text(
        json.dumps(
            {
                "rows": rows,
                "side_by_side": sides,
                "settings": args.settings,
                "preset": args.preset,
                "workdir": str(work),
            },
            indent=2,
        )
    )

    print(
        f"\nMIL, {args.folds}-fold cross-validation on {work} ({machine()}); preset {args.preset}, settings {args.settings}"
    )
    print("mean over the 8 boxed findings of the mean Acc over the folds (mean sd over the folds in brackets)")
    print("| box fraction | " + " | ".join(f"T({m.upper()}) {t}" for m, t in POINTS) + " | training s |")
    print("|---" * (len(POINTS) + 2) + "|")
    for fraction, row in rows.items():
        cells = [f"{row['mean'][f'{m}@{t}']:.2f} ({row['sd'][f'{m}@{t}']:.2f})" for m, t in POINTS]
        print(f"| {fraction} | " + " | ".join(cells) + f" | {row['train_seconds']:.0f} |")
    print("\nAcc at T(IoR) = 0.1 per finding (the paper's Figure 5), mean over the folds")
    print("| box fraction | " + " | ".join(BOXED) + " |")
    print("|---" * (len(BOXED) + 1) + "|")
    for fraction, row in rows.items():
        print(
            f"| {fraction} | " + " | ".join("-" if undefined(v) else f"{v:.2f}" for v in row["ior@0.1"].values()) + " |"
        )
    if sides:
        print(
            "\nSide by side on box-test (same images): Acc at T(IoU) = 0.3, each method by its own rule; released: "
            "the variant and rule chosen per finding on box-val"
        )
        print("| method | " + " | ".join(BOXED) + " | mean |")
        print("|---" * (len(BOXED) + 2) + "|")
        for key, accs in sides["acc"].items():
            print(
                f"| {key} | "
                + " | ".join("-" if undefined(v) else f"{v:.2f}" for v in accs.values())
                + f" | {mean(accs.values()):.2f} |"
            )
        print("| pairs | " + " | ".join(str(sides["pairs"][f]) for f in BOXED) + " | |")
        print(f"chosen on box-val: {sides['chosen']}")
        print(f"training images/s: {json.dumps({k: round(v, 1) for k, v in sides['train_images_per_second'].items()})}")
        print(
            f"harvest images/s (2 workers, whole collection): {json.dumps({k: round(v, 1) for k, v in sides['harvest_images_per_second'].items()})}"
        )


if __name__ == "__main__":
    main()
