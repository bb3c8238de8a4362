"""The detector check on the demo (issue 13): AP at IoU 0.3 per finding of a Faster R-CNN trained on
mined boxes (at the operating point, and all), on box-val's ground truth and on the prior, with the
CPU time it took.

    python bench/detector_check.py [--images 1000] [--epochs 8] [--settings JSON]

The demo collection of ``make demo`` (1,000 phantoms of 1024 px, 15% boxed, 3 corrupt files,
seed 0) goes through ``cxr-miner run --preset cpu-demo`` once under bench/out (reused when its
release exists); the check then runs with the settings given (default: the CPU-sized MobileNetV3
detector at 256 px with a narrow box head, see SETTINGS) on 2 local Dask workers. Results go to
bench/out/detector_check.json.
"""

from __future__ import annotations

import argparse
import json
import time

from common import OUT, machine, prefect_api, undefined

SETTINGS = {"lr": 0.01, "batch_size": 4, "rois_per_image": 16, "box_head": 256}


def demo_release(images: int):
    """(workdir, release folder) of the demo pipeline, made once."""
    from cxr_miner.flows.pipeline import run
    from cxr_miner.storage.phantoms.generator import generate

    base = OUT / f"detector-demo-{images}"
    releases = base / "releases"
    if not (releases / "latest").exists():
        if not (base / "nih" / "demo_manifest.json").exists():
            generate(base / "nih", n_images=images, size=1024, seed=0, corrupt=3, box_fraction=0.15, workers=2)
        started = time.perf_counter()
        run(root=str(base / "nih"), workdir=str(base / "work"), out=str(releases), preset="cpu-demo", workers=2)
        print(f"demo pipeline: {time.perf_counter() - started:.0f} s")
    return base / "work", (releases / "latest").resolve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--background-ratio", type=float, default=1.0)
    parser.add_argument("--settings", default=json.dumps(SETTINGS))
    args = parser.parse_args()

    from cxr_miner.flows.detector_check import run_detector_check

    with prefect_api():
        work, release = demo_release(args.images)
        started = time.perf_counter()
        result = run_detector_check(
            str(release),
            str(work),
            workers=2,
            epochs=args.epochs,
            size=args.size,
            background_ratio=args.background_ratio,
            settings=json.loads(args.settings),
        )
        seconds = time.perf_counter() - started
    check = result["check"]
    (OUT / "detector_check.json").write_text(json.dumps({"seconds": seconds, "check": check}, indent=2, default=str))

    print(
        f"\ndetector check of the demo release {check['checked_release']} ({machine()}): {seconds:.0f} s wall, "
        f"{args.epochs} epochs of the largest set at {args.size} px, settings {args.settings}, background ratio {args.background_ratio}"
    )
    print(f"box-test: {check['test_images']} images, {check['test_boxes']} boxes")
    groups = [*check["findings"], "overall"]
    print("| AP@0.3 trained on | " + " | ".join(groups) + " | images (+ background) | epochs | training s |")
    print("|---" * (len(groups) + 4) + "|")
    for name, record in check["sets"].items():
        cells = [
            "-" if undefined(check["figures"][name][g]["ap30"]) else f"{check['figures'][name][g]['ap30']:.2f}"
            for g in groups
        ]
        seconds_trained = record.get("train_seconds")
        print(
            f"| {name} | " + " | ".join(cells) + f" | {record['positive_images']} (+ {record['background_images']}) | "
            f"{record['epochs']} | {'-' if seconds_trained is None else f'{seconds_trained:.0f}'} |"
        )
    print("mined boxes against the prior:", json.dumps(check["verdicts"]))


if __name__ == "__main__":
    main()
