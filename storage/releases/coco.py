"""COCO detection JSON for one split of a release, written as a stream.

Images: every image of the split (ids from 1, in image_id order), ``file_name`` relative to
the dataset root. Categories: the 14 findings, id = position in FINDINGS + 1, stable across
releases. Annotations: one per box (ids from 1), ``bbox`` [x, y, w, h] in source pixels,
``segmentation`` the box as a polygon, ``iscrowd`` 0, and ``score`` (the box's calibrated
confidence where it has one, else its ranking score), ``box_id`` (boxes.parquet's, stable across
releases), ``confidence``, ``rank`` (1: the pair's most
confident box), ``rule_rank`` (its rank in the box rule's own order) and ``method`` as extra keys
that pycocotools and torchvision ignore but ``COCO.loadRes`` accepts.

Two variants per release (COCO_VARIANTS): ``coco/<split>.json`` holds the boxes at their
finding's operating point (``at_operating_point``), ``coco-all/<split>.json`` every box.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_miner.storage.stages.atomic import atomic_path, json_text
from cxr_miner.storage.vocab.findings import FINDINGS

CATEGORIES: list[dict[str, Any]] = [
    {"id": i + 1, "name": name, "supercategory": "finding"} for i, name in enumerate(FINDINGS)
]
CATEGORY_ID = {name: i + 1 for i, name in enumerate(FINDINGS)}


def coco_image(image_id: int, record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "id": image_id,
        "file_name": record["source_path"],
        "width": int(record["width"]),
        "height": int(record["height"]),
        "image_name": record["image_id"],
    }


def coco_annotation(annotation_id: int, image_id: int, box: Mapping[str, Any]) -> dict[str, Any]:
    """One box row (x_min..y_max in source pixels, finding, score, confidence, rank, rule_rank,
    method) as a COCO annotation."""
    x0, y0, x1, y1 = (float(box[k]) for k in ("x_min", "y_min", "x_max", "y_max"))
    w, h = x1 - x0, y1 - y0
    confidence = box.get("confidence")
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": CATEGORY_ID[box["finding"]],
        "bbox": [x0, y0, w, h],
        "area": w * h,
        "iscrowd": 0,
        "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]],
        "score": float(box["score"] if confidence is None else confidence),
        "confidence": confidence,
        "rank": int(box["rank"]),
        "rule_rank": int(box["rule_rank"]),
        "method": box["method"],
        **({"box_id": box["box_id"]} if "box_id" in box else {}),
    }


def categories_with_points(points: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """CATEGORIES, each finding with an operating point (``points``: the manifest's
    ``operating_points``) carrying it as ``operating_point``: the confidence its coco/ boxes reach,
    its kind (``target``: box-val's precision reaches the target; ``best achievable``: it does not),
    the precision box-val reaches there (in 95% of resamples) and box-test's measured precision, so
    that a detector's user sees what each finding's boxes are worth."""
    categories = []
    for category in CATEGORIES:
        point = points.get(category["name"])
        if point is not None and point.get("confidence_at_least") is not None:
            test: Mapping[str, Any] = point.get("box_test") or {}
            category = {
                **category,
                "operating_point": {
                    "confidence_at_least": point["confidence_at_least"],
                    "kind": point.get("kind"),
                    "box_val_precision_at_least": point.get("box_val_precision_at_least"),
                    "box_test_precision": test.get("precision"),
                    "box_test_pairs": test.get("pairs"),
                },
            }
        categories.append(category)
    return categories


def write_coco(
    path: Path,
    images: Sequence[Mapping[str, Any]],
    boxes: Iterable[Iterable[Mapping[str, Any]]],
    info: Mapping[str, Any],
    categories: Sequence[Mapping[str, Any]] = CATEGORIES,
) -> dict[str, int]:
    """Write one split's COCO file atomically; ``boxes`` yields chunks of box rows (any order).

    Boxes of images not in ``images`` raise ValueError. Returns the image and annotation counts.
    """
    ordered = sorted(images, key=lambda r: r["image_id"])
    ids = {record["image_id"]: k for k, record in enumerate(ordered, start=1)}
    annotations = 0
    with atomic_path(path) as tmp, tmp.open("w") as out:
        out.write(
            '{"info": ' + json.dumps(dict(info)) + ', "licenses": [], "categories": ' + json_text(categories, None)
        )
        out.write(', "images": [' + ", ".join(json.dumps(coco_image(ids[r["image_id"]], r)) for r in ordered) + "]")
        out.write(', "annotations": [')
        for chunk in boxes:
            for box in chunk:
                if box["image_id"] not in ids:
                    raise ValueError(f"{path.name}: box of image {box['image_id']!r}, which is not in this split")
                annotations += 1
                out.write(
                    (", " if annotations > 1 else "")
                    + json.dumps(coco_annotation(annotations, ids[box["image_id"]], box))
                )
        out.write("]}\n")
    return {"images": len(ids), "annotations": annotations}


COCO_VARIANTS = {"coco": "the boxes at their finding's operating point", "coco-all": "every mined box"}


def write_coco_splits(
    folder: Path,
    boxes: Path,
    images: pa.Table,
    info: Mapping[str, Any],
    splits: Sequence[str],
    points: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """``folder/<variant>/<split>.json`` for each of COCO_VARIANTS and each split, streamed from
    ``boxes`` (boxes.parquet); ``images`` holds IMAGE_COLUMNS of every harvested image (every
    image is listed in both variants); coco/'s categories state each finding's operating point
    (``points``, categories_with_points). Returns the counts: variant -> split -> counts."""
    counts: dict[str, dict[str, dict[str, int]]] = {v: {} for v in COCO_VARIANTS}
    handle = pq.ParquetFile(boxes)
    for variant, description in COCO_VARIANTS.items():
        for split in splits:
            records = images.filter(pc.equal(images.column("split"), split)).to_pylist()

            def chunks(split=split, variant=variant):
                for batch in handle.iter_batches(batch_size=65536):
                    table = pa.Table.from_batches([batch])
                    keep = pc.equal(table.column("split"), split)
                    if variant == "coco":
                        keep = pc.and_(keep, pc.fill_null(table.column("at_operating_point"), False))
                    yield table.filter(keep).to_pylist()

            categories = categories_with_points(points or {}) if variant == "coco" else CATEGORIES
            counts[variant][split] = write_coco(
                folder / variant / f"{split}.json",
                records,
                chunks(),
                {**info, "split": split, "boxes": description},
                categories,
            )
    return counts
