"""Flow ``release``: a complete harvest -> ``RELEASES/<version>/`` (storage.releases.release).

Writes boxes.parquet part by part, coco/<split>.json as streams, the per-disease report
(storage.releases.report) and manifest.json, in a staging folder that is renamed into place at the
end; then points ``latest`` at it. The report's Acc/AFP come from the run's evaluation
(flow ``evaluate``, run first if missing); its changes from the previous ``latest``.
Publishes the headline table as Prefect markdown and table artifacts and a link to the
report, under fixed keys, so that releases form a history in the Prefect UI.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.preprocess import QUARANTINE_FILE, code_version
from cxr_miner.flows.train import read_config, run_dir
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.releases.coco import write_coco
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.stages.harvest import HARVEST_DIR, SUMMARY_FILE, part_path, read_part
from cxr_miner.storage.inputs.images import ImageReadError, read_image
from cxr_miner.storage.stages.index import GT_BOXES_FILE, INDEX_FILE, REPORT_FILE, SPLITS, read_gt_boxes, read_index
from cxr_miner.storage.releases.release import (
    BOXES_FILE, IMAGE_COLUMNS, MANIFEST_FILE, BoxesWriter, check_new_version, count_boxes, diff_boxes,
    discard_staging, file_digests, latest_release, new_version, publish, release_rows, staging_dir,
)
from cxr_miner.storage.releases.report import GALLERY_PER_GROUP, FindingData, GalleryItem, ReportData, headline_rows, write_report
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader

NORM_COLUMNS = ("x_min_norm", "y_min_norm", "x_max_norm", "y_max_norm")


def read_harvest(work: Path) -> dict[str, Any]:
    path = work / HARVEST_DIR / SUMMARY_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no complete harvest (run `cxr-miner harvest` first)")
    return json.loads(path.read_text())


def fresh_version(out: Path) -> str:
    """Now as a version; if a release of this second exists, the next second."""
    version = new_version()
    if (out / version).exists():
        time.sleep(1.05)
        version = new_version()
    check_new_version(out, version)
    return version


def harvested_images(work: Path) -> pa.Table:
    """IMAGE_COLUMNS of the images in the shards (quarantined and missing files are not)."""
    index = read_index(work / INDEX_FILE).select(list(IMAGE_COLUMNS))
    ids = pa.concat_arrays([pq.read_table(p, columns=["image_id"]).column("image_id").combine_chunks()
                            for p in ShardReader(work / SHARD_DIR).paths])
    return index.filter(pc.is_in(index.column("image_id"), value_set=ids))


def evaluation_of(work: Path, run: str) -> dict[str, Any]:
    path = run_dir(work, run) / "evaluation.json"
    if not path.exists():
        evaluate(workdir=str(work), run=run)
    return json.loads(path.read_text())


def acc_tables(evaluation: dict[str, Any], method: str, steps: int) -> dict[str, dict[str, dict[float, dict[str, float]]]]:
    """finding -> {"CAM baseline": {T: {acc, afp}}, "AM (t = T)": ...} at T(IoU)."""
    columns = {"CAM baseline": "cam"}
    if method == "am" and steps > 1:
        columns[f"AM (t = {steps})"] = f"am-t{steps}"
    return {
        f: {label: {float(t): cell for t, cell in evaluation["results"][key][f]["iou"].items()} for label, key in columns.items()}
        for f in FINDINGS
    }


def rank1_columns(boxes: Path) -> dict[str, dict[str, np.ndarray]]:
    table = pq.read_table(boxes, columns=["image_id", "finding", "rank", "score", "probability", *NORM_COLUMNS, *(
        "x_min", "y_min", "x_max", "y_max")], filters=[("rank", "=", 1)])
    out = {}
    for finding in FINDINGS:
        rows = table.filter(pc.equal(table.column("finding"), finding))
        out[finding] = {name: rows.column(name).to_numpy() for name in rows.column_names if name not in ("finding", "rank")}
    return out


def gallery(columns: dict[str, np.ndarray], sources: dict[str, str], root: Path, truth: dict, finding: str) -> list[GalleryItem]:
    """Rank-1 boxes of the top, median and bottom scores, with their images and ground truth."""
    order = np.argsort(-columns["score"], kind="stable")
    n = len(order)
    middle = max(0, n // 2 - GALLERY_PER_GROUP // 2)
    groups = [("top", order[:GALLERY_PER_GROUP]), ("median", order[middle:middle + GALLERY_PER_GROUP]),
              ("bottom", order[max(0, n - GALLERY_PER_GROUP):])]
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
            box = [float(columns[k][i]) for k in ("x_min", "y_min", "x_max", "y_max")]
            items.append(GalleryItem(image_id, box, float(columns["score"][i]), group, image, truth.get(image_id, {}).get(finding, [])))
    return items


def write_boxes(staging: Path, work: Path, summary: dict[str, Any], images: pa.Table, provenance: dict[str, Any]) -> int:
    writer = BoxesWriter(staging / BOXES_FILE, provenance)
    try:
        for shard in ShardReader(work / SHARD_DIR).shards:
            if shard["name"] in summary["shards"]:
                part = read_part(part_path(work, shard["file"]))
                writer.write(release_rows(part, images))
    finally:
        writer.close()
    return writer.rows


def write_coco_files(staging: Path, images: pa.Table, info: dict[str, Any]) -> dict[str, dict[str, int]]:
    counts = {}
    handle = pq.ParquetFile(staging / BOXES_FILE)
    for split in SPLITS:
        records = images.filter(pc.equal(images.column("split"), split)).to_pylist()

        def chunks(split=split):
            for batch in handle.iter_batches(batch_size=65536):
                table = pa.Table.from_batches([batch])
                yield table.filter(pc.equal(table.column("split"), split)).to_pylist()

        counts[split] = write_coco(staging / "coco" / f"{split}.json", records, chunks(), {**info, "split": split})
    return counts


def markdown_headline(rows: list[dict[str, Any]]) -> str:
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join("-" if isinstance(v, float) and v != v else (f"{v:.2f}" if isinstance(v, float) else str(v))
                                       for v in row.values()) + " |")
    return "\n".join(lines)


@flow(name="release", log_prints=True)
def release(workdir: str, out: str, root: str | None = None) -> dict[str, Any]:
    """Package the complete harvest of ``workdir`` as a new release under ``out`` (module doc)."""
    logger = get_run_logger()
    work, releases = Path(workdir), Path(out)
    summary = read_harvest(work)
    key, run = summary["key"], summary["run"]
    config = read_config(run_dir(work, run))
    ingest_report = json.loads((work / REPORT_FILE).read_text())
    source_root = Path(root or ingest_report["root"])
    releases.mkdir(parents=True, exist_ok=True)
    version = fresh_version(releases)
    previous = latest_release(releases)
    staging = staging_dir(releases, version)
    discard_staging(staging)
    staging.mkdir()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance = {"release": version, "created": created, "code_version": code_version(),
                  "model": {"run": run, "model_id": key["model_id"], "checkpoints_sha256": key["checkpoints"]},
                  "method": key["method"], "mode": key["mode"], "index_sha256": ingest_report.get("index_sha256")}
    try:
        images = harvested_images(work)
        boxes = write_boxes(staging, work, summary, images, provenance)
        coco = write_coco_files(staging, images, {"description": "cxr-miner mined boxes", "version": version,
                                                 "date_created": created, "model_id": key["model_id"], "method": key["method"]})
        counts = count_boxes(staging / BOXES_FILE)
        changes = diff_boxes(previous / BOXES_FILE if previous else None, staging / BOXES_FILE)
        evaluation = evaluation_of(work, run)
        accs = acc_tables(evaluation, key["method"], len(key["checkpoints"]))
        truth = read_gt_boxes(work / GT_BOXES_FILE)
        sources = dict(zip(images.column("image_id").to_pylist(), images.column("source_path").to_pylist()))
        columns = rank1_columns(staging / BOXES_FILE)
        quarantined = pq.read_table(work / QUARANTINE_FILE).num_rows if (work / QUARANTINE_FILE).exists() else 0
        facts = {"images harvested": summary["images"], "boxes": boxes, "mode": key["mode"], "quarantined images": quarantined,
                 "index rows": ingest_report.get("rows"), "created": created, "code version": code_version(),
                 "previous release": previous.name if previous else "none"}
        report = ReportData(
            title="cxr-miner harvest report", version=version, method=key["method"], model_id=key["model_id"],
            previous=previous.name if previous else None, facts=facts,
            findings=[FindingData(f, counts[f]["boxes"], counts[f]["images"], columns[f], accs[f], evaluation["evaluated"].get(f, 0),
                                  changes[f], gallery(columns[f], sources, source_root, truth, f)) for f in FINDINGS],
        )
        pages = write_report(staging / "report", report)
        manifest = {
            "version": version, "created": created, "code_version": code_version(),
            "index_sha256": ingest_report.get("index_sha256"), "model": provenance["model"], "harvest_key": key,
            "config": {"train": config.to_dict(), "harvest": {k: key[k] for k in ("method", "mode", "min_score", "thresholds")}},
            "counts": {"findings": counts, "splits": {s: {**coco[s], "boxes": coco[s]["annotations"]} for s in SPLITS},
                       "images": summary["images"], "boxes": boxes, "quarantined": quarantined},
            "changes": {"previous": previous.name if previous else None, "findings": changes},
            "files": file_digests(staging),
        }
        write_json(staging / MANIFEST_FILE, manifest)
        target = publish(staging, releases, version)
    except BaseException:
        discard_staging(staging)
        raise
    rows = headline_rows(report)
    markdown = f"Release {version} ({key['method']}, {key['model_id']}): {boxes} boxes on {summary['images']} images\n\n" + markdown_headline(rows)
    create_markdown_artifact(markdown, key="release-headline", description=f"harvest report headline, release {version}")
    create_table_artifact(rows, key="release-counts", description=f"boxes and Acc per finding, release {version}")
    create_link_artifact((target / "report" / "index.html").resolve().as_uri(), link_text=f"report {version}",
                         key="release-report", description=f"harvest report of release {version}")
    logger.info("release %s: %d boxes -> %s (report %s)", version, boxes, target, target / "report" / "index.html")
    return {"version": version, "path": str(target), "report": str(target / "report" / "index.html"),
            "pages": pages, "boxes": boxes, "previous": previous.name if previous else None, "manifest": manifest}
