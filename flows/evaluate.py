"""Flow ``evaluate``: localisation of a trained run on the images with ground-truth boxes.

For every boxed image and each finding it has a box of, every registered method (and each
of its variants: the CAM baseline, AM over steps 1..t for every 2 <= t <= T) that the run has
the checkpoints for boxes it, and the boxes are scored with Acc and AFP at the T(IoU) and
T(IoR) lists (miner.metrics). Writes ``W/models/<run>/evaluation.json`` and ``evaluation.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cxr_miner.flows.engine.checkpoints import load_models, read_config
from cxr_miner.flows.engine.mining import evaluate_boxes
from cxr_miner.flows.folders import writes_into
from cxr_miner.flows.progress import progress_bar
from cxr_miner.miner.methods import create_method, method_names
from cxr_miner.miner.training import pick_device
from cxr_miner.storage.stages.batches import split_row_groups
from cxr_miner.storage.stages.evaluation import acc_afp_table, write_evaluation
from cxr_miner.storage.stages.index import GT_BOXES_FILE, SPLITS, read_gt_boxes
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS


@flow(name="evaluate", log_prints=True)
@writes_into("workdir")
def evaluate(workdir: str, run: str, batch_size: int = 16) -> dict[str, Any]:
    """Acc/AFP of every method the run has checkpoints for, on the boxed images (module doc)."""
    logger = get_run_logger()
    work, folder = Path(workdir), RunFolder.of(workdir, run)
    config = read_config(folder)
    methods = [m for name in method_names() for m in create_method(name, config).variants() if not folder.missing(m.checkpoints())]
    if not methods:
        raise FileNotFoundError(f"{folder.directory}: no trained step 1 (train the run first)")
    device = pick_device(config.device)
    names = tuple(dict.fromkeys(n for m in methods for n in m.checkpoints()))
    models = dict(zip(names, load_models(folder, names, device)))
    truth = read_gt_boxes(work / GT_BOXES_FILE)
    groups = split_row_groups(work, SPLITS, only_boxed=True)
    images = sum(g.rows for g in groups)
    evaluators = {}
    with progress_bar(f"evaluate {run}", images * len(methods)) as advance:
        for method in methods:
            evaluators[method.key] = evaluate_boxes(method, [models[n] for n in method.checkpoints()], groups, truth, batch_size, advance)
    results = {key: evaluator.compute() for key, evaluator in evaluators.items()}
    first = next(iter(evaluators.values()))
    markdown = "\n\n".join(acc_afp_table(results, first.thresholds[metric], metric) for metric in ("iou", "ior"))
    report = {"run": run, "steps": [t for t in range(1, config.am_steps + 1) if f"step{t}" in models], "images": images,
              "evaluated": {f: first.images(f) for f in BOXED_FINDINGS}, "results": results}
    write_evaluation(folder, report, markdown)
    create_markdown_artifact(markdown, key=f"localization-{run.lower()}".replace("_", "-"),
                             description=f"Acc-AFP per finding, CAM baseline vs attention mining, run {run}")
    logger.info("evaluated %d boxed images -> %s", images, folder.evaluation_md)
    return {**report, "markdown": markdown, "path": str(folder.evaluation_md)}
