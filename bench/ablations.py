"""The ablations of Cai et al. (Tables 1 and 3 in shape) on phantoms: Acc at T(IoU) 0.1 and 0.3.

Runs, on one demo collection with many boxed images:
- `baseline` vs `msa`: step 1 alone (the CAM of each classifier), Table 1;
- AM t = 1, 2, 3 with KP, Table 3 (top);
- no KP vs KP-Vanilla vs KP, each at t = 3, Table 3 (bottom). The three share step 1
  (the same seed trains the same classifier), so it is trained once and copied.

    python bench/ablations.py [--images 600] [--preset cpu-small] [--epochs 12]

Prints one table per threshold and writes bench/out/ablations.json.
"""

from __future__ import annotations

import argparse
import json
import shutil

from common import OUT, machine, prefect_api

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--input-size", type=int, default=None)
    args = parser.parse_args()

    from cxr_miner.flows.evaluate import evaluate
    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess
    from cxr_miner.flows.train import train
    from cxr_miner.storage.phantoms.generator import generate
    from cxr_miner.storage.stages.runs import RunFolder

    root, work = OUT / f"ablation-demo-{args.images}", OUT / f"ablation-work-{args.images}-{args.input_size or 128}"
    if not (root / "demo_manifest.json").exists():
        generate(root, n_images=args.images, size=256, seed=5, box_fraction=0.3, workers=2)
    base = {"epochs": args.epochs, **({"input_size": args.input_size} if args.input_size else {})}
    runs = {
        "baseline": {**base, "model": {"name": "baseline"}, "am_steps": 1},
        "msa-kp": {**base, "kp": "kp"},
        "msa-vanilla": {**base, "kp": "vanilla"},
        "msa-none": {**base, "kp": "none"},
    }
    results = {}
    with prefect_api():
        if not (work / "shards" / "manifest.json").exists():
            ingest(root=str(root), workdir=str(work))
            run_preprocess(
                str(work), workers=2, size=128 if not args.input_size else max(128, args.input_size), shard_size=64
            )
        for name, settings in runs.items():
            config = work / f"{name}.json"
            config.write_text(json.dumps(settings))
            folder = RunFolder.of(work, name)
            if name in ("msa-vanilla", "msa-none") and not folder.step(1).exists():
                folder.directory.mkdir(parents=True, exist_ok=True)
                for last in (False, True):
                    shutil.copy(RunFolder.of(work, "msa-kp").step(1, last), folder.step(1, last))
            train(workdir=str(work), preset=args.preset, config_file=str(config), run=name)
            results[name] = evaluate(workdir=str(work), run=name)["results"]

    rows = {"baseline (t=1)": results["baseline"]["cam"], "msa (t=1)": results["msa-kp"]["cam"]}
    rows.update({f"msa KP t={t}": results["msa-kp"]["cam" if t == 1 else f"am-t{t}"] for t in (2, 3)})
    rows.update({f"msa {kp} t=3": results[f"msa-{kp}"]["am-t3"] for kp in ("none", "vanilla", "kp")})
    table = {}
    for threshold in (0.1, 0.3):
        print(f"\nAcc at T(IoU) = {threshold} ({machine()}, preset {args.preset}, {args.images} images)")
        print("| method | " + " | ".join(f[:8] for f in FINDINGS) + " | mean |")
        print("|---" * (len(FINDINGS) + 2) + "|")
        for label, result in rows.items():
            accs = [result[f]["iou"][threshold]["acc"] for f in FINDINGS]
            evaluated = [a for a in accs if a == a]
            mean = sum(evaluated) / len(evaluated)
            table.setdefault(str(threshold), {})[label] = {"acc": dict(zip(FINDINGS, accs)), "mean": mean}
            print(f"| {label} | " + " | ".join("-" if a != a else f"{a:.2f}" for a in accs) + f" | {mean:.2f} |")
    (OUT / "ablations.json").write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
