"""Flow ``release``: a complete harvest -> ``RELEASES/<version>/`` (storage.releases).

Writes boxes.parquet part by part, coco/<split>.json as streams, the per-disease report and
manifest.json, in a staging folder that is renamed into place at the end; then points
``latest`` at it. The report's Acc/AFP come from the run's evaluation (flow ``evaluate``, run
first if missing) for the CAM baseline and the harvested method (miner.methods); its changes
from the previous ``latest``. Publishes the headline table as Prefect markdown and table
artifacts and a link to the report, under fixed keys, so that releases form a history in the
Prefect UI.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cxr_miner.flows.engine.checkpoints import read_config
from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.folders import writes_into
from cxr_miner.miner.methods import LocalizationMethod, create_method, method_names
from cxr_miner.miner.methods.mil import EVALUATED_CHECKPOINT, RELEASE_CHECKPOINT
from cxr_miner.miner.tuning import released_figures
from cxr_miner.storage.releases.coco import write_coco_splits
from cxr_miner.storage.releases.release import (
    BOXES_FILE,
    MANIFEST_FILE,
    count_boxes,
    diff_boxes,
    discard_staging,
    discard_stale_staging,
    file_digests,
    fresh_version,
    harvested_images,
    latest_release,
    publish,
    staging_dir,
    write_release_boxes,
)
from cxr_miner.storage.releases.report import ReportData, headline_rows, write_report
from cxr_miner.storage.releases.report_data import finding_pages
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.evaluation import harvested_choices, read_evaluation, read_tuning
from cxr_miner.storage.stages.harvest import check_tuning_current, read_harvest_summary
from cxr_miner.storage.stages.index import GT_BOXES_FILE, SPLITS, read_gt_boxes, read_ingest_report
from cxr_miner.storage.stages.provenance import code_version, package_versions
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.stages.shard_manifest import QUARANTINE_FILE
from cxr_miner.storage.vocab.findings import FINDINGS
from cxr_miner.storage.vocab.text import markdown_table


def evaluation_of(work: Path, run: str, key: dict[str, Any]) -> dict[str, Any]:
    """The run's evaluation (evaluated first if it has none), refused (StaleHarvest) when the harvest
    was not made with the tuning that evaluation chose: a release never pairs the two."""
    folder = RunFolder.of(work, run)
    if not folder.evaluation_json.exists():
        evaluate(workdir=str(work), run=run)
    check_tuning_current(work, key, run, folder.tuning_json)
    return read_evaluation(folder)


def acc_tables(evaluation: dict[str, Any], methods: list[LocalizationMethod], choices: dict[str, Any]) -> dict[str, dict[str, dict[float, dict[str, float]]]]:
    """finding -> {column: {T: {acc, afp}}} at T(IoU) on box-test: the ``methods`` the evaluation
    scored (by the paper's rule), and ``released``: per finding, the variant and box rule the
    harvest applied (``choices``, the harvest key's), where the evaluation scored that rule."""
    columns: dict[str, str] = {}
    for method in methods:
        if method.key in evaluation["results"]:
            columns.setdefault(method.label, method.key)
    tables = {f: {label: {float(t): cell for t, cell in evaluation["results"][key][f]["iou"].items()}
                  for label, key in columns.items()} for f in FINDINGS}
    for finding in FINDINGS:
        choice = choices.get(finding, choices.get("default"))
        scored = evaluation.get("box_rules", {}).get(choice["variant"], {}).get(choice["rule"], {}).get(finding) if choice else None
        if scored:
            tables[finding]["released"] = {float(t): cell for t, cell in scored["iou"].items()}
    return tables


def released_mil(folder: RunFolder, choices: dict[str, Any]) -> dict[str, Any] | None:
    """Where the harvest boxed some finding with MIL: which model made the boxes (``mil-all``, from
    every box) and which one the evaluation figures are of (``mil``, box-val's boxes only)."""
    if not any(choice["variant"] == "mil" for choice in choices.values()):
        return None
    released = read_checkpoint_record(folder.checkpoint(RELEASE_CHECKPOINT)).get("boxes", {})
    return {"checkpoint": RELEASE_CHECKPOINT, "boxes": released, "evaluated_checkpoint": EVALUATED_CHECKPOINT,
            "note": (f"boxes from {RELEASE_CHECKPOINT}, trained with the boxes of all {released.get('boxed_images', '?')} boxed "
                     f"images; the box-test figures are of {EVALUATED_CHECKPOINT}, which learnt from box-val's boxes only")}


def operating_points(tuned: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The manifest's record of each calibrated finding's operating point and its figures."""
    def at(half: dict[str, Any]) -> dict[str, Any]:
        return {"pairs": half["pairs"], **half["at_operating_point"]}

    return {f: {"method": t["method"], "box_rule": t["rule"], "box_size": t.get("box_size"), "confidence_at_least": t["operating_point"],
                "box_val": at(t["box_val"]), "box_test": {**at(t["box_test"]), "ece": t["box_test"]["reliability"]["ece"]}}
            for f, t in tuned.items()}


def forgetting_fact(evaluation: dict[str, Any]) -> dict[str, str]:
    """The report's line on attention mining's forgetting (miner.forgetting), for a run with AM steps."""
    forgetting = evaluation.get("forgetting") or {}
    if not forgetting.get("steps"):
        return {}
    warnings = forgetting["warnings"]
    return {"attention mining forgot": "; ".join(warnings) if warnings else
            f"nothing: no AM step lowers a finding's validation AUC by more than {forgetting['tolerance']}"}


@flow(name="release", log_prints=True)
@writes_into("workdir", "out")
def release(workdir: str, out: str, root: str | None = None, private: bool = False) -> dict[str, Any]:
    """Package the complete harvest of ``workdir`` as a new release under ``out`` (module doc);
    ``private``: readable by its owner alone (else by everyone; read-only either way)."""
    logger = get_run_logger()
    work, releases = Path(workdir), Path(out)
    summary = read_harvest_summary(work)
    key, run = summary["key"], summary["run"]
    config = read_config(RunFolder.of(work, run))
    evaluation = evaluation_of(work, run, key)
    ingest_report = read_ingest_report(work)
    source_root = Path(root or ingest_report["root"])
    if stale := discard_stale_staging(releases):
        logger.info("removed the staging folders of stopped releases: %s", ", ".join(stale))
    version = fresh_version(releases)
    previous = latest_release(releases)
    staging = staging_dir(releases, version)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance = {"release": version, "created": created, "code_version": code_version(),
                  "model": {"run": run, "model_id": key["model_id"], "checkpoints_sha256": key["checkpoints"]},
                  "method": key["method"], "mode": key["mode"], "index_sha256": ingest_report.get("index_sha256")}
    try:
        images = harvested_images(work)
        boxes = write_release_boxes(staging / BOXES_FILE, work, summary["shards"], images, provenance)
        coco = write_coco_splits(staging, staging / BOXES_FILE, images, {
            "description": "cxr-miner mined boxes", "version": version, "date_created": created,
            "model_id": key["model_id"], "method": key["method"]}, SPLITS)
        counts = count_boxes(staging / BOXES_FILE)
        changes = diff_boxes(previous / BOXES_FILE if previous else None, staging / BOXES_FILE)
        tuned = harvested_choices(read_tuning(RunFolder.of(work, run)), key["choices"])
        accs = acc_tables(evaluation, [create_method(name, config) for name in method_names()], key["choices"])
        if mil := released_mil(RunFolder.of(work, run), key["choices"]):
            provenance["model"]["mil"] = mil
        quarantined = pq.read_table(work / QUARANTINE_FILE).num_rows if (work / QUARANTINE_FILE).exists() else 0
        facts = {"images harvested": summary["images"], "boxes": boxes, "mode": key["mode"], "quarantined images": quarantined,
                 "index rows": ingest_report.get("rows"), "created": created, "code version": code_version(),
                 "previous release": previous.name if previous else "none",
                 "rank 1": "the most confident box of each image and finding (rule_rank: the box rule's own order)",
                 **forgetting_fact(evaluation),
                 **({"MIL model": mil["note"]} if mil else {})}
        findings = finding_pages(staging / BOXES_FILE, images, source_root, read_gt_boxes(work / GT_BOXES_FILE), counts, accs,
                                 evaluation["evaluated"], changes, tuned)
        report = ReportData(title="cxr-miner harvest report", version=version, method=key["method"], model_id=key["model_id"],
                            previous=previous.name if previous else None, facts=facts, findings=findings)
        pages = write_report(staging / "report", report)
        manifest = {
            "version": version, "created": created, "code_version": code_version(), "packages": package_versions(),
            "index_sha256": ingest_report.get("index_sha256"), "model": provenance["model"], "harvest_key": key,
            "config": {"train": config.to_dict(), "harvest": {k: key[k] for k in ("method", "mode", "min_score", "choices")}},
            "operating_points": operating_points(tuned), "localisation": released_figures(tuned),
            "forgetting": evaluation.get("forgetting"),
            "counts": {"findings": counts, **{variant.replace("-", "_"): {s: {**c[s], "boxes": c[s]["annotations"]} for s in SPLITS}
                                              for variant, c in coco.items()},
                       "images": summary["images"], "boxes": boxes, "quarantined": quarantined},
            "changes": {"previous": previous.name if previous else None, "findings": changes},
            "files": file_digests(staging),
        }
        write_json(staging / MANIFEST_FILE, manifest)
        maybe_fail("release")
        target = publish(staging, releases, version, private=private)
    except BaseException:
        discard_staging(staging)
        raise
    rows = headline_rows(report)
    markdown = (f"Release {version} ({key['method']}, {key['model_id']}): {boxes} boxes on {summary['images']} images\n\n"
                + markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    create_markdown_artifact(markdown, key="release-headline", description=f"harvest report headline, release {version}")
    create_table_artifact(rows, key="release-counts", description=f"boxes and Acc per finding, release {version}")
    create_link_artifact((target / "report" / "index.html").resolve().as_uri(), link_text=f"report {version}",
                         key="release-report", description=f"harvest report of release {version}")
    logger.info("release %s: %d boxes -> %s (report %s)", version, boxes, target, target / "report" / "index.html")
    return {"version": version, "path": str(target), "report": str(target / "report" / "index.html"),
            "pages": pages, "boxes": boxes, "previous": previous.name if previous else None, "manifest": manifest}
