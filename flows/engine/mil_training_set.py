"""Which images and boxes a MIL patch model learns from (flows.train) and which it is scored on.

The boxed images (those in ``W/gt_boxes.parquet``) split three ways by patient
(storage.stages.box_splits): the model ``mil`` learns from box-val and is scored on box-test;
``mil-fold<k>`` learns from the folds other than k and is scored on fold k; ``mil-all`` (releases)
learns from all of them. Within its pool a model takes the boxes of ``box_fraction`` of the
patients (box_subset); the pool's other images join with their labels only, so that models of
different fractions see the same images. Held-out boxed images are never trained on at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_miner.miner.methods.mil import EVALUATED_CHECKPOINT, RELEASE_CHECKPOINT, checkpoint_fold
from cxr_miner.miner.training import TrainConfig
from cxr_miner.storage.releases.reviews import read_ground_truth
from cxr_miner.storage.stages.batches import RowGroup, split_row_groups
from cxr_miner.storage.stages.box_splits import BOX_VAL, box_folds, box_splits, box_subset
from cxr_miner.storage.stages.index import INDEX_FILE, read_index


@dataclass(frozen=True)
class MilTrainingSet:
    """train_images: the train split's images to use (None: all of them); pool_groups: the row
    groups of the pool's boxed images outside the train split; boxes: image id -> finding -> xyxy
    source boxes of the images whose boxes the model learns from; pool, held_out: image counts."""

    train_images: frozenset[str] | None
    pool_groups: list[RowGroup]
    boxes: dict[str, dict[str, list[list[float]]]]
    pool: int
    held_out: int
    description: str

    def record(self) -> dict[str, Any]:
        """What the checkpoint's record says about its boxes."""
        return {
            "pool_images": self.pool,
            "boxed_images": len(self.boxes),
            "held_out_images": self.held_out,
            "learns_from": self.description,
        }


def patients_of(workdir: Path) -> tuple[dict[str, str | None], dict[str, str]]:
    """(image id -> patient id, image id -> split) from the index."""
    columns = read_index(workdir / INDEX_FILE).select(["image_id", "patient_id", "split"]).to_pydict()
    return dict(zip(columns["image_id"], columns["patient_id"])), dict(zip(columns["image_id"], columns["split"]))


def training_pool(
    name: str, boxed: list[str], patients: dict[str, str | None], config: TrainConfig
) -> tuple[set[str], str]:
    """The boxed images checkpoint ``name`` may learn from, and how they were chosen."""
    if name == RELEASE_CHECKPOINT:
        return set(boxed), "every boxed image (for releases)"
    if name == EVALUATED_CHECKPOINT:
        halves = box_splits(patients, boxed)
        return {i for i in boxed if halves[i] == BOX_VAL}, "box-val (box-test held out)"
    fold = checkpoint_fold(name)
    if fold is None or not 1 <= fold <= config.box_folds:
        raise ValueError(f"no MIL checkpoint {name!r} in a run with box_folds = {config.box_folds}")
    folds = box_folds(patients, boxed, config.box_folds)
    return {i for i in boxed if folds[i] != fold - 1}, f"folds other than {fold} of {config.box_folds}"


def mil_training_set(workdir: Path, config: TrainConfig, name: str) -> MilTrainingSet:
    """Images and boxes of MIL checkpoint ``name`` (module doc)."""
    truth, _ = read_ground_truth(workdir)  # NIH's boxes and the reviewers'
    patients, splits = patients_of(workdir)
    boxed = sorted(i for i in truth if i in splits)
    pool, how = training_pool(name, boxed, patients, config)
    fraction = 1.0 if name == RELEASE_CHECKPOINT else config.box_fraction
    learn = box_subset(patients, pool, fraction)
    held_out = set(boxed) - pool
    train_ids = {i for i, split in splits.items() if split == "train"}
    outside_train = pool - train_ids
    return MilTrainingSet(
        train_images=frozenset(train_ids - held_out) if train_ids & held_out else None,
        pool_groups=split_row_groups(workdir, ("val", "test"), images=outside_train) if outside_train else [],
        boxes={i: truth[i] for i in sorted(learn)},
        pool=len(pool),
        held_out=len(held_out),
        description=f"{how}, boxes of {fraction:.0%} of its patients",
    )
