"""Flow ``evaluate``: localisation of a trained run on the images with ground-truth boxes.

For every boxed image and each finding it has a box of, every registered method (and each
of its variants: the CAM baseline, AM over steps 1..t for every 2 <= t <= T) that the run has
the checkpoints for boxes it, and the boxes are scored with Acc and AFP at the T(IoU) and
T(IoR) lists, the heatmaps with MaxBoxAccV2 (miner.metrics). The boxed images are split by
patient into box-val (to choose from) and box-test (to report on; storage.stages.box_splits):
``evaluation.json`` holds box-test's figures at the top level and box-val's under ``box_val``;
``evaluation.md`` shows box-test's. Both go to ``W/models/<run>/``, with ``tuning.json``: per
finding, the method variant and box rule chosen on box-val, the box confidence calibrated there
and its operating point, each with its box-test figures (miner.tuning); harvest applies it.

A MIL run with ``box_folds`` K (Li et al. 2018, section 4.2) has no model learnt from box-val alone:
each fold's model is scored by its own rule on the fold it did not learn from, and ``folds`` in
``evaluation.json`` holds the per-fold tables with their mean and standard deviation.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cxr_miner.flows.engine.checkpoints import load_models, read_config
from cxr_miner.flows.engine.mining import HalfScores, evaluate_boxes
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import check_evaluate
from cxr_miner.flows.progress import progress_bar
from cxr_miner.flows.tasks import artifact_key
from cxr_miner.miner.calibration import PRECISION_TARGET
from cxr_miner.miner.forgetting import forgetting_report
from cxr_miner.miner.methods import create_method, method_names
from cxr_miner.miner.methods.mil import PatchMil
from cxr_miner.miner.methods.tuned import providers_for
from cxr_miner.miner.training import TrainConfig, pick_device
from cxr_miner.miner.tuning import box_size_priors, chosen_entries, released_figures, tune
from cxr_miner.storage.stages.batches import split_row_groups
from cxr_miner.storage.stages.box_splits import BOX_SPLITS, BOX_TEST, BOX_VAL, BOX_VAL_FRACTION, box_folds, box_splits
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.evaluation import (
    auc_markdown,
    box_rules_markdown,
    evaluation_current,
    evaluation_inputs,
    evaluation_markdown,
    fold_summary,
    folds_markdown,
    tuning_markdown,
    write_evaluation,
)
from cxr_miner.storage.stages.index import GT_BOXES_FILE, INDEX_FILE, SPLITS, image_sizes, read_gt_boxes, read_index
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS


def half_report(scores: dict[str, HalfScores]) -> dict[str, Any]:
    """One half's figures: images, pairs per finding, Acc/AFP and MaxBoxAccV2 per method key."""
    if not scores:
        return {"images": 0, "evaluated": {f: 0 for f in BOXED_FINDINGS}, "results": {}, "max_box_acc_v2": {}, "box_rules": {}}
    first = next(iter(scores.values()))
    return {
        "images": len(first.images),
        "evaluated": {f: first.boxes.images(f) for f in BOXED_FINDINGS},
        "results": {key: s.boxes.compute() for key, s in scores.items()},
        "max_box_acc_v2": {key: s.heatmaps.compute() for key, s in scores.items() if s.heatmaps.pairs},
        "box_rules": {key: {rule: e.compute() for rule, e in s.rules.items()} for key, s in scores.items() if s.heatmaps.pairs},
    }


RELEASED = "released"


def recorded_intervals(folder: RunFolder, aucs: dict[str, dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """AM step -> finding -> the interval of its AUC change that training recorded (metrics.json, the
    step's last epoch: ``auc_change_interval``); steps trained before it was recorded have none."""
    metrics = folder.metrics() if folder.metrics_file.exists() else {}
    return {name: rows[-1]["auc_change_interval"] for name, rows in metrics.items()
            if name in aucs and rows and rows[-1].get("auc_change_interval")}


def validation_aucs(folder: RunFolder, checkpoints: list[str]) -> dict[str, dict[str, float]]:
    """checkpoint -> finding -> the validation ROC AUC of the model kept in it (its record's epoch)."""
    return {name: read_checkpoint_record(folder.checkpoint(name))["metrics"]["auc"] for name in dict.fromkeys(checkpoints)}


def check_learnt_halves(methods: list[Any], box_val_fraction: float) -> None:
    """The MIL model ``mil`` learnt from box-val's boxes at the default split: scored at another,
    box-test would hold images whose boxes it learnt from."""
    if box_val_fraction != BOX_VAL_FRACTION and any(m.network == "patch" for m in methods):
        raise ValueError(f"--box-val-fraction {box_val_fraction}: the run's MIL model learnt from the boxes of box-val at "
                         f"{BOX_VAL_FRACTION}, so box-test at another split would hold images it learnt from; "
                         f"evaluate at {BOX_VAL_FRACTION}, or train MIL with --folds")


def fold_models(folder: RunFolder, config: TrainConfig) -> list[PatchMil]:
    """The MIL model of each fold of a K-fold run, when all K are trained (else none)."""
    if config.box_folds < 2:
        return []
    models = [PatchMil(config, fold) for fold in range(1, config.box_folds + 1)]
    return [] if any(folder.missing(m.checkpoints()) for m in models) else models


def evaluate_folds(work: Path, folder: RunFolder, methods: list[PatchMil], truth: dict[str, Any], patients: dict[str, Any],
                   batch_size: int, device: Any) -> dict[str, Any]:
    """Li et al. 2018, section 4.2: each fold's model scored on the boxed images of the fold it did
    not learn from, by its own rule; the per-fold Acc/AFP tables and their mean and spread."""
    assignment = box_folds(patients, sorted(truth), len(methods))
    per_fold = []
    for method in methods:
        held_out = {i for i, fold in assignment.items() if fold == method.fold - 1}
        groups = split_row_groups(work, SPLITS, only_boxed=True, images=held_out)
        models = load_models(folder, method.checkpoints(), device)
        with progress_bar(f"evaluate {method.label}", sum(g.rows for g in groups)) as advance:
            scores = evaluate_boxes(method, models, groups, {i: truth[i] for i in held_out}, dict.fromkeys(held_out, BOX_TEST),
                                    batch_size, advance)
        per_fold.append(scores[method.key][BOX_TEST].boxes.compute() if held_out else {})
    return fold_summary(per_fold)


def add_released(half: dict[str, Any], tuning: dict[str, Any]) -> None:
    """``results["released"]``: per finding, the Acc/AFP of the variant and box rule chosen for it
    (what ``harvest --method auto`` ships), taken from the candidate rules' scores."""
    if not half["box_rules"]:
        return
    rows = {}
    for finding, row in next(iter(half["results"].values())).items():
        choice = tuning["findings"].get(finding)
        rows[finding] = half["box_rules"][choice["method"]][choice["candidates"][choice["method"]]["rule"]][finding] if choice else \
            {**row, "iou": {t: {"acc": math.nan, "afp": math.nan} for t in row["iou"]}, "ior": {t: {"acc": math.nan, "afp": math.nan} for t in row["ior"]}}
    half["results"][RELEASED] = rows


def is_evaluated(workdir: str, run: str, box_val_fraction: float = BOX_VAL_FRACTION, precision_target: float = PRECISION_TARGET) -> bool:
    """Whether the run's evaluation is what evaluate would write now: the same checkpoints, boxes,
    index, shards, settings and code (storage.stages.evaluation.evaluation_inputs), its files intact."""
    folder = RunFolder.of(workdir, run)
    return evaluation_current(folder, evaluation_inputs(Path(workdir), folder, _settings(box_val_fraction, precision_target)))


def _settings(box_val_fraction: float, precision_target: float) -> dict[str, float]:
    """The settings an evaluation's figures depend on (its inputs record them)."""
    return {"box_val_fraction": box_val_fraction, "precision_target": precision_target}


@flow(name="evaluate", log_prints=True)
@writes_into("workdir")
def evaluate(workdir: str, run: str, batch_size: int = 16, box_val_fraction: float = BOX_VAL_FRACTION,
             precision_target: float = PRECISION_TARGET) -> dict[str, Any]:
    """Acc/AFP and MaxBoxAccV2 of every method the run has checkpoints for, on each half of the
    boxed images, and the choices tuned on box-val (module doc); the figures reported are box-test's."""
    check_evaluate(box_val_fraction, precision_target)
    logger = get_run_logger()
    work, folder = Path(workdir), RunFolder.of(workdir, run)
    inputs = evaluation_inputs(work, folder, _settings(box_val_fraction, precision_target))
    config = read_config(folder)
    methods = [m for name in method_names() for m in create_method(name, config).variants() if not folder.missing(m.checkpoints())]
    folds = fold_models(folder, config)
    check_learnt_halves(methods, box_val_fraction)
    if not methods and not folds:
        raise FileNotFoundError(f"{folder.directory}: no trained model (train the run first)")
    device = pick_device(config.device)
    truth = read_gt_boxes(work / GT_BOXES_FILE)
    index = read_index(work / INDEX_FILE)
    patients = dict(zip(*index.select(["image_id", "patient_id"]).to_pydict().values()))
    halves = box_splits(patients, truth, box_val_fraction)
    box_sizes = box_size_priors(truth, [i for i, half in halves.items() if half == BOX_VAL], image_sizes(index))
    groups = split_row_groups(work, SPLITS, only_boxed=True)
    images = sum(g.rows for g in groups)
    providers = providers_for({m.key for m in methods}, config) if methods else []  # AM's one pass gives the CAM baseline's maps too
    scores: dict[str, Any] = {}
    for provider in providers:
        models = load_models(folder, provider.checkpoints(), device)
        with progress_bar(f"evaluate {run} ({provider.label})", images) as advance:
            scores.update(evaluate_boxes(provider, models, groups, truth, halves, batch_size, advance, box_sizes))
    scores = {m.key: scores[m.key] for m in methods}  # in registry order: the CAM baseline first
    by_half = {half: half_report({key: s[half] for key, s in scores.items() if half in s}) for half in BOX_SPLITS}
    # in registry order: the CAM baseline (the default) first, and the simpler variant on ties
    outcomes = {half: {key: s[half].outcomes for key, s in scores.items() if half in s and s[half].heatmaps.pairs} for half in BOX_SPLITS}
    variants = [m.key for m in methods if m.key in outcomes[BOX_VAL] or m.key in outcomes[BOX_TEST]]
    tuning = tune(outcomes[BOX_VAL], outcomes[BOX_TEST], variants, BOXED_FINDINGS, precision_target, box_sizes,
                  {m.key: m.paper_rule.name for m in methods}) if variants else None
    if tuning:
        for half in by_half.values():
            add_released(half, tuning)
    cross_validation = evaluate_folds(work, folder, folds, truth, patients, batch_size, device) if folds else None
    aucs = validation_aucs(folder, [name for m in [*methods, *folds] for name in m.checkpoints()])
    forgetting = forgetting_report(aucs, intervals=recorded_intervals(folder, aucs))
    for line in forgetting["warnings"]:
        logger.warning("attention mining forgot: %s", line)
    markdown = "\n\n".join([*([tuning_markdown(tuning)] if tuning else []), *([folds_markdown(cross_validation)] if folds else []),
                             *([evaluation_markdown(by_half[BOX_TEST], BOX_TEST), box_rules_markdown(by_half)] if methods else []),
                             auc_markdown(aucs, forgetting)])
    used = {name for provider in providers for name in provider.checkpoints()}
    report = {"run": run, "steps": [t for t in range(1, config.am_steps + 1) if f"step{t}" in used],
              "split": BOX_TEST, "box_val_fraction": box_val_fraction, **by_half[BOX_TEST], "box_val": by_half[BOX_VAL],
              "released": released_figures(chosen_entries(tuning)) if tuning else None, "folds": cross_validation,
              "validation_auc": aucs, "forgetting": forgetting, "inputs": inputs}
    write_evaluation(folder, report, markdown, {**tuning, "run": run, "box_val_fraction": box_val_fraction} if tuning else None)
    create_markdown_artifact(markdown, key=artifact_key(run, "localization"),
                             description=f"Acc-AFP per finding, CAM baseline vs attention mining, run {run}")
    logger.info("evaluated %d boxed images -> %s", images, folder.evaluation_md)
    return {**report, "markdown": markdown, "path": str(folder.evaluation_md)}
