"""Detectors meet shards: training one on a set of boxes and running it over images (no Prefect).

Images come from the shards (the letterboxed square, resized on the device to the detector's size
by miner.training.prepare_images); boxes go in through the same letterbox: source pixels ->
input pixels (Letterbox.boxes_to_input), and detections come back the same way, clipped to the
source image (Letterbox.input_boxes_to_source).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cxr_miner.flows.engine.checkpoints import trunk_weights
from cxr_miner.flows.engine.fitting import Schedule, fit, step_done
from cxr_miner.miner.checkpoint import load_model_arrays
from cxr_miner.miner.detector import (
    DetectorConfig,
    create_detector,
    detect,
    detection_loss,
    imagenet_state,
    pad_targets,
)
from cxr_miner.miner.training import TrainConfig, autocast, prepare_images
from cxr_miner.storage.stages.batches import RowGroup, batch_stream
from cxr_miner.storage.stages.checkpoints import read_checkpoint
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.letterbox import Letterbox

DETECTOR = "detector"  # the checkpoint name in a training set's folder
WARMUP_STEPS = 500  # linear warm-up of the learning rate: the first epoch, at most this many steps


def training_config(
    config: DetectorConfig, device: str = "auto", precision: str = "auto", seed: int = 0
) -> TrainConfig:
    """The TrainConfig fields the epoch loop reads (input size, batch, SGD with momentum), for a detector.
    Data-loader workers are 0: the check's Dask workers are daemon processes and may not have children."""
    return TrainConfig(
        input_size=config.size,
        batch_size=config.batch_size,
        epochs=config.epochs,
        optimizer="sgd",
        lr=config.lr,
        momentum=0.9,
        weight_decay=config.weight_decay,
        loader_workers=0,
        device=device,
        precision=precision,
        seed=seed,
    )


class DetectionTargets:
    """Loader targets (flows.engine.loader.Targets) of a detector: each image's boxes in input pixels.

    ``boxes``: image id -> [(finding, xyxy source box)]; returns {"boxes": (B, M, 4), "box_labels":
    (B, M)} padded (miner.detector.pad_targets), labels the findings' COCO category ids.
    """

    def __init__(self, boxes: Mapping[str, list[tuple[str, list[float]]]], size: int) -> None:
        self.boxes, self.size = dict(boxes), size

    def __call__(self, image_ids: list[str], letterboxes: list[Letterbox]) -> dict[str, torch.Tensor]:
        entries = []
        for image, letterbox in zip(image_ids, letterboxes):
            found = self.boxes.get(image, [])
            on_input = letterbox.boxes_to_input([box for _, box in found], self.size).tolist()
            entries.append([(FINDINGS.index(f) + 1, on_input[k]) for k, (f, _) in enumerate(found)])
        boxes, labels = pad_targets(entries)
        return {"boxes": boxes, "box_labels": labels}


def detector_weights(config: DetectorConfig) -> dict[str, torch.Tensor] | None:
    """The trunk weights ``config.weights`` names: None (random), torchvision's ImageNet ones, or a local file."""
    if config.weights == "random":
        return None
    if config.weights == "imagenet":
        return imagenet_state(config)
    return trunk_weights(config.weights, config.name)


def train_detector(
    folder: RunFolder,
    config: DetectorConfig,
    groups: list[RowGroup],
    boxes: Mapping[str, list],
    device: torch.device,
    logger: logging.Logger | logging.LoggerAdapter,
    record: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """Train (or resume, or skip when done) the detector of ``folder`` on ``groups``' images with ``boxes``."""
    train = training_config(config, str(device), seed=seed)
    if step_done(folder, DETECTOR, config.epochs):
        return {"step": DETECTOR, "skipped": True}
    torch.manual_seed(seed)
    model = create_detector(config, detector_weights(config)).to(device)
    steps = math.ceil(sum(g.rows for g in groups) / config.batch_size)
    schedule = Schedule(config.epochs, config.lr, seed + 7, warmup_steps=min(WARMUP_STEPS, steps))
    return fit(
        folder,
        DETECTOR,
        model,
        detection_loss,
        groups,
        [],
        train,
        device,
        schedule,
        keep_best=False,
        logger=logger,
        record={"network": DETECTOR, "detector": config.to_dict(), **record},
        targets=DetectionTargets(boxes, config.size),
    )


def load_detector(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, DetectorConfig]:
    """A trained detector checkpoint, in eval mode on ``device``, and its config."""
    arrays, record = read_checkpoint(path)
    config = DetectorConfig(**record["detector"])
    model = create_detector(config)
    load_model_arrays(model, arrays)
    return model.to(device).eval(), config


def detections(
    model: torch.nn.Module,
    config: DetectorConfig,
    groups: list[RowGroup],
    device: torch.device | str,
    precision: str = "auto",
) -> list[dict[str, Any]]:
    """Every detection on ``groups``' images as COCO results in source pixels: {"image": image id,
    "finding", "bbox": [x, y, w, h], "score"}, by image, highest score first."""
    device = torch.device(device)
    found = []
    for batch in batch_stream(groups, config.batch_size):
        images = prepare_images(torch.from_numpy(batch.images), config.size, device)
        with autocast(device, precision):
            outputs = detect(model, images)
        for image, letterbox, out in zip(batch.meta["image_id"], batch.letterboxes(), outputs):
            found += detections_of(image, letterbox, out, config.size)
    return found


def detections_of(
    image: str, letterbox: Letterbox, output: Mapping[str, torch.Tensor], size: int
) -> list[dict[str, Any]]:
    """One image's detector output (input pixels) -> COCO results in source pixels, clipped to the
    image; a box that lies wholly in the letterbox's padding (no area left) is dropped."""
    boxes = letterbox.input_boxes_to_source(output["boxes"].numpy(), size)
    return [
        {
            "image": image,
            "finding": FINDINGS[int(label) - 1],
            "score": float(score),
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
        }
        for (x0, y0, x1, y1), label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist())
        if x1 > x0 and y1 > y0
    ]
