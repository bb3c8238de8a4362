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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cxr_miner.flows.engine.checkpoints import read_config
from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.faults import maybe_fail
from cxr_miner.flows.folders import writes_into
from cxr_miner.miner.methods import LocalizationMethod, create_method, method_names, method_of_variant
from cxr_miner.miner.training import TrainConfig
from cxr_miner.miner.tuning import released_figures
from cxr_miner.storage.releases.coco import write_coco_splits
from cxr_miner.storage.releases.release import (
    BOXES_FILE,
    MANIFEST_FILE,
    coco_counts,
    count_boxes,
    diff_boxes,
    discard_staging,
    discard_stale_staging,
    file_digests,
    fresh_version,
    harvested_images,
    latest_release,
    publish,
    read_manifest,
    release_manifest,
    release_provenance,
    staging_dir,
    write_release_boxes,
)
from cxr_miner.storage.releases.report import ReportData, headline_rows, write_report
from cxr_miner.storage.releases.report_data import finding_pages
from cxr_miner.storage.releases.review_summary import release_figures, review_rows, verdict_counts
from cxr_miner.storage.releases.reviews import read_ground_truth
from cxr_miner.storage.stages.atomic import write_json
from cxr_miner.storage.stages.checkpoints import read_checkpoint_record
from cxr_miner.storage.stages.evaluation import (
    acc_tables,
    forgetting_fact,
    harvested_choices,
    operating_points,
    read_evaluation,
    read_tuning,
)
from cxr_miner.storage.stages.harvest import check_tuning_current, read_harvest_summary
from cxr_miner.storage.stages.index import SPLITS, read_ingest_report
from cxr_miner.storage.stages.provenance import code_version
from cxr_miner.storage.stages.runs import RunFolder
from cxr_miner.storage.stages.shard_manifest import quarantined_count
from cxr_miner.storage.vocab.errors import NoSpaceLeft, is_disk_full
from cxr_miner.storage.vocab.text import markdown_table


def evaluation_of(work: Path, run: str, key: dict[str, Any]) -> dict[str, Any]:
    """The run's evaluation (evaluated first if it has none), refused (StaleHarvest) when the harvest
    was not made with the tuning that evaluation chose: a release never pairs the two."""
    folder = RunFolder.of(work, run)
    if not folder.evaluation_json.exists():
        evaluate(workdir=str(work), run=run)
    check_tuning_current(work, key, run, folder.tuning_json)
    return read_evaluation(folder)


def released_models(
    folder: RunFolder, config: TrainConfig, choices: dict[str, Any]
) -> list[tuple[LocalizationMethod, dict[str, Any]]]:
    """Per method that learns from boxes and boxed some finding of the harvest: which model made
    the boxes (e.g. ``mil-all``, from every box) and which one the evaluation figures are of (e.g.
    ``mil``, box-val's boxes only)."""
    out = []
    for variant in sorted({choice["variant"] for choice in choices.values()}):
        method = method_of_variant(variant, config)
        if not method.learns_from_boxes or method.release_checkpoints() == method.checkpoints():
            continue
        release, evaluated = ", ".join(method.release_checkpoints()), ", ".join(method.checkpoints())
        boxes = read_checkpoint_record(folder.checkpoint(method.release_checkpoints()[0])).get("boxes", {})
        note = (
            f"boxes from {release}, trained with the boxes of all {boxes.get('boxed_images', '?')} boxed "
            f"images; the box-test figures are of {evaluated}, which learnt from box-val's boxes only"
        )
        out.append((method, {"checkpoint": release, "boxes": boxes, "evaluated_checkpoint": evaluated, "note": note}))
    return out


@dataclass(frozen=True)
class Harvested:
    """What a release packages: the complete harvest of a work folder and what it was made from."""

    work: Path
    summary: dict[str, Any]  # harvest.json
    key: dict[str, Any]  # the harvest key
    run: str
    config: TrainConfig
    evaluation: dict[str, Any]
    ingest_report: dict[str, Any]
    source_root: Path

    @property
    def truth(self) -> dict[str, dict[str, list[list[float]]]]:
        """The ground truth the report draws: NIH's boxes and the reviewers' (as evaluate scores on)."""
        return read_ground_truth(self.work)[0]

    @classmethod
    def of(cls, work: Path, root: str | None) -> Harvested:
        summary = read_harvest_summary(work)
        key, run = summary["key"], summary["run"]
        ingest_report = read_ingest_report(work)
        config = read_config(RunFolder.of(work, run))
        evaluation = evaluation_of(work, run, key)
        return cls(work, summary, key, run, config, evaluation, ingest_report, Path(root or ingest_report["root"]))


@dataclass(frozen=True)
class Built:
    """A release built in its staging folder, not yet published."""

    boxes: int
    report: ReportData
    pages: list[str]
    manifest: dict[str, Any]


@flow(name="release", log_prints=True)
@writes_into("workdir", "out", creates=("out",))
def release(workdir: str, out: str, root: str | None = None, private: bool = False) -> dict[str, Any]:
    """Package the complete harvest of ``workdir`` as a new release under ``out`` (module doc);
    ``private``: readable by its owner alone (else by everyone; read-only either way)."""
    logger = get_run_logger()
    releases = Path(out)
    harvested = Harvested.of(Path(workdir), root)
    if stale := discard_stale_staging(releases):
        logger.info("removed the staging folders of stopped releases: %s", ", ".join(stale))
    version, previous = fresh_version(releases), latest_release(releases)
    staging = staging_dir(releases, version)
    try:
        built = build_release(harvested, staging, version, previous)
        maybe_fail("release")
        target = publish(staging, releases, version, private=private)
    except BaseException as error:
        discard_staging(staging)
        if is_disk_full(error):  # its message names no file: say which folder, and that nothing is published
            raise NoSpaceLeft(releases, f"release {version}", "cxr-miner release") from error
        raise
    publish_artifacts(harvested, built, version, target)
    logger.info(
        "release %s: %d boxes -> %s (report %s)", version, built.boxes, target, target / "report" / "index.html"
    )
    return {
        "version": version,
        "path": str(target),
        "report": str(target / "report" / "index.html"),
        "pages": built.pages,
        "boxes": built.boxes,
        "previous": previous.name if previous else None,
        "manifest": built.manifest,
    }


def build_release(harvested: Harvested, staging: Path, version: str, previous: Path | None) -> Built:
    """boxes.parquet, coco/ and coco-all/, the report and manifest.json of a new release in ``staging``."""
    work, key = harvested.work, harvested.key
    provenance = release_provenance(version, harvested.run, key, harvested.ingest_report)
    folder = RunFolder.of(work, harvested.run)
    tuned = harvested_choices(read_tuning(folder), key["choices"])
    images, boxes, coco = write_box_files(harvested, staging, provenance, operating_points(tuned))
    counts = count_boxes(staging / BOXES_FILE)
    changes = diff_boxes(previous / BOXES_FILE if previous else None, staging / BOXES_FILE)
    released = released_models(folder, harvested.config, key["choices"])
    provenance["model"].update({method.name: entry for method, entry in released})
    quarantined = quarantined_count(work)
    facts = release_facts(harvested, boxes, quarantined, provenance["created"], previous)
    facts |= {f"{method.label} model": entry["note"] for method, entry in released}  # e.g. mil-all's
    previous_name = previous.name if previous else None
    tallies = {"findings": counts, **coco_counts(coco), "images": harvested.summary["images"], "boxes": boxes}
    manifest = release_manifest(
        provenance,
        {
            "train": harvested.config.to_dict(),
            "harvest": {k: key[k] for k in ("method", "mode", "min_score", "choices")},
        },
        key,
        tuned,
        released_figures(tuned),
        harvested.evaluation.get("forgetting"),
        {**tallies, "quarantined": quarantined},
        {"previous": previous_name, "findings": changes},
    )
    findings = finding_pages(
        staging / BOXES_FILE, images, harvested.source_root, harvested.truth, counts,
        report_acc_tables(harvested), harvested.evaluation["evaluated"], changes, tuned,
    )  # fmt: skip
    report = ReportData(
        "cxr-miner harvest report", version, key["method"], key["model_id"], previous_name, facts, findings,
        review_of(harvested, previous, manifest),
    )  # fmt: skip
    pages = write_report(staging / "report", report)
    manifest |= {"files": file_digests(staging)}
    write_json(staging / MANIFEST_FILE, manifest)
    return Built(boxes, report, pages, manifest)


def review_of(harvested: Harvested, previous: Path | None, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's review table (storage.releases.review_summary): the verdicts of the work
    folder's reviewers, where each finding's ground truth comes from, and its figures in the
    ``previous`` release and in this one (``manifest``)."""
    return review_rows(
        verdict_counts(harvested.work),
        harvested.evaluation.get("ground_truth", {}),
        release_figures(read_manifest(previous)) if previous else {},
        release_figures(manifest),
    )


def report_acc_tables(harvested: Harvested) -> dict[str, Any]:
    """The report's Acc/AFP tables (acc_tables): every registered method's, and what was released."""
    methods = [create_method(name, harvested.config) for name in method_names()]
    return acc_tables(harvested.evaluation, [(m.label, m.variant) for m in methods], harvested.key["choices"])


def write_box_files(
    harvested: Harvested, staging: Path, provenance: dict[str, Any], points: dict[str, dict[str, Any]]
) -> tuple[Any, int, dict[str, Any]]:
    """boxes.parquet and the COCO folders of a release (``points``: each calibrated finding's
    operating point, as the manifest records it, stated in coco/'s categories): its images, how
    many boxes, the COCO counts."""
    images = harvested_images(harvested.work)
    boxes = write_release_boxes(staging / BOXES_FILE, harvested.work, harvested.summary["shards"], images, provenance)
    key = harvested.key
    info = {
        "description": "cxr-miner mined boxes",
        "version": provenance["release"],
        "date_created": provenance["created"],
    }
    info |= {"model_id": key["model_id"], "method": key["method"]}
    return images, boxes, write_coco_splits(staging, staging / BOXES_FILE, images, info, SPLITS, points)


def release_facts(
    harvested: Harvested, boxes: int, quarantined: int, created: str, previous: Path | None
) -> dict[str, Any]:
    """The report's facts about the release (its first table)."""
    key = harvested.key
    return {
        "images harvested": harvested.summary["images"],
        "boxes": boxes,
        "mode": key["mode"],
        "quarantined images": quarantined,
        "index rows": harvested.ingest_report.get("rows"),
        "created": created,
        "code version": code_version(),
        "previous release": previous.name if previous else "none",
        "rank 1": "the most confident box of each image and finding (rule_rank: the box rule's own order)",
        **forgetting_fact(harvested.evaluation),
    }


def publish_artifacts(harvested: Harvested, built: Built, version: str, target: Path) -> None:
    """The release's headline as Prefect markdown and table artifacts, and a link to its report."""
    key, rows = harvested.key, headline_rows(built.report)
    markdown = (
        f"Release {version} ({key['method']}, {key['model_id']}): {built.boxes} boxes on "
        f"{harvested.summary['images']} images\n\n" + markdown_table(list(rows[0]), [list(r.values()) for r in rows])
    )
    create_markdown_artifact(
        markdown, key="release-headline", description=f"harvest report headline, release {version}"
    )
    create_table_artifact(rows, key="release-counts", description=f"boxes and Acc per finding, release {version}")
    create_link_artifact(
        (target / "report" / "index.html").resolve().as_uri(),
        link_text=f"report {version}",
        key="release-report",
        description=f"harvest report of release {version}",
    )
