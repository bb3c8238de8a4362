"""What the report shows, read from a release being built: rank-1 box columns per finding and
the gallery of mined boxes with their images. Boxes are xyxy in source pixels."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_miner.storage.inputs.images import ImageReadError, read_image
from cxr_miner.storage.releases.report import GALLERY_PER_GROUP, FindingData, GalleryItem
from cxr_miner.storage.vocab.findings import FINDINGS

NORM_COLUMNS = ("x_min_norm", "y_min_norm", "x_max_norm", "y_max_norm")
BOX_COLUMNS = ("x_min", "y_min", "x_max", "y_max")


def rank1_columns(boxes: Path) -> dict[str, dict[str, np.ndarray]]:
    """finding -> column -> array (image_id, score, probability, the box and its normalised copy)
    of the rank-1 boxes."""
    table = pq.read_table(
        boxes,
        columns=["image_id", "finding", "rank", "score", "probability", *NORM_COLUMNS, *BOX_COLUMNS],
        filters=[("rank", "=", 1)],
    )
    out = {}
    for finding in FINDINGS:
        rows = table.filter(pc.equal(table.column("finding"), finding))
        out[finding] = {
            name: rows.column(name).to_numpy() for name in rows.column_names if name not in ("finding", "rank")
        }
    return out


def gallery(
    columns: dict[str, np.ndarray], sources: dict[str, str], root: Path, truth: dict, finding: str
) -> list[GalleryItem]:
    """Rank-1 boxes of the top, median and bottom scores, with their images and ground truth."""
    order = np.argsort(-columns["score"], kind="stable")
    n = len(order)
    middle = max(0, n // 2 - GALLERY_PER_GROUP // 2)
    groups = [
        ("top", order[:GALLERY_PER_GROUP]),
        ("median", order[middle : middle + GALLERY_PER_GROUP]),
        ("bottom", order[max(0, n - GALLERY_PER_GROUP) :]),
    ]
    items, seen = [], set()
    for group, picks in groups:
        for i in picks:
            if i in seen:
                continue
            seen.add(i)
            image_id = columns["image_id"][i]
            try:
                image = read_image(root / sources[image_id])
            except (ImageReadError, OSError):
                image = None
            box = [float(columns[k][i]) for k in BOX_COLUMNS]
            items.append(
                GalleryItem(
                    image_id, box, float(columns["score"][i]), group, image, truth.get(image_id, {}).get(finding, [])
                )
            )
    return items


def finding_pages(
    boxes: Path,
    images: pa.Table,
    root: Path,
    truth: dict,
    counts: Mapping[str, Mapping[str, int]],
    accs: Mapping[str, Any],
    evaluated: Mapping[str, int],
    changes: Mapping[str, Mapping[str, int]],
    tuned: Mapping[str, Mapping[str, Any]],
) -> list[FindingData]:
    """One FindingData per finding, in FINDINGS order: counts, rank-1 boxes, Acc/AFP per method
    (``accs``), images evaluated, changes, what was tuned for it (``tuned``: the tuning entry the
    harvest applied, if any), and the gallery (images read from ``root``)."""
    sources = dict(zip(images.column("image_id").to_pylist(), images.column("source_path").to_pylist()))
    columns = rank1_columns(boxes)
    return [
        FindingData(
            f,
            counts[f]["boxes"],
            counts[f]["images"],
            columns[f],
            accs[f],
            evaluated.get(f, 0),
            changes[f],
            gallery(columns[f], sources, root, truth, f),
            tuned.get(f),
            counts[f].get("at_operating_point", 0),
        )
        for f in FINDINGS
    ]
