"""Mining whole shards with a registered method: row groups in, ranked boxes out.

Harvest (through the tuned localiser, miner.methods.tuned) and evaluate both take the heatmaps of
one pass of a provider (``LocalizationMethod.batch_variant_maps``) and box them on the network
input grid with the rules of miner.rules, so they box the same pairs the same way and cannot
drift apart. Boxes are xyxy in source pixels (see miner.localize).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from cxr_miner.miner.evaluation import MAXBOXACC_GRID, HalfScores, Pair, score_pair
from cxr_miner.miner.localize import upsample
from cxr_miner.miner.methods import BatchLocalization, LocalizationMethod, TunedLocalizer
from cxr_miner.miner.methods.registry import Select
from cxr_miner.storage.stages.batches import RowGroup, ShardBatch, batch_stream, list_row_groups
from cxr_miner.storage.stages.harvest import part_rows
from cxr_miner.storage.vocab.findings import FINDINGS, truth_pairs

# How a harvest picks the pairs to box: a batch -> its Select (step-1 logits (N, C) -> (N, C) bool).
SelectFor = Callable[[ShardBatch], Select]


def fixed_pairs(pairs: torch.Tensor) -> Select:
    """The pairs (N, C) bool given up front, whatever the classifier says."""
    return lambda logits: pairs.to(logits.device)


def labelled(batch: ShardBatch) -> Select:
    """Mining mode: every finding an image is labelled with."""
    return fixed_pairs(torch.from_numpy(batch.labels))


def scored_at_least(min_score: float) -> SelectFor:
    """Discovery mode: every finding the classifier scores at ``min_score`` or above."""
    return lambda batch: lambda logits: torch.sigmoid(logits.float()) >= min_score


def shard_rows(
    method: TunedLocalizer,
    models: Sequence[torch.nn.Module],
    shard: Path,
    select_for: SelectFor,
    batch_size: int,
    model_id: str,
    overlap: bool = False,
) -> tuple[list[dict[str, Any]], int]:
    """The harvest part rows (PART_SCHEMA) of every image of one shard, and how many images it has.

    With ``overlap``, a batch is boxed in a thread of its own while the next batch's forward
    passes run (on a GPU, the CPU boxes what the GPU made while it makes the next); the rows are
    the same, in the same order."""
    rows: list[dict[str, Any]] = []
    images = 0

    def add(batch: ShardBatch, found: BatchLocalization) -> None:
        nonlocal rows, images
        rows += part_rows(batch.meta["image_id"], found.found, found.probability, method.name, model_id)
        images += len(batch)

    batches = batch_stream(list_row_groups([shard]), batch_size)
    if not overlap:
        for batch in batches:
            add(
                batch,
                method.localize_batch(models, torch.from_numpy(batch.images), batch.letterboxes(), select_for(batch)),
            )
        return rows, images
    with ThreadPoolExecutor(1, thread_name_prefix="boxing") as boxing:
        pending: tuple[ShardBatch, Future] | None = None
        for batch in batches:
            maps = method.batch_maps(models, torch.from_numpy(batch.images), select_for(batch))
            if pending:
                add(pending[0], pending[1].result())
            pending = batch, boxing.submit(method.box_maps, maps, batch.letterboxes())
        if pending:
            add(pending[0], pending[1].result())
    return rows, images


def evaluate_boxes(
    provider: LocalizationMethod,
    models: Sequence[torch.nn.Module],
    groups: Sequence[RowGroup],
    truth: dict[str, dict[str, list[list[float]]]],
    halves: Mapping[str, str],
    batch_size: int,
    advance: Callable[[int], None] = lambda n: None,
    box_sizes: Mapping[str, tuple[float, float]] | None = None,
    rejected: Mapping[str, Mapping[str, list[list[float]]]] | None = None,
) -> dict[str, dict[str, HalfScores]]:
    """Scores of every variant ``provider`` gives in one pass (``provides()``: the CAM baseline and
    AM at each t, from one AM pass) on the boxed images of ``groups``, per variant key and half
    (``halves``: image id -> box-val | box-test): each finding with a ground-truth box is boxed by
    its paper's rule (``provider.paper_rule``) and by every candidate rule, its heatmap scored by
    MaxBoxAccV2, and all against ``truth`` (image id -> finding -> xyxy boxes in source pixels).
    ``box_sizes`` (finding -> box-size prior from box-val) sizes the ``prior`` rules' boxes; a
    finding without one is not boxed by them. ``rejected`` (image id -> finding -> xyxy boxes, for
    pairs without truth) adds reviewers' rejected boxes as negatives (miner.evaluation.Pair)."""
    box_sizes, rejected = box_sizes or {}, rejected or {}
    wanted = {i: {**rejected.get(i, {}), **truth.get(i, {})} for i in {*truth, *rejected}}

    def with_truth(batch: ShardBatch) -> Select:
        return fixed_pairs(torch.from_numpy(truth_pairs(batch.meta["image_id"], wanted)))

    scores = {key: {half: HalfScores.empty() for half in sorted(set(halves.values()))} for key in provider.provides()}
    input_size = provider.config.input_size
    grid = min(input_size, MAXBOXACC_GRID)
    for batch in batch_stream(groups, batch_size):
        maps, logits = provider.batch_variant_maps(models, torch.from_numpy(batch.images), with_truth(batch))
        probability = torch.sigmoid(logits.float()).cpu().numpy()
        letterboxes = batch.letterboxes()
        for i, image_id in enumerate(batch.meta["image_id"]):
            for finding in wanted.get(image_id, {}):
                c, gt = FINDINGS.index(finding), truth.get(image_id, {}).get(finding, [])
                rejects = [] if gt else rejected[image_id][finding]
                for key, variant_maps in maps.items():
                    full = upsample(variant_maps[i, c], input_size).cpu().numpy()
                    small = full if grid == input_size else upsample(variant_maps[i, c], grid, input_size).cpu().numpy()
                    pair = Pair(image_id, finding, full, small, letterboxes[i], float(probability[i, c]), gt, rejects)
                    score_pair(scores[key][halves[image_id]], pair, provider.paper_rule, box_sizes)
        advance(len(batch))
    return scores
