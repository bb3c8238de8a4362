"""A run's localisation evaluation: ``evaluation.json`` and ``evaluation.md`` in its folder.

``results``: method key (``cam``, ``am-t2``, ...) -> finding -> metric (``iou``, ``ior``) ->
T -> {acc, afp}; the Markdown has the papers' layout (Cai et al., Table 5): rows T x method,
columns the boxed findings, cells "Acc-AFP".
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cxr_miner.storage.releases.reviews import REVIEWS_FILE, read_rejections, read_reviewed_truth
from cxr_miner.storage.stages.atomic import json_text, read_json, write_json
from cxr_miner.storage.stages.box_splits import BOX_TEST
from cxr_miner.storage.stages.harvest import tuning_identity
from cxr_miner.storage.stages.index import GT_BOXES_FILE, INDEX_FILE
from cxr_miner.storage.stages.provenance import code_version, file_sha256
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.stages.shard_manifest import MANIFEST
from cxr_miner.storage.stages.shards import SHARD_DIR
from cxr_miner.storage.vocab.errors import InputError, UserError
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FEW_PAIRS, FINDINGS, REJECT_MATCH_IOU
from cxr_miner.storage.vocab.text import MISSING, markdown_table, rule_label

SHORT = {
    "Atelectasis": "AT",
    "Cardiomegaly": "CM",
    "Effusion": "PE",
    "Infiltration": "Infiltrat.",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "PNA",
    "Pneumothorax": "PTx",
}


def finding_header(finding: str, pairs: Mapping[str, int] | None = None) -> str:
    """A table's column name for ``finding``: its short name, flagged when it has fewer than
    FEW_PAIRS pairs in the half (its figures then rest on too few images to trust)."""
    name = SHORT.get(finding, finding)
    n = (pairs or {}).get(finding)
    return f"{name} (only {n} pairs)" if n is not None and n < FEW_PAIRS else name


def acc_afp_table(
    results: dict[str, dict],
    thresholds: tuple[float, ...],
    metric: str = "iou",
    findings: Sequence[str] = BOXED_FINDINGS,
    pairs: Mapping[str, int] | None = None,
) -> str:
    """Rows: T x method; columns: ``findings`` (the reported ones; ``pairs``: their pair counts,
    for the flag of finding_header); cells "Acc-AFP [Acc's 95% CI]"."""
    header = [f"T({metric.upper()})", "method", *(finding_header(f, pairs) for f in findings)]
    rows = []
    for t in thresholds:
        for method, table in results.items():
            cells = [table[f][metric][t] for f in findings]
            rows.append([str(t), method, *(acc_afp_cell(c) for c in cells)])
    return markdown_table(header, rows)


def acc_afp_cell(cell: Mapping[str, Any]) -> str:
    if math.isnan(cell["acc"]):
        return MISSING
    return f"{cell['acc']:.2f}-{cell['afp']:.2f}" + (f" {_interval(cell['acc_ci'])}" if "acc_ci" in cell else "")


def max_box_acc_table(results: dict[str, dict], findings: Sequence[str] = BOXED_FINDINGS) -> str:
    """Rows: method; columns: ``findings`` (the reported ones) and their mean; cells MaxBoxAccV2."""
    header = ["method", *(SHORT.get(f, f) for f in findings), "mean"]
    rows = []
    for method, table in results.items():
        values = [table[f]["max_box_acc_v2"] for f in findings]
        defined = [v for v in values if not math.isnan(v)]
        mean = sum(defined) / len(defined) if defined else math.nan
        rows.append([method, *(MISSING if math.isnan(v) else f"{v:.2f}" for v in [*values, mean])])
    return markdown_table(header, rows)


def evaluation_markdown(half: dict[str, Any], name: str) -> str:
    """One half's tables: Acc-AFP at T(IoU) and T(IoR), then MaxBoxAccV2, each titled with the half."""
    if not half["results"]:
        return f"No boxed image of {name} was scored."
    first = next(iter(half["results"].values()))[BOXED_FINDINGS[0]]
    findings = tuple(half["evaluated"]) or BOXED_FINDINGS
    parts = [
        f"## {name}: Acc-AFP [Acc's 95% CI over images], T({metric.upper()})\n\n"
        + acc_afp_table(half["results"], tuple(first[metric]), metric, findings, half["evaluated"])
        for metric in ("iou", "ior")
    ]
    if half["max_box_acc_v2"]:
        parts.append(
            f"## {name}: MaxBoxAccV2 of the heatmaps (mean over IoU 0.3, 0.5, 0.7 of the best threshold's box "
            "accuracy)\n\n" + max_box_acc_table(half["max_box_acc_v2"], findings)
        )
    return "\n\n".join(parts)


def box_rules_markdown(halves: dict[str, dict[str, Any]], threshold: float = 0.3) -> str:
    """Mean Acc at T(IoU) = ``threshold`` over the evaluated boxed findings, per method and box rule
    (the method's own rule, then the candidates), one column per half: the evidence a rule is
    chosen on (box-val) and what it then gives (box-test)."""

    def mean_acc(results: dict[str, Any], evaluated: dict[str, int]) -> float:
        values = [results[f]["iou"][threshold]["acc"] for f in evaluated if evaluated[f]]
        return sum(values) / len(values) if values else math.nan

    def rule_results(half: dict[str, Any], key: str, rule: str) -> dict[str, Any]:
        return half["results"][key] if rule == "own" else half["box_rules"][key][rule]

    first = next(iter(halves.values()))
    rows = []
    for key in first["results"]:
        for rule in ["own", *first["box_rules"].get(key, {})]:
            cells = [
                mean_acc(rule_results(h, key, rule), h["evaluated"]) if key in h["results"] else math.nan
                for h in halves.values()
            ]
            rows.append([key, rule, *(MISSING if math.isnan(v) else f"{v:.3f}" for v in cells)])
    title = (
        f"## Box rules: mean Acc at T(IoU) = {threshold} over the evaluated findings (choose on box-val, read box-test)"
    )
    return f"{title}\n\n" + markdown_table(["method", "box rule", *halves], rows)


def _cell(value: float | None, digits: int = 2) -> str:
    return MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _interval(bounds: Any, digits: int = 2) -> str:
    low, high = bounds or (None, None)
    return MISSING if low is None or math.isnan(low) else f"[{low:.{digits}f}, {high:.{digits}f}]"


CHOICE_COLUMNS = [
    "finding",
    "method",
    "box rule",
    "same choice on box-val resamples",
    "box-val Acc / rank 1 [95% CI] (pairs)",
    "box-test Acc / rank 1 / rank 1 by the rule's order [95% CI] (pairs)",
    "CAM baseline, paper's rule: box-test Acc / rank 1 [95% CI]",
    "released - baseline, Acc [90% interval]",
]
POINT_COLUMNS = [
    "finding (box-test pairs)",
    "box-test ECE [95% CI]",
    "operating point",
    "box-val precision there [95% CI]",
    "box-test precision [95% CI]",
    "box-test recall [95% CI]",
    "box-test false positives per image",
    "box-test boxes there",
]


def tuning_markdown(tuning: dict[str, Any]) -> str:
    """Per finding: the method and box rule chosen on box-val, how often box-val's resamples choose
    the same, and on box-test the released boxes' Acc (all boxes, rank 1 by confidence as released
    and by the rule's order) beside the CAM baseline's with the paper's rule, the difference with
    its bootstrap interval; then the confidence and the operating point (chosen on box-val so that
    its precision holds the target on all but 5% of box-val's resamples) on box-test."""
    findings = tuning["findings"].items()
    title = (
        f"## Released boxes: chosen on box-val, read on box-test (hit: IoU >= {tuning['hit_iou']}; rank 1: as "
        "released, the most confident box, or the rule's first where box-val chose the rule's order (marked); the "
        "CAM baseline with the paper's rule kept unless beaten beyond box-val's noise)"
    )
    point_title = (
        f"## Operating points: precision >= {tuning['precision_target']} on all but 5% of box-val's resamples "
        "(where no confidence reaches it, the best achievable, its precision stated), read on box-test"
    )
    choices = markdown_table(CHOICE_COLUMNS, [choice_row(finding, choice) for finding, choice in findings])
    points = markdown_table(POINT_COLUMNS, [point_row(finding, choice) for finding, choice in findings])
    return f"{title}\n\n{choices}\n\n{point_title}\n\n{points}"


def choice_row(finding: str, choice: Mapping[str, Any]) -> list[str]:
    """tuning_markdown's row of a finding's choice (CHOICE_COLUMNS)."""
    picked = choice["candidates"][choice["method"]]
    val, test = picked["box_val"], picked["box_test"]
    baseline, how = choice.get("baseline", {}), choice.get("choice", {})
    against = baseline.get("released_minus_baseline", {})
    return [
        finding,
        choice["method"],
        rule_label(picked) + (", ranked by the rule" if picked.get("rank_order") == "rule" else ""),
        _cell(how.get("stability")),
        f"{_with_ci(val, 'acc')} / {_with_ci(val, 'acc_rank1')} {_pairs(val)}",
        f"{_with_ci(test, 'acc')} / {_with_ci(test, 'acc_rank1')} / {_with_ci(test, 'acc_rank1_rule')} {_pairs(test)}",
        f"{_with_ci(baseline.get('box_test', {}), 'acc')} / {_with_ci(baseline.get('box_test', {}), 'acc_rank1')}",
        f"{_cell(against.get('difference'))} {_interval(against.get('interval'))}",
    ]


def _with_ci(figures: Mapping[str, Any], name: str, ci: str | None = None, digits: int = 2) -> str:
    """A figure and its 95% CI (``ci``: its key, default ``name``_ci), as "0.84 [0.70, 0.95]"."""
    bounds = figures.get(ci or f"{name}_ci")
    return _cell(figures.get(name), digits) + ("" if bounds is None else f" {_interval(bounds, digits)}")


def _pairs(half: Mapping[str, Any]) -> str:
    """A half's pair count in parentheses, flagged when under FEW_PAIRS."""
    n = half["pairs"]
    return f"({n}: fewer than {FEW_PAIRS})" if n < FEW_PAIRS else f"({n})"


def point_row(finding: str, choice: Mapping[str, Any]) -> list[str]:
    """tuning_markdown's row of a finding's operating point (POINT_COLUMNS)."""
    picked = choice["candidates"][choice["method"]]
    val, test = picked["box_val"], picked["box_test"]
    at, val_at = test["at_operating_point"], val["at_operating_point"]
    return [
        f"{finding} {_pairs(test)}",
        _with_ci(test["reliability"], "ece", digits=3),
        _cell(picked["operating_point"], 3) + point_kind_note(picked),
        f"{_with_ci(val_at, 'precision', 'precision_interval')} ({val_at['boxes']} boxes)",
        _with_ci(at, "precision", "precision_interval"),
        _with_ci(at, "recall"),
        _cell(at.get("afp")),
        str(at["boxes"]),
    ]


def point_kind_note(picked: Mapping[str, Any]) -> str:
    """`` (best achievable: >= 0.31 in 95%)`` after an operating point below the precision target."""
    if picked.get("operating_point_kind") != "best achievable":
        return ""
    return f" (best achievable, below the target: >= {_cell(picked.get('operating_point_precision'))} in 95%)"


def evaluate_command(run: RunFolder) -> str:
    """The command that writes the run's evaluation.json and tuning.json again."""
    return f"run `cxr-miner evaluate --workdir {run.directory.parent.parent} --run {run.name}` to make it again"


def read_tuning(run: RunFolder) -> dict[str, Any] | None:
    """The run's tuning.json, or None when evaluate had no boxed image to choose on."""
    return read_json(run.tuning_json, evaluate_command(run)) if run.tuning_json.exists() else None


def read_evaluation(run: RunFolder) -> dict[str, Any]:
    """The run's evaluation.json (FileNotFoundError before evaluate has run)."""
    return read_json(run.evaluation_json, evaluate_command(run))


def evaluation_inputs(work: Path, run: RunFolder, settings: Mapping[str, Any]) -> dict[str, Any]:
    """What an evaluation's figures depend on (sha256s): the run's trained checkpoints, the ground-truth
    boxes, the index (its patients split the boxed images) and the shards it scored, and its settings
    and the code. evaluation.json records them as ``inputs``."""
    models = {
        p.name: file_sha256(p) for p in sorted(run.directory.glob("*.safetensors")) if not p.stem.endswith("-last")
    }
    files = {name: file_sha256(work / name) for name in (GT_BOXES_FILE, INDEX_FILE) if (work / name).exists()}
    # the reviewers' boxes and rejections, not the store's every verdict
    reviewed = {"truth": read_reviewed_truth(work), "rejected": read_rejections(work)}
    if any(reviewed.values()):
        files[REVIEWS_FILE] = hashlib.sha256(json_text(reviewed).encode()).hexdigest()
    manifest = (
        work / SHARD_DIR / MANIFEST
    )  # the shards' own digests: a rerun of preprocess rewrites the manifest's time
    shards = (
        {s["name"]: s["sha256"] for s in read_json(manifest, "run preprocess again")["shards"]}
        if manifest.exists()
        else {}
    )
    return json.loads(
        json.dumps(
            {
                "models": models,
                "files": files,
                "shards": shards,
                "settings": dict(settings),
                "code_version": code_version(),
            }
        )
    )


def evaluation_current(run: RunFolder, inputs: Mapping[str, Any]) -> bool:
    """Whether the run's evaluation was made from ``inputs`` and its files are still as evaluate wrote
    them (a damaged, edited or missing one is made again)."""
    try:
        report = read_evaluation(run)
    except (OSError, InputError):
        return False
    return (
        report.get("inputs") == inputs
        and report.get("tuning_sha256", False) == tuning_identity(run.tuning_json)
        and run.evaluation_md.exists()
    )


class TuningChanged(UserError, ValueError):
    """The run's tuning.json no longer says what the harvest applied (it was evaluated again)."""


def harvested_choices(tuning: dict[str, Any] | None, choices: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """finding -> the tuning's entry (rule, calibration, operating point, box-val and box-test
    figures) of what the harvest applied to it (``choices``: the harvest key's, finding ->
    {variant, rule, calibration, operating_point}); findings boxed untuned are left out.
    Raises TuningChanged when the tuning no longer matches the harvest."""
    picked = {}
    tuned = (tuning or {}).get("findings", {})
    for finding, choice in choices.items():
        if finding == "default" or choice.get("calibration") is None:
            continue
        entry = tuned.get(finding, {}).get("candidates", {}).get(choice["variant"])
        same = (
            entry is not None
            and entry["rule"] == choice["rule"]
            and entry["operating_point"] == choice["operating_point"]
            and entry["calibration"] == choice["calibration"]
            and entry.get("box_size") == choice.get("box_size")
            and entry.get("rank_order", "confidence") == choice.get("order", "confidence")
        )
        if not same:
            raise TuningChanged(
                f"{finding}: the run's tuning.json no longer matches the harvest (evaluated again?); "
                "harvest again before releasing"
            )
        candidates = tuned[finding]["candidates"]
        alternatives = {
            v: {
                "rule": c["rule"],
                "box_size": c.get("box_size"),
                **{half: {k: c[half][k] for k in ("pairs", "acc", "acc_rank1")} for half in ("box_val", "box_test")},
            }
            for v, c in candidates.items()
        }
        found = tuned[finding]
        picked[finding] = {
            "method": choice["variant"],
            **entry,
            "alternatives": alternatives,
            "choice": found.get("choice"),
            "baseline": found.get("baseline"),
        }
    return picked


def write_evaluation(
    run: RunFolder, report: dict[str, Any], markdown: str, tuning: dict[str, Any] | None = None
) -> None:
    """evaluation.json (the report), evaluation.md (a title and the tables) and tuning.json (what
    was chosen on box-val; removed when there is nothing to choose on, so no stale choice stays)."""
    if tuning is None:
        run.tuning_json.unlink(missing_ok=True)
    else:
        write_json(run.tuning_json, tuning)
    report = {**report, "tuning_sha256": tuning_identity(run.tuning_json)}
    write_json(run.evaluation_json, report)
    run.evaluation_md.write_text(
        f"# Localisation, run {run.name}: {report['split']}, {report['images']} boxed images "
        f"(box-val: {report['box_val']['images']}, kept for choosing)\n\n{markdown}\n"
    )


def fold_summary(per_fold: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-fold Acc/AFP tables (finding -> {images, iou/ior: {T: {acc, afp}}}; empty: a fold without
    boxed images) -> {folds, per_fold, mean, sd}: mean and sample standard deviation over the folds
    that scored the finding (sd NaN with fewer than two), same shape as one fold's table."""
    scored = [table for table in per_fold if table]
    mean: dict[str, Any] = {}
    sd: dict[str, Any] = {}
    for finding in scored[0] if scored else {}:
        rows = [t[finding] for t in scored if t[finding]["images"]]
        mean[finding] = {"images": sum(r["images"] for r in rows)}
        sd[finding] = {"images": len(rows)}
        for metric in ("iou", "ior"):
            mean[finding][metric], sd[finding][metric] = {}, {}
            for threshold in scored[0][finding][metric]:
                for target, reduce in ((mean, _mean), (sd, _sd)):
                    target[finding][metric][threshold] = {
                        k: reduce([r[metric][threshold][k] for r in rows]) for k in ("acc", "afp")
                    }
    return {"folds": len(per_fold), "per_fold": per_fold, "mean": mean, "sd": sd}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _sd(values: list[float]) -> float:
    if len(values) < 2:
        return math.nan
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def folds_markdown(summary: dict[str, Any]) -> str:
    """Rows: metric x T; columns: the boxed findings; cells "Acc mean ± sd" over the folds."""
    title = (
        f"## MIL, {summary['folds']}-fold cross-validation: Acc, mean ± sd over the folds (each fold's model "
        "scored on the boxed images it did not learn from)"
    )
    mean, sd = summary["mean"], summary["sd"]
    if not mean:
        return f"{title}\n\nNo boxed image was scored."
    header = ["T", *(SHORT[f] for f in BOXED_FINDINGS)]
    rows = []
    for metric in ("iou", "ior"):
        for t in mean[BOXED_FINDINGS[0]][metric]:
            cells = []
            for f in BOXED_FINDINGS:
                m, s = mean[f][metric][t]["acc"], sd[f][metric][t]["acc"]
                cells.append(MISSING if math.isnan(m) else f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}")
            rows.append([f"{metric.upper()} {t}", *cells])
    images = ["boxed images", *(str(mean[f]["images"]) for f in BOXED_FINDINGS)]
    return f"{title}\n\n" + markdown_table(header, [images, *rows])


def auc_markdown(aucs: dict[str, dict[str, float]], forgetting: Mapping[str, Any] | None = None) -> str:
    """Rows: the 14 findings and their mean; columns: the run's checkpoints; cells: validation ROC
    AUC (an AM step's with its change from step 1's); then each finding an AM step forgot
    (miner.forgetting: its AUC more than the tolerance below step 1's), or that none was."""
    title = "## Validation ROC AUC of each model kept (the val split; MIL: Eq. 2's image score)"
    if not aucs:
        return f"{title}\n\nNo model."
    forgetting = forgetting or {}
    steps = forgetting.get("steps", {})
    findings = list(next(iter(aucs.values())))

    def cell(name: str, finding: str) -> str:
        value = aucs[name][finding]
        if math.isnan(value):
            return MISSING
        change = steps.get(name, {}).get("changes", {}).get(finding, {}).get("change", math.nan)
        return f"{value:.3f}" + ("" if math.isnan(change) else f" ({change:+.3f})")

    rows = [[f, *(cell(name, f) for name in aucs)] for f in findings]
    means = [_mean([v for v in a.values() if not math.isnan(v)]) for a in aucs.values()]
    table = markdown_table(["finding", *aucs], [*rows, ["mean", *(f"{m:.3f}" for m in means)]])
    if not steps:
        return f"{title}\n\n{table}"
    lines = forgetting["warnings"]
    verdict = (
        (
            "**Attention mining forgot** (validation AUC more than "
            f"{forgetting['tolerance']} below step 1's):\n\n" + "\n".join(f"- {line}" for line in lines)
        )
        if lines
        else f"No AM step lowers a finding's validation AUC by more than {forgetting['tolerance']} from step 1's."
    )
    return f"{title}\n\n{table}\n\n{verdict}"


def acc_tables(
    evaluation: dict[str, Any], methods: Sequence[tuple[str, str]], choices: dict[str, Any]
) -> dict[str, dict[str, dict[float, dict[str, float]]]]:
    """finding -> {column: {T: {acc, afp}}} at T(IoU) on box-test: the ``methods`` the evaluation
    scored (by the paper's rule; ``methods``: (label, variant) in the report's order), and
    ``released``: per finding, the variant and box rule the
    harvest applied (``choices``, the harvest key's), where the evaluation scored that rule."""
    columns: dict[str, str] = {}
    for label, variant in methods:
        if variant in evaluation["results"]:
            columns.setdefault(label, variant)
    tables = {
        f: {
            label: {float(t): cell for t, cell in evaluation["results"][key][f]["iou"].items()}
            for label, key in columns.items()
        }
        for f in FINDINGS
    }
    for finding in FINDINGS:
        choice = choices.get(finding, choices.get("default"))
        scored = (
            evaluation.get("box_rules", {}).get(choice["variant"], {}).get(choice["rule"], {}).get(finding)
            if choice
            else None
        )
        if scored:
            tables[finding]["released"] = {float(t): cell for t, cell in scored["iou"].items()}
    return tables


def operating_points(tuned: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's record of each calibrated finding's operating point and its figures."""

    def at(half: dict[str, Any]) -> dict[str, Any]:
        return {"pairs": half["pairs"], **half["at_operating_point"]}

    return {
        f: {
            "method": t["method"],
            "box_rule": t["rule"],
            "box_size": t.get("box_size"),
            "confidence_at_least": t["operating_point"],
            # target: box-val's precision reaches the target there; best achievable: it does not, and
            # "box_val_precision_at_least" says what it reaches (a tuning of before these: target or None)
            "kind": t.get("operating_point_kind", "target" if t["operating_point"] is not None else None),
            "box_val_precision_at_least": t.get("operating_point_precision"),
            "note": t.get("operating_point_note"),
            "box_val": at(t["box_val"]),
            "box_test": {
                **at(t["box_test"]),
                "ece": t["box_test"]["reliability"]["ece"],
                "ece_ci": t["box_test"]["reliability"].get("ece_ci"),
            },
        }
        for f, t in tuned.items()
    }


def forgetting_fact(evaluation: dict[str, Any]) -> dict[str, str]:
    """The report's line on attention mining's forgetting (miner.forgetting), for a run with AM steps."""
    forgetting = evaluation.get("forgetting") or {}
    if not forgetting.get("steps"):
        return {}
    warnings = forgetting["warnings"]
    return {
        "attention mining forgot": "; ".join(warnings)
        if warnings
        else f"nothing: no AM step lowers a finding's validation AUC by more than {forgetting['tolerance']}"
    }


def ground_truth_markdown(sources: Mapping[str, Mapping[str, int]]) -> str:
    """Per finding with ground truth, its boxed images by source: NIH's BBox_List_2017.csv and the
    reviewers' accepted and redrawn boxes (cxr-miner review), the images whose boxes reviewers only
    rejected (negatives), with what the reviewed figures mean."""
    rows = [[f, n.get("nih", 0), n.get("review", 0), n.get("rejected", 0)] for f in FINDINGS if (n := sources.get(f))]
    return (
        "## Ground truth: boxed images per finding, by source (review: boxes reviewers accepted or redrew)\n\n"
        + markdown_table(["finding", "nih", "review", "rejected only"], rows)
        + "\n\nA reviewed image's truth is the boxes reviewers accepted or redrew among those a release proposed: "
        "its pairs are those where the release found something right, so a finding boxed by review alone reads "
        "higher here than on images boxed independently. An image whose boxes of a finding reviewers only "
        "rejected ('rejected only') has no truth to score Acc on: its boxes that are a rejected one "
        f"(IoU >= {REJECT_MATCH_IOU}) count as wrong in calibration, precision and ECE, and nowhere else."
    )


def evaluation_document(
    tuning: dict[str, Any] | None,
    cross_validation: dict[str, Any] | None,
    by_half: dict[str, dict[str, Any]] | None,
    aucs: dict[str, dict[str, float]],
    forgetting: Mapping[str, Any],
    sources: Mapping[str, Mapping[str, int]] | None = None,
) -> str:
    """evaluation.md: where the ground truth comes from (``sources``: finding -> images boxed by
    NIH and by reviewers; shown once reviewers have boxed some), the choices tuned on box-val, the
    K-fold figures, box-test's Acc/AFP and the box rules on both halves (``by_half``: None without
    a scored method), and the validation AUCs."""
    reviewed = any(n.get("review") or n.get("rejected") for n in (sources or {}).values())
    return "\n\n".join(
        [
            *([ground_truth_markdown(sources or {})] if reviewed else []),
            *([tuning_markdown(tuning)] if tuning else []),
            *([folds_markdown(cross_validation)] if cross_validation is not None else []),
            *([evaluation_markdown(by_half[BOX_TEST], BOX_TEST), box_rules_markdown(by_half)] if by_half else []),
            auc_markdown(aucs, forgetting),
        ]
    )
