"""Flow ``evaluate``: localisation of a trained run on the images with ground-truth boxes.

For every boxed image and each finding it has a box of, three ranked boxes from the CAM
baseline (AM step 1) and from the final heatmap of AM (Eq. 8) over steps 1..t for every
t <= T, scored with Acc and AFP at the T(IoU) and T(IoR) lists (miner.metrics). Writes
``W/models/<run>/evaluation.json`` and ``evaluation.md`` (the papers' table layout).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from cxr_miner.flows.engine.checkpoints import load_model
from cxr_miner.flows.progress import progress_bar
from cxr_miner.flows.train import read_config, run_dir, shard_paths, step_file
from cxr_miner.miner.localize import localize, step_heatmaps
from cxr_miner.miner.metrics import LocalizationEvaluator
from cxr_miner.miner.training import autocast, pick_device, prepare_images
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.batches import batch_stream, list_row_groups
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS
from cxr_miner.storage.stages.index import GT_BOXES_FILE, SPLITS, read_gt_boxes
from cxr_miner.storage.vocab.letterbox import Letterbox

SHORT = {"Atelectasis": "AT", "Cardiomegaly": "CM", "Effusion": "PE", "Infiltration": "Infiltrat.", "Mass": "Mass",
         "Nodule": "Nodule", "Pneumonia": "PNA", "Pneumothorax": "PTx"}


def method_names(steps: int) -> list[str]:
    return ["cam"] + [f"am-t{t}" for t in range(2, steps + 1)]


def markdown_table(results: dict[str, dict], thresholds: tuple[float, ...], metric: str = "iou") -> str:
    """Rows: T x method; columns: the boxed findings; cells "Acc-AFP" (Cai et al., Table 5)."""
    header = f"| T({metric.upper()}) | method | " + " | ".join(SHORT[f] for f in BOXED_FINDINGS) + " |"
    lines = [header, "|" + "---|" * (len(BOXED_FINDINGS) + 2)]
    for t in thresholds:
        for method, table in results.items():
            cells = []
            for f in BOXED_FINDINGS:
                cell = table[f][metric][t]
                cells.append("-" if math.isnan(cell["acc"]) else f"{cell['acc']:.2f}-{cell['afp']:.2f}")
            lines.append(f"| {t} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@flow(name="evaluate", log_prints=True)
def evaluate(workdir: str, run: str, batch_size: int = 16) -> dict[str, Any]:
    """Acc/AFP of the CAM baseline and of AM (t = 2..T) on the boxed images (see module doc)."""
    logger = get_run_logger()
    work, directory = Path(workdir), run_dir(workdir, run)
    config = read_config(directory)
    steps = [s for s in range(1, config.am_steps + 1) if step_file(directory, s).exists()]
    if not steps or steps != list(range(1, len(steps) + 1)):
        raise FileNotFoundError(f"{directory}: no trained step 1 (train the run first)")
    device = pick_device(config.device)
    models = [load_model(step_file(directory, s), device)[0] for s in steps]
    truth = read_gt_boxes(work / GT_BOXES_FILE)
    groups = list_row_groups(shard_paths(work, SPLITS), only_boxed=True)
    names = method_names(len(steps))
    evaluators = {name: LocalizationEvaluator() for name in names}
    images = 0
    with progress_bar(f"evaluate {run}", sum(g.rows for g in groups)) as advance:
        for batch in batch_stream(groups, batch_size):
            x = prepare_images(torch.from_numpy(batch.images), config.input_size, device)
            with torch.no_grad(), autocast(device, config.precision):
                heatmaps, _ = step_heatmaps(models, x)
            ids = batch.meta["image_id"]
            wanted = np.array([[f in truth.get(i, {}) for f in FINDINGS] for i in ids], dtype=bool)
            letterboxes = [Letterbox.from_record({k: v[i] for k, v in batch.meta.items()}) for i in range(len(batch))]
            for name, maps in zip(names, heatmaps):
                found = localize(maps, wanted, config.input_size, letterboxes)
                for i, image_id in enumerate(ids):
                    for c, loc in found[i].items():
                        evaluators[name].accumulate(FINDINGS[c], loc.boxes, truth[image_id][FINDINGS[c]])
            images += len(batch)
            advance(len(batch))
    results = {name: evaluator.compute() for name, evaluator in evaluators.items()}
    thresholds = evaluators["cam"].thresholds
    markdown = "\n\n".join(markdown_table(results, thresholds[metric], metric) for metric in ("iou", "ior"))
    report = {"run": run, "steps": steps, "images": images,
              "evaluated": {f: evaluators["cam"].images(f) for f in BOXED_FINDINGS}, "results": results}
    write_json(directory / "evaluation.json", report)
    (directory / "evaluation.md").write_text(f"# Localisation, run {run} ({images} boxed images)\n\n{markdown}\n")
    create_markdown_artifact(markdown, key=f"localization-{run.lower()}".replace("_", "-"),
                             description=f"Acc-AFP per finding, CAM baseline vs attention mining, run {run}")
    logger.info("evaluated %d boxed images -> %s", images, directory / "evaluation.md")
    return {**report, "markdown": markdown, "path": str(directory / "evaluation.md")}
