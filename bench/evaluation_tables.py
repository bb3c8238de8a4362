"""Issue 23's tables from evaluated demo runs: rank 1 by confidence against the rule's order, the
released choice against the CAM baseline, and each AM step's validation AUC against step 1's.

    python bench/evaluation_tables.py WORKDIR:RUN [WORKDIR:RUN ...]

Reads each run's evaluation.json and tuning.json (``cxr-miner evaluate`` writes them); trains
and scores nothing. A run of bench/out/demo-seed<S>/work is what ``make demo``'s two commands
make with ``--seed S`` (see BENCHMARKS.md, issue 23).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

BOXED = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax")


def cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def ranks_table(label: str, tuning: dict) -> list[str]:
    """Per finding: the released variant and rule, box-test Acc, rank 1 by confidence and by the
    rule's order, the CAM baseline's Acc, released minus baseline [90%], choice stability."""
    lines = [
        f"\n{label}: released on box-test (rank 1 by confidence / by the rule's order)",
        "| finding | variant, rule | pairs | Acc | rank 1, confidence | rank 1, rule's order | CAM baseline Acc "
        "| released - baseline [90%] | same choice on box-val resamples |",
        "|---" * 9 + "|",
    ]
    rows = []
    for finding in BOXED:
        entry = tuning["findings"][finding]
        test = entry["candidates"][entry["method"]]["box_test"]
        base = entry["baseline"]
        against = base["released_minus_baseline"]
        low, high = against["interval"]
        rows.append(test)
        lines.append(
            f"| {finding} | {entry['method']}, {entry['candidates'][entry['method']]['rule']} | {test['pairs']} | "
            f"{cell(test['acc'])} | {cell(test['acc_rank1'])} | {cell(test['acc_rank1_rule'])} | {cell(base['box_test']['acc'])} | "
            f"{cell(against['difference'])} [{cell(low)}, {cell(high)}] | {cell(entry['choice']['stability'])} |"
        )
    lines.append(
        f"| mean | | | {cell(mean(r['acc'] for r in rows))} | {cell(mean(r['acc_rank1'] for r in rows))} | "
        f"{cell(mean(r['acc_rank1_rule'] for r in rows))} | | | |"
    )
    return lines


def points_table(label: str, tuning: dict) -> list[str]:
    lines = [
        f"\n{label}: operating points (box-val: precision >= target on 95% of resamples; else the best "
        "achievable, its robust box-val precision stated), on box-test; the order of a pair's boxes chosen on box-val",
        "| finding | operating point | box-val precision (robust) | box-test precision [95%] | recall | "
        "false positives / image | boxes in coco/ | rank order |",
        "|---" * 8 + "|",
    ]
    for finding in BOXED:
        entry = tuning["findings"][finding]
        picked = entry["candidates"][entry["method"]]
        val, test = picked["box_val"]["at_operating_point"], picked["box_test"]["at_operating_point"]
        low, high = test.get("precision_interval") or (None, None)
        kind = picked.get("operating_point_kind") or "none"
        lines.append(
            f"| {finding} | {kind} | {cell(val['precision'])} ({cell(picked.get('operating_point_precision'))}) | "
            f"{cell(test['precision'])} [{cell(low)}, {cell(high)}] | {cell(test['recall'])} | "
            f"{cell(test.get('afp'))} | {test['boxes']} | {picked.get('rank_order', 'confidence')} |"
        )
    return lines


def variants_table(label: str, tuning: dict) -> list[str]:
    """Per finding, each variant with its box rule chosen on box-val: box-test Acc [95% CI]; the
    released one marked."""
    variants = tuning["variants"]
    lines = [
        f"\n{label}: box-test Acc at IoU 0.3 of every variant, each with its own rule chosen on box-val (* released)",
        "| finding | " + " | ".join(variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    sums: dict[str, list[float]] = {v: [] for v in variants}
    for finding in BOXED:
        entry = tuning["findings"][finding]
        cells = []
        for variant in variants:
            test = entry["candidates"][variant]["box_test"]
            low, high = test.get("acc_ci") or (None, None)
            mark = "*" if variant == entry["method"] else ""
            cells.append(f"{cell(test['acc'])}{mark} [{cell(low)}, {cell(high)}]")
            sums[variant].append(test["acc"])
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    lines.append("| mean | " + " | ".join(cell(mean(sums[v])) for v in variants) + " |")
    return lines


def auc_table(label: str, evaluation: dict) -> list[str]:
    aucs = evaluation["validation_auc"]
    steps = sorted((s for s in aucs if s.startswith("step")), key=lambda s: int(s[4:]))
    lines = [
        f"\n{label}: validation AUC per step (change from step 1)",
        "| finding | " + " | ".join(steps) + " |",
        "|---" * (len(steps) + 1) + "|",
    ]
    for finding in aucs[steps[0]]:
        first = aucs["step1"][finding]
        cells = [
            cell(aucs[s][finding], 3)
            + (
                ""
                if s == "step1" or aucs[s][finding] is None or first is None
                else f" ({aucs[s][finding] - first:+.3f})"
            )
            for s in steps
        ]
        lines.append(f"| {finding} | " + " | ".join(cells) + " |")
    forgetting = evaluation.get("forgetting") or {}
    lines.append("forgotten (more than 0.02 below step 1): " + ("; ".join(forgetting.get("warnings", [])) or "none"))
    return lines


def localisation_line(label: str, evaluation: dict) -> str:
    results = evaluation["results"]
    accs = {k: mean(results[k][f]["iou"]["0.3"]["acc"] for f in BOXED) for k in results}
    return f"{label}: box-test mean Acc at T(IoU) 0.3, each variant by the paper's rule: " + ", ".join(
        f"{k} {cell(v)}" for k, v in accs.items()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="WORKDIR:RUN")
    args = parser.parse_args()
    for spec in args.runs:
        work, run = spec.rsplit(":", 1)
        folder = Path(work) / "models" / run
        evaluation = json.loads((folder / "evaluation.json").read_text())
        tuning = json.loads((folder / "tuning.json").read_text())
        label = f"{work} {run}"
        print(
            "\n".join(
                [
                    *ranks_table(label, tuning),
                    *points_table(label, tuning),
                    *variants_table(label, tuning),
                    *auc_table(label, evaluation),
                    localisation_line(label, evaluation),
                ]
            )
        )


if __name__ == "__main__":
    main()
