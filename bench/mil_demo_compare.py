"""MIL with K-fold cross-validation beside CAM and AM on the same boxed images (issue 23, part 4).

    python bench/mil_demo_compare.py --workdir bench/out/demo-seed0/work --run cpu-demo \\
        --mil-runs mil-f0.4-k5,mil-f0.8-k5

Reads the runs' evaluation.json (evaluate's; run bench/mil_fractions.py --preset cpu-demo first for
the MIL runs). Every boxed (image, finding) pair is scored once per method: CAM and AM learn from
no box, so their box-val and box-test figures pool (Acc is a mean over pairs); each MIL fold model
scores only the fold it did not learn from, so its per-fold figures pool the same way. Acc at
T(IoU) = 0.3, each method by its own paper's rule (MIL: region-patches). The release is not in
this table: its choices were made on box-val, so only its box-test figures are honest (the
side-by-side table in BENCHMARKS.md has them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")
SHORT = {"Atelectasis": "AT", "Cardiomegaly": "CM", "Effusion": "PE", "Infiltration": "Inf", "Mass": "Mass",
         "Nodule": "Nod", "Pneumonia": "PNA", "Pneumothorax": "PTx"}  # fmt: skip


def pooled(parts: list[tuple[float, int]]) -> tuple[float, int]:
    """(Acc, pairs) of pooled (Acc, pairs) parts; Acc NaN without pairs."""
    pairs = sum(n for _, n in parts)
    return (sum(a * n for a, n in parts if n) / pairs if pairs else float("nan")), pairs


def cell(results: dict, finding: str) -> float:
    return results[finding]["iou"]["0.3"]["acc"]


def both_halves(evaluation: dict, variant: str) -> dict[str, tuple[float, int]]:
    test, val = evaluation, evaluation["box_val"]
    return {
        f: pooled([(cell(h["results"][variant], f), h["evaluated"][f]) for h in (test, val) if h["evaluated"][f]])
        for f in BOXED
    }


def folds(evaluation: dict) -> dict[str, tuple[float, int]]:
    per_fold = evaluation["folds"]["per_fold"]
    return {
        f: pooled([(fold[f]["iou"]["0.3"]["acc"], fold[f]["images"]) for fold in per_fold if fold[f]["images"]])
        for f in BOXED
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", default="cpu-demo")
    parser.add_argument("--mil-runs", default="mil-f0.4-k5,mil-f0.8-k5")
    args = parser.parse_args()
    read = lambda run: json.loads((args.workdir / "models" / run / "evaluation.json").read_text())  # noqa: E731
    base = read(args.run)
    rows = {v: both_halves(base, v) for v in ("cam", *sorted(k for k in base["results"] if k.startswith("am-t")))}
    for run in [r for r in args.mil_runs.split(",") if r]:
        rows[f"MIL, 5 folds ({run})"] = folds(read(run))
    print("| method | " + " | ".join(SHORT[f] for f in BOXED) + " | mean |")
    print("| --- " * (len(BOXED) + 2) + "|")
    for name, accs in rows.items():
        values = [accs[f][0] for f in BOXED]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {sum(values) / len(values):.2f} |")
    for name, accs in rows.items():
        print(f"pairs, {name}: " + ", ".join(f"{SHORT[f]} {accs[f][1]}" for f in BOXED))


if __name__ == "__main__":
    main()
