"""Does attention mining earn its place on the demo preset (issue 11, part 4)? AM settings varied
on one trained step 1, each scored on box-test against the CAM baseline of that same step 1.

    python bench/am_ablation.py --workdir demo/work [--base cpu-demo] [--only NAME,NAME]

Every variant copies the base run's step 1 (so they share one classifier and one CAM baseline),
then trains AM steps 2..T with its own settings (VARIANTS: the AM learning rate, epochs per step,
knowledge preservation and its weight) and is evaluated. Prints mean Acc at T(IoU) = 0.3 over the
8 boxed findings on box-test, by the paper's box rule, for the CAM baseline and AM at each t, and
MaxBoxAccV2 (the heatmaps apart from any box rule); results go to bench/out/am_ablation.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from common import OUT, machine, mean, prefect_api, undefined

BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
VARIANTS = {
    "am-lr-x4": {"am_lr": 2e-3},
    "am-2-epochs": {"am_epochs": 2},
    "am-no-kp": {"kp": "none"},
    "am-kp-lambda-2": {"kp_lambda": 2.0},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", default="cpu-demo")
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args()

    from cxr_miner.flows.evaluate import evaluate
    from cxr_miner.flows.train import train
    from cxr_miner.storage.stages.runs import RunFolder

    base = RunFolder.of(args.workdir, args.base)
    settings = base.config()
    results_file = OUT / "am_ablation.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    with prefect_api():
        for name in ["base", *args.only.split(",")]:
            run = args.base if name == "base" else f"{args.base}-{name}"
            if name != "base":
                folder = RunFolder.of(args.workdir, run)
                folder.directory.mkdir(parents=True, exist_ok=True)
                for last in (False, True):
                    shutil.copy(base.step(1, last), folder.step(1, last))
                config = args.workdir / f"{run}.json"
                config.write_text(json.dumps({**settings, **VARIANTS[name]}))
                started = time.perf_counter()
                train(workdir=str(args.workdir), preset="cpu-demo", config_file=str(config), run=run)
                seconds = time.perf_counter() - started
            else:
                seconds = math.nan
            report = evaluate(workdir=str(args.workdir), run=run)
            keys = [k for k in report["results"] if k != "released"]
            results[f"{args.workdir}:{name}"] = {
                "variant": name,
                "settings": VARIANTS.get(name, {}),
                "am_seconds": seconds,
                "acc": {k: mean(report["results"][k][f]["iou"][0.3]["acc"] for f in BOXED) for k in keys},
                "max_box_acc_v2": {
                    k: mean(report["max_box_acc_v2"][k][f]["max_box_acc_v2"] for f in BOXED) for k in keys
                },
                "released": report["released"]["mean_acc"] if report["released"] else math.nan,
            }
            results_file.write_text(json.dumps(results, indent=2))

    print(f"\nbox-test, mean over the 8 boxed findings ({machine()}, {args.workdir})")
    print("| AM variant | AM s | Acc@0.3 CAM | AM t=2 | AM t=3 | MaxBoxAccV2 CAM | AM t=2 | AM t=3 | released |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        if key.startswith(f"{args.workdir}:"):
            acc, box = r["acc"], r["max_box_acc_v2"]
            cells = [f"{d.get(k, math.nan):.3f}" for d in (acc, box) for k in ("cam", "am-t2", "am-t3")]
            print(f"| {r['variant']} | {r['am_seconds']:.0f} | " + " | ".join(cells) + f" | {r['released']:.3f} |")


if __name__ == "__main__":
    main()
