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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cxr_miner.flows.engine.checkpoints import load_models, read_config
from cxr_miner.flows.engine.mining import evaluate_boxes
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.options import check_evaluate
from cxr_miner.flows.progress import progress_bar
from cxr_miner.flows.tasks import artifact_key
from cxr_miner.miner.calibration import PRECISION_TARGET
from cxr_miner.miner.evaluation import add_released, half_report
from cxr_miner.miner.forgetting import forgetting_report
from cxr_miner.miner.methods import LocalizationMethod, create_method, method_names
from cxr_miner.miner.methods.mil import PatchMil
from cxr_miner.miner.methods.tuned import providers_for
from cxr_miner.miner.training import TrainConfig, pick_device
from cxr_miner.miner.tuning import box_size_priors, chosen_entries, released_figures, tune
from cxr_miner.storage.releases.reviews import count_negatives, read_ground_truth, read_negatives
from cxr_miner.storage.stages.batches import RowGroup, split_row_groups
from cxr_miner.storage.stages.box_splits import BOX_SPLITS, BOX_TEST, BOX_VAL, BOX_VAL_FRACTION, box_folds, box_splits
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.evaluation import (
    evaluation_current,
    evaluation_document,
    evaluation_inputs,
    fold_summary,
    write_evaluation,
)
from cxr_miner.storage.stages.index import INDEX_FILE, SPLITS, image_sizes, read_index
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.errors import MissingInput, SettingError
from cxr_miner.storage.vocab.findings import reported_findings


def recorded_intervals(folder: RunFolder, aucs: dict[str, dict[str, float]]) -> dict[str, dict[str, list[float]]]:
    """AM step -> finding -> the interval of its AUC change that training recorded (metrics.json, the
    step's last epoch: ``auc_change_interval``); steps trained before it was recorded have none."""
    metrics = folder.metrics() if folder.metrics_file.exists() else {}
    return {
        name: rows[-1]["auc_change_interval"]
        for name, rows in metrics.items()
        if name in aucs and rows and rows[-1].get("auc_change_interval")
    }


def recorded_validation_aucs(folder: RunFolder, checkpoints: list[str]) -> dict[str, dict[str, float]]:
    """checkpoint -> finding -> the validation ROC AUC of the model kept in it (its record's epoch)."""
    return {
        name: read_checkpoint_record(folder.checkpoint(name))["metrics"]["auc"] for name in dict.fromkeys(checkpoints)
    }


def check_learnt_halves(methods: list[Any], box_val_fraction: float) -> None:
    """The MIL model ``mil`` learnt from box-val's boxes at the default split: scored at another,
    box-test would hold images whose boxes it learnt from."""
    if box_val_fraction != BOX_VAL_FRACTION and any(m.learns_from_boxes for m in methods):
        raise SettingError(
            f"--box-val-fraction {box_val_fraction}: the run's MIL model learnt from the boxes of box-val at "
            f"{BOX_VAL_FRACTION}, so box-test at another split would hold images it learnt from; "
            f"evaluate at {BOX_VAL_FRACTION}, or train MIL with --folds"
        )


def fold_models(folder: RunFolder, config: TrainConfig) -> list[PatchMil]:
    """The MIL model of each fold of a K-fold run, when all K are trained (else none)."""
    if config.box_folds < 2:
        return []
    models = [PatchMil(config, fold) for fold in range(1, config.box_folds + 1)]
    return [] if any(folder.missing(m.checkpoints()) for m in models) else models


def evaluate_folds(
    work: Path,
    folder: RunFolder,
    methods: list[PatchMil],
    truth: dict[str, Any],
    patients: dict[str, Any],
    batch_size: int,
    device: Any,
) -> dict[str, Any]:
    """Li et al. 2018, section 4.2: each fold's model scored on the boxed images of the fold it did
    not learn from, by its own rule; the per-fold Acc/AFP tables and their mean and spread."""
    assignment = box_folds(patients, sorted(truth), len(methods))
    per_fold = []
    for method in methods:
        held_out = {i for i, fold in assignment.items() if fold + 1 == method.fold}  # folds 0-based, methods' 1-based
        groups = split_row_groups(work, SPLITS, only_boxed=True, images=held_out)
        models = load_models(folder, method.checkpoints(), device)
        with progress_bar(f"evaluate {method.label}", sum(g.rows for g in groups)) as advance:
            scores = evaluate_boxes(
                method,
                models,
                groups,
                {i: truth[i] for i in held_out},
                dict.fromkeys(held_out, BOX_TEST),
                batch_size,
                advance,
            )
        per_fold.append(scores[method.variant][BOX_TEST].boxes.compute() if held_out else {})
    return fold_summary(per_fold)


def is_evaluated(
    workdir: str, run: str, box_val_fraction: float = BOX_VAL_FRACTION, precision_target: float = PRECISION_TARGET
) -> bool:
    """Whether the run's evaluation is what evaluate would write now: the same checkpoints, boxes,
    index, shards, settings and code (storage.stages.evaluation.evaluation_inputs), its files intact."""
    folder = RunFolder.of(workdir, run)
    return evaluation_current(
        folder, evaluation_inputs(Path(workdir), folder, _settings(box_val_fraction, precision_target))
    )


def _settings(box_val_fraction: float, precision_target: float) -> dict[str, float]:
    """The settings an evaluation's figures depend on (its inputs record them)."""
    return {"box_val_fraction": box_val_fraction, "precision_target": precision_target}


@dataclass(frozen=True)
class BoxedImages:
    """The boxed images evaluate scores: their boxes, patients, halves (box-val, box-test), each
    finding's box-size prior (from box-val), and their shard row groups."""

    truth: dict[str, Any]
    patients: dict[str, Any]
    halves: dict[str, str]
    box_sizes: dict[str, tuple[float, float]]
    groups: list[RowGroup]
    # finding -> images boxed by each source ("nih", "review"), and with rejected boxes alone ("rejected")
    sources: dict[str, dict[str, int]]
    negatives: dict[str, dict[str, list[list[float]]]]  # image id -> finding -> rejected boxes, pairs without truth

    @classmethod
    def of(cls, work: Path, box_val_fraction: float) -> BoxedImages:
        truth, sources = read_ground_truth(work)
        negatives = read_negatives(work, truth)
        sources = count_negatives(sources, negatives)
        reviewed = any(n["review"] for n in sources.values()) or bool(negatives)
        index = read_index(work / INDEX_FILE)
        patients = dict(zip(*index.select(["image_id", "patient_id"]).to_pydict().values()))
        halves = box_splits(patients, {*truth, *negatives}, box_val_fraction)
        box_val = [i for i, half in halves.items() if half == BOX_VAL]
        sizes = box_size_priors(truth, box_val, image_sizes(index))
        # reviewed images are not marked has_box in the shards: select every reviewed image by id
        images = {*truth, *negatives} if reviewed else None
        groups = split_row_groups(work, SPLITS, only_boxed=not reviewed, images=images)
        return cls(truth, patients, halves, sizes, groups, sources, negatives)

    @property
    def findings(self) -> tuple[str, ...]:
        """The findings evaluate reports and tunes: NIH's eight, and any other with reviewed boxes."""
        return reported_findings({f: n["nih"] + n["review"] for f, n in self.sources.items()})

    @property
    def images(self) -> int:
        return sum(g.rows for g in self.groups)


def steps_scored(providers: list[LocalizationMethod], am_steps: int) -> list[int]:
    """The training steps (1..``am_steps``) whose checkpoints the ``providers`` scored."""
    used = {name for provider in providers for name in provider.checkpoints()}
    return [t for t in range(1, am_steps + 1) if f"step{t}" in used]


@flow(name="evaluate", log_prints=True)
@writes_into("workdir")
def evaluate(
    workdir: str,
    run: str,
    batch_size: int = 16,
    box_val_fraction: float = BOX_VAL_FRACTION,
    precision_target: float = PRECISION_TARGET,
) -> dict[str, Any]:
    """Every method's Acc/AFP and MaxBoxAccV2 on both halves, and the choices on box-val (module doc)."""
    check_evaluate(box_val_fraction, precision_target)
    work, folder = Path(workdir), RunFolder.of(workdir, run)
    inputs = evaluation_inputs(work, folder, _settings(box_val_fraction, precision_target))
    config = read_config(folder)
    methods, folds = models_to_score(folder, config, box_val_fraction)
    device = pick_device(config.device)
    boxed = BoxedImages.of(work, box_val_fraction)
    providers = providers_for({m.variant for m in methods}, config) if methods else []  # AM's pass gives CAM's too
    scores = score_providers(folder, run, providers, boxed, batch_size, device)
    scores = {m.variant: scores[m.variant] for m in methods}  # in registry order: the CAM baseline first
    by_half = {half: half_report({key: s[half] for key, s in scores.items() if half in s}) for half in BOX_SPLITS}
    tuning = tune_on_box_val(scores, methods, boxed, precision_target)
    if tuning:
        for half in by_half.values():
            add_released(half, tuning)
    cross_validation = (
        evaluate_folds(work, folder, folds, boxed.truth, boxed.patients, batch_size, device) if folds else None
    )
    aucs, forgetting = validation_record(folder, [name for m in [*methods, *folds] for name in m.checkpoints()])
    scored = by_half if methods else None
    markdown = evaluation_document(tuning, cross_validation, scored, aucs, forgetting, boxed.sources)
    report = {
        "run": run,
        "steps": steps_scored(providers, config.am_steps),
        "split": BOX_TEST,
        "box_val_fraction": box_val_fraction,
        **by_half[BOX_TEST],
        "box_val": by_half[BOX_VAL],
        "released": released_figures(chosen_entries(tuning)) if tuning else None,
        "folds": cross_validation,
        "ground_truth": boxed.sources,
        "validation_auc": aucs,
        "forgetting": forgetting,
        "inputs": inputs,
    }
    write_evaluation(
        folder, report, markdown, {**tuning, "run": run, "box_val_fraction": box_val_fraction} if tuning else None
    )
    create_markdown_artifact(
        markdown,
        key=artifact_key(run, "localization"),
        description=f"Acc-AFP per finding, CAM baseline vs attention mining, run {run}",
    )
    get_run_logger().info("evaluated %d boxed images -> %s", boxed.images, folder.evaluation_md)
    return {**report, "markdown": markdown, "path": str(folder.evaluation_md)}


def validation_record(folder: RunFolder, checkpoints: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The checkpoints' validation AUCs (as recorded) and what attention mining forgot of step 1's
    (miner.forgetting), each forgotten finding logged as a warning."""
    aucs = recorded_validation_aucs(folder, checkpoints)
    forgetting = forgetting_report(aucs, intervals=recorded_intervals(folder, aucs))
    for line in forgetting["warnings"]:
        get_run_logger().warning("attention mining forgot: %s", line)
    return aucs, forgetting


def models_to_score(
    folder: RunFolder, config: TrainConfig, box_val_fraction: float
) -> tuple[list[LocalizationMethod[Any]], list[PatchMil]]:
    """The run's trained variants and its K-fold MIL models; MissingInput when it has neither."""
    methods, folds = trained_methods(folder, config), fold_models(folder, config)
    check_learnt_halves(methods, box_val_fraction)
    if not methods and not folds:
        raise MissingInput(f"{folder.directory}: no trained model (train the run first)")
    return methods, folds


def trained_methods(folder: RunFolder, config: TrainConfig) -> list[LocalizationMethod[Any]]:
    """Every variant of every registered method whose checkpoints the run has, in registry order."""
    return [
        m
        for name in method_names()
        for m in create_method(name, config).variants()
        if not folder.missing(m.checkpoints())
    ]


def score_providers(
    folder: RunFolder,
    run: str,
    providers: list[LocalizationMethod[Any]],
    boxed: BoxedImages,
    batch_size: int,
    device: Any,
) -> dict[str, Any]:
    """variant -> half -> HalfScores of every variant the ``providers`` give, one pass each."""
    scores: dict[str, Any] = {}
    for provider in providers:
        models = load_models(folder, provider.checkpoints(), device)
        with progress_bar(f"evaluate {run} ({provider.label})", boxed.images) as advance:
            found = evaluate_boxes(
                provider,
                models,
                boxed.groups,
                boxed.truth,
                boxed.halves,
                batch_size,
                advance,
                boxed.box_sizes,
                boxed.negatives,
            )
        scores.update(found)
    return scores


def tune_on_box_val(
    scores: dict[str, Any], methods: list[LocalizationMethod[Any]], boxed: BoxedImages, precision_target: float
) -> dict[str, Any] | None:
    """The choices tuned on box-val (miner.tuning.tune) among the variants scored on some half;
    None when none was."""
    outcomes = {
        half: {key: s[half].outcomes for key, s in scores.items() if half in s and s[half].heatmaps.pairs}
        for half in BOX_SPLITS
    }
    variants = [m.variant for m in methods if m.variant in outcomes[BOX_VAL] or m.variant in outcomes[BOX_TEST]]
    if not variants:
        return None
    rules = {m.variant: m.paper_rule.name for m in methods}
    return tune(
        outcomes[BOX_VAL], outcomes[BOX_TEST], variants, boxed.findings, precision_target, boxed.box_sizes, rules
    )
