"""The ``cxr-miner`` command line (typer)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from cxr_miner.flows.folders import holding
from cxr_miner.storage.vocab.errors import InputError, UserError

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="Harvest disease boxes from chest X-ray collections."
)
err = Console(stderr=True, soft_wrap=True)  # never break paths and messages


def say(headline: str, detail: str = "", style: str = "green") -> None:
    """One line on stderr: ``headline`` in ``style``, then ``detail``. Neither is read as rich
    markup, so paths and values with brackets (a CSV value ``[/red]``) print as they are."""
    err.print(Text.assemble((headline, style), (" " + detail) if detail else ""))


@contextmanager
def prefect_runs() -> Iterator[None]:
    """One Prefect API for the flow runs of a command, started only once its options are checked
    (a temporary local server takes seconds to start); Prefect's own error lines are held back
    from the console (the command says what failed in one line) for the error log."""
    from cxr_miner.flows.api import prefect_api
    from cxr_miner.flows.logs import hold_prefect_errors

    hold_prefect_errors()
    with prefect_api():  # one API for the command, its Dask workers included
        yield


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="Folder to create, in the NIH ChestX-ray14 layout.")],
    images: Annotated[int, typer.Option(help="Number of phantom images.")] = 200,
    size: Annotated[int, typer.Option(help="Longer side of each image, pixels (NIH: 1024).")] = 1024,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same files.")] = 0,
    corrupt: Annotated[int, typer.Option(help="Plant this many broken image files (truncated, empty, text).")] = 0,
    box_fraction: Annotated[float, typer.Option(help="Fraction of images with boxes in BBox_List_2017.csv.")] = 0.01,
    non_square: Annotated[float, typer.Option(help="Fraction of images that are not square.")] = 0.0,
    workers: Annotated[int, typer.Option(help="Processes drawing images.")] = 0,
) -> None:
    """Generate phantom chest X-rays with findings drawn at known places."""
    from cxr_miner.flows.dask import default_workers
    from cxr_miner.flows.progress import progress_bar
    from cxr_miner.storage.phantoms.generator import generate

    with progress_bar("drawing phantoms", images) as advance:
        summary = generate(
            out,
            n_images=images,
            size=size,
            seed=seed,
            corrupt=corrupt,
            box_fraction=box_fraction,
            non_square=non_square,
            workers=workers or default_workers(),
            progress=advance,
        )
    say(
        f"wrote {summary['images']} images of {summary['patients']} patients to {out}",
        f"({len(summary['boxed_images'])} with boxes, {len(summary['corrupt'])} corrupt)",
    )


@app.command()
def ingest(
    root: Annotated[Path, typer.Argument(help="Dataset root: the NIH folder, or a DICOM tree with --dicom.")],
    workdir: Annotated[Path, typer.Option(help="Working folder for the index and everything after it.")],
    metadata_only: Annotated[bool, typer.Option(help="Index the CSVs without looking at image files.")] = False,
    dicom: Annotated[bool, typer.Option(help="ROOT is a DICOM tree (headers only are read).")] = False,
    labels: Annotated[
        Path | None, typer.Option(help="With --dicom: CSV of path or sop_instance_uid, findings.")
    ] = None,
    val_fraction: Annotated[
        float, typer.Option(help="Patients of train_val (or all, without lists) put in val.")
    ] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Patients put in test when there are no official lists.")] = 0.2,
    allow_shrink: Annotated[
        bool, typer.Option("--allow-shrink", help="Accept an index with many fewer images than the last one.")
    ] = False,
    max_shrink: Annotated[
        float, typer.Option(help="Refuse an index with more than this fraction fewer usable images than the last.")
    ] = 0.1,
    allow_outside_links: Annotated[
        bool,
        typer.Option("--allow-outside-links", help="Read files that symbolic links under ROOT point to outside it."),
    ] = False,
) -> None:
    """Index a collection: W/index.parquet, W/gt_boxes.parquet, W/ingest_report.json."""
    from cxr_miner.flows.options import check_ingest

    check_ingest(val_fraction, test_fraction, max_shrink)
    with holding(creates=(workdir,)), prefect_runs():
        from cxr_miner.flows.ingest import ingest as ingest_flow

        report = ingest_flow(
            root=str(root),
            workdir=str(workdir),
            dicom=dicom,
            labels=str(labels) if labels else None,
            metadata_only=metadata_only,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            allow_shrink=allow_shrink,
            max_shrink=max_shrink,
            allow_outside_links=allow_outside_links,
        )
    say(
        f"index: {workdir / 'index.parquet'}",
        f"{report['rows']} images, splits {report['splits']}, "
        f"{len(report['missing'])} missing, {len(report['unlisted'])} unlisted files, "
        f"{len(report['skipped'])} skipped (not images), {report['gt_boxes']} boxes",
    )


@app.command()
def preprocess(
    workdir: Annotated[Path, typer.Option(help="Working folder holding index.parquet.")],
    size: Annotated[int, typer.Option(help="Side of the square shard images, pixels.")] = 512,
    shard_size: Annotated[int, typer.Option(help="Images per shard (one Dask task each).")] = 256,
    encoding: Annotated[str, typer.Option(help="Image bytes in shards: raw (zstd) or png.")] = "raw",
    workers: Annotated[int | None, typer.Option(help="Local Dask worker processes (default: one per core).")] = None,
    dask_address: Annotated[str | None, typer.Option(help="Existing Dask scheduler, e.g. tcp://host:8786.")] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Quarantine source images with more pixels (decompression bombs).")
    ] = 50_000_000,
    root: Annotated[Path | None, typer.Option(help="Dataset root, if it moved since ingest.")] = None,
    max_lost: Annotated[
        float, typer.Option(help="Fail (exit 2) when more than this fraction of the images is missing or quarantined.")
    ] = 0.1,
) -> None:
    """Letterbox every indexed image into Parquet shards on a Dask cluster."""
    from cxr_miner.flows.options import check_cluster, check_preprocess

    check_preprocess(size, shard_size, encoding, max_lost, max_pixels)
    check_cluster(workers, dask_address)
    with holding(workdir), prefect_runs():
        from cxr_miner.flows.preprocess import run_preprocess

        manifest = run_preprocess(
            str(workdir),
            workers=workers,
            dask_address=dask_address,
            size=size,
            shard_size=shard_size,
            encoding=encoding,
            max_pixels=max_pixels,
            root=str(root) if root else None,
            max_lost=max_lost,
        )
    counts = manifest["counts"]
    say(
        f"shards: {workdir / 'shards'}",
        f"{counts['shard_rows']} images in {len(manifest['shards'])} shards, "
        f"{counts['quarantined']} quarantined ({workdir / 'quarantine.parquet'}), {counts['missing']} missing",
    )


@app.command()
def train(
    workdir: Annotated[Path, typer.Option(help="Working folder holding shards/.")],
    preset: Annotated[
        str,
        typer.Option(
            help=(
                "Settings preset: cpu-small (minutes on a CPU), cpu-demo (the demo's: localises phantoms on a CPU) "
                "or paper (Cai et al., GPU)."
            )
        ),
    ] = "cpu-small",
    config: Annotated[
        Path | None, typer.Option(help='JSON file overriding preset settings, e.g. {"epochs": 5}.')
    ] = None,
    run: Annotated[
        str | None, typer.Option(help="Run name under W/models/ (default: the preset); rerun to resume.")
    ] = None,
    method: Annotated[
        str,
        typer.Option(help="Localisation method to train for: its training plan (`cxr-miner methods` lists them)."),
    ] = "am",
    box_fraction: Annotated[
        float | None,
        typer.Option(
            help=(
                "mil: learn from the boxes of this fraction of the boxed images' patients (default 1; the paper's "
                "0 to 0.8)."
            )
        ),
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            help=(
                "mil: K-fold cross-validation over the boxed images (K models, each scored on the fold it did not "
                "learn from)."
            )
        ),
    ] = None,
    for_release: Annotated[
        bool, typer.Option(help="mil: also train mil-all, from every box, which harvest uses.")
    ] = True,
) -> None:
    """Train the classifier (step 1, the CAM baseline), then attention mining with KP; or the MIL patch model."""
    from cxr_miner.flows.options import box_options, check_folds, check_train_settings

    box_options(box_fraction, folds, method)  # at once; train_config checks them with the method's, after torch
    check_train_settings(preset, str(config) if config else None, method)
    check_folds(workdir, folds or 0)
    with holding(workdir):
        from cxr_miner.flows.train import train as train_flow
        from cxr_miner.flows.train import train_config

        train_config(str(workdir), preset, str(config) if config else None, method, box_fraction, folds)
        with prefect_runs():
            summary = train_flow(
                workdir=str(workdir),
                preset=preset,
                config_file=str(config) if config else None,
                run=run,
                method=method,
                box_fraction=box_fraction,
                folds=folds,
                for_release=for_release,
            )
    say(f"models: {summary['directory']}", f"steps {summary['steps']}")
    print_auc_table(summary["auc"])


@app.command()
def methods() -> None:
    """List the localisation methods of the registry: what each trains, and its box rule."""
    from rich.table import Table

    from cxr_miner.miner.methods import create_method, method_names
    from cxr_miner.miner.training import TrainConfig

    table = Table(title="localisation methods (--method)")
    for column in ("method", "what it is", "trains (with the default am_steps)", "box rule"):
        table.add_column(column)
    for name in method_names():
        method = create_method(name, TrainConfig())
        plan = ", ".join(f"{s.checkpoint} ({s.trainer})" for s in method.training_plan())
        table.add_row(name, method.description, plan, method.paper_rule.name)
    Console().print(table)


@app.command("mine-attention")
def mine_attention(
    workdir: Annotated[Path, typer.Option(help="Working folder holding models/.")],
    run: Annotated[str, typer.Option(help="Run whose step 1 is trained.")],
) -> None:
    """Attention-mining steps 2..T (Eq. 1-7) for a trained run."""
    with holding(workdir), prefect_runs():
        from cxr_miner.flows.train import mine_attention as mine_flow

        summary = mine_flow(workdir=str(workdir), run=run)
    say(f"attention mining done: run {summary['run']}, steps {summary['steps']}")


@app.command()
def evaluate(
    workdir: Annotated[Path, typer.Option(help="Working folder holding models/ and gt_boxes.parquet.")],
    run: Annotated[str, typer.Option(help="Training run to evaluate (W/models/RUN).")],
    box_val_fraction: Annotated[
        float,
        typer.Option(
            help="Patients of the boxed images kept in box-val for choosing; the rest (box-test) is reported."
        ),
    ] = 0.5,
    precision_target: Annotated[
        float,
        typer.Option(
            help=(
                "Each finding's operating point: the lowest box confidence reaching this precision (IoU >= 0.3) on "
                "box-val."
            )
        ),
    ] = 0.5,
) -> None:
    """Acc/AFP and MaxBoxAccV2 per finding for every method (CAM baseline, attention mining) on box-test,
    and per finding the method, box rule, confidence and operating point chosen on box-val (tuning.json)."""
    from cxr_miner.flows.options import check_evaluate

    check_evaluate(box_val_fraction, precision_target)
    with holding(workdir), prefect_runs():
        from cxr_miner.flows.evaluate import evaluate as evaluate_flow

        report = evaluate_flow(
            workdir=str(workdir), run=run, box_val_fraction=box_val_fraction, precision_target=precision_target
        )
    typer.echo(report["markdown"])
    say(
        f"evaluation: {report['path']}",
        f"({report['split']}: {report['images']} boxed images; box-val: {report['box_val']['images']})",
    )


PresetOption = Annotated[str, typer.Option(help="Training preset: cpu-small, cpu-demo or paper.")]
ConfigOption = Annotated[Path | None, typer.Option(help="JSON file overriding preset settings.")]
RunOption = Annotated[str | None, typer.Option(help="Training run name under W/models/ (default: the preset).")]
SizeOption = Annotated[int, typer.Option(help="Side of the square shard images, pixels.")]
ShardSizeOption = Annotated[int, typer.Option(help="Images per shard.")]
MethodOption = Annotated[
    str,
    typer.Option(
        help=(
            "Localisation method to train for (`cxr-miner methods` lists them); the harvest then boxes each "
            "finding with the variant chosen on box-val."
        )
    ),
]
HarvestMethodOption = Annotated[
    str,
    typer.Option(
        help=(
            "auto (per finding, the variant chosen on box-val by evaluate) or one localisation method for every "
            "finding (`cxr-miner methods` lists them)."
        )
    ),
]
AllFindingsOption = Annotated[
    bool,
    typer.Option(
        "--all-findings", help="Discovery: box every finding scored >= --min-score, not only the labelled ones."
    ),
]
MinScoreOption = Annotated[float, typer.Option(help="Discovery mode's classifier probability threshold.")]
WorkersOption = Annotated[
    int | None,
    typer.Option(help="Local Dask worker processes (default: one per core; the detector check: one per GPU on CUDA)."),
]
AddressOption = Annotated[str | None, typer.Option(help="Existing Dask scheduler, e.g. tcp://host:8786.")]
PrivateOption = Annotated[
    bool,
    typer.Option(
        "--private",
        help=(
            "Make the release readable by its owner alone (files 0400, folders 0500) rather than by everyone "
            "(0444, 0555)."
        ),
    ),
]
GpusOption = Annotated[
    int | None, typer.Option(help="GPUs for the harvest, dealt to its workers (default: all, when CUDA is present).")
]


@app.command()
def harvest(
    workdir: Annotated[Path, typer.Option(help="Working folder holding shards/ and models/.")],
    run: Annotated[str, typer.Option(help="Training run to mine with (W/models/RUN).")],
    method: HarvestMethodOption = "auto",
    all_findings: AllFindingsOption = False,
    min_score: MinScoreOption = 0.5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    workers: WorkersOption = None,
    gpus: GpusOption = None,
    dask_address: AddressOption = None,
) -> None:
    """Mine boxes for every image of the shards, a Dask task per shard, into W/harvest/parts/, each with
    its calibrated confidence (run `evaluate` first: it tunes what the harvest applies)."""
    from cxr_miner.flows.options import check_cluster, check_harvest

    check_harvest(min_score, batch_size)
    check_cluster(workers, dask_address, gpus)
    with holding(workdir):
        from cxr_miner.flows.dask import local_gpus
        from cxr_miner.flows.harvest import check_harvest_method, run_harvest

        check_harvest_method(method)
        local_gpus(gpus, dask_address)
        with prefect_runs():
            summary = run_harvest(
                str(workdir),
                run,
                workers=workers,
                gpus=gpus,
                dask_address=dask_address,
                method=method,
                all_findings=all_findings,
                min_score=min_score,
                batch_size=batch_size,
            )
    say(
        f"harvest: {workdir / 'harvest'}",
        f"{summary['boxes']} boxes on {summary['images']} images "
        f"({summary['key']['model_id']}, {summary['key']['method']}, {summary['key']['mode']})",
    )


@app.command()
def release(
    workdir: Annotated[Path, typer.Option(help="Working folder with a complete harvest (W/harvest/harvest.json).")],
    out: Annotated[Path, typer.Option(help="Releases folder: RELEASES/<version>/ and RELEASES/latest.")],
    root: Annotated[
        Path | None, typer.Option(help="Dataset root, if it moved since ingest (for the report's gallery).")
    ] = None,
    private: PrivateOption = False,
) -> None:
    """Package the harvest as a new immutable release: boxes.parquet, COCO, report, manifest
    (read-only; readable by everyone unless --private)."""
    with holding(workdir, creates=(out,)), prefect_runs():
        from cxr_miner.flows.release import release as release_flow

        published = release_flow(workdir=str(workdir), out=str(out), root=str(root) if root else None, private=private)
    print_release(published)


@app.command()
def review(
    release: Annotated[Path, typer.Argument(help="Release folder to review (RELEASES/<version> or RELEASES/latest).")],
    workdir: Annotated[
        Path, typer.Option(help="Working folder the release was made in; verdicts go to W/reviews.sqlite.")
    ],
    host: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 8765,
    reviewer: Annotated[str, typer.Option(help="Your name on every verdict (default: typed into the page).")] = "",
    root: Annotated[Path | None, typer.Option(help="Dataset root, if it moved since ingest (the images).")] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help=(
                "Another name reviewers reach this server by (a machine name, an address): requests naming "
                "any other host are refused. Repeatable."
            ),
        ),
    ] = None,
) -> None:
    """Serve the release's boxes for review in a browser: accept, reject, redraw or skip each box
    of a finding's queue; verdicts are stored at once in W/reviews.sqlite (Ctrl-C stops). The server
    answers only requests addressed to 127.0.0.1, localhost, --host or an --allow-host name."""
    from cxr_miner.flows.options import check_range
    from cxr_miner.flows.review import review_app, serve_review

    check_range("--port", port, 0, 65535)
    app_ = review_app(release, workdir, reviewer, root)

    def ready(url: str, hosts: list[str]) -> None:
        say(f"reviewing release {app_.version}:", f"{url} (Ctrl-C stops)")
        say("answers requests for:", ", ".join(hosts), style="dim")

    serve_review(app_, host, port, ready, allow_host or ())


reviews_app = typer.Typer(no_args_is_help=True, help="Reviewers' verdicts (W/reviews.sqlite).")
app.add_typer(reviews_app, name="reviews")


@reviews_app.command("export")
def reviews_export(
    workdir: Annotated[Path, typer.Option(help="Working folder with W/reviews.sqlite.")],
    out: Annotated[Path | None, typer.Option(help="Folder to write to (default: W/reviews/).")] = None,
) -> None:
    """Write the verdicts as Parquet (reviews.parquet: every verdict, undone ones marked) and as COCO
    (reviewed.json: the accepted and redrawn boxes as ground truth)."""
    from cxr_miner.flows.review import export

    target, counts = export(workdir, out)
    say(f"{counts['verdicts']} verdicts:", str(target / "reviews.parquet"))
    say(f"{counts['boxes']} reviewed boxes on {counts['images']} images (ground truth):", str(target / "reviewed.json"))


@app.command("detector-check")
def detector_check(
    release: Annotated[Path, typer.Option(help="Release folder to check (RELEASES/<version> or RELEASES/latest).")],
    workdir: Annotated[
        Path, typer.Option(help="Working folder the release was made in (its shards, ground truth and run).")
    ],
    detector: Annotated[
        str,
        typer.Option(
            help="fasterrcnn-mobilenet (MobileNetV3-Large FPN, CPU-sized) or fasterrcnn-resnet50 (ResNet-50 FPN, GPU)."
        ),
    ] = "fasterrcnn-mobilenet",
    epochs: Annotated[int | None, typer.Option(help="Training epochs of each detector (default 12).")] = None,
    size: Annotated[int | None, typer.Option(help="Detector input side, pixels (default 256).")] = None,
    weights: Annotated[
        str, typer.Option(help="Trunk weights: random, imagenet (downloads) or a local torchvision weights file.")
    ] = "random",
    background_ratio: Annotated[
        float, typer.Option(help="Background images (no checked finding) per positive image in each training set.")
    ] = 1.0,
    config: Annotated[
        Path | None,
        typer.Option(
            help="JSON object of more detector settings (batch_size, lr, rois_per_image, proposals, box_head, ...)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Releases folder for the checked copy (default: the checked release's).")
    ] = None,
    workers: WorkersOption = None,
    gpus: Annotated[
        int | None, typer.Option(help="GPUs, one detector worker each (default: all, when CUDA is present).")
    ] = None,
    dask_address: AddressOption = None,
) -> None:
    """Train a torchvision detector on the release's boxes and, the same way, on box-val's ground truth and
    on a prior of mean boxes; score each on box-test's ground truth with COCOeval; publish the release
    again, as a new version, with detector-check.json and a report page added."""
    from cxr_miner.flows.options import check_at_least, check_cluster

    check_cluster(workers, dask_address, gpus)
    check_at_least("--epochs", epochs, 1)
    check_at_least("--size", size, 32)
    if background_ratio < 0:
        raise InputError("--background-ratio", f"{background_ratio:g} is below 0")
    from cxr_miner.storage.stages.runs import read_settings_file

    settings = read_settings_file(config) if config else None
    with holding(workdir):
        from cxr_miner.flows.dask import local_gpus
        from cxr_miner.flows.detector_check import detector_config, run_detector_check

        detector_config(detector, epochs, size, weights, settings or {})
        local_gpus(gpus, dask_address)
        with prefect_runs():
            checked = run_detector_check(
                str(release),
                str(workdir),
                str(out) if out else None,
                workers=workers,
                gpus=gpus,
                dask_address=dask_address,
                detector=detector,
                epochs=epochs,
                size=size,
                weights=weights,
                background_ratio=background_ratio,
                settings=settings,
            )
    print_check(checked)


def print_check(checked: dict) -> None:
    from cxr_miner.storage.vocab.text import format_number

    check = checked["check"]
    say(
        f"release {checked['version']}: {checked['path']}",
        f"(release {checked['checked_release']} with its detector check)",
    )
    say(f"report page: {Path(checked['path']) / 'report' / 'detector-check.html'}")
    overall = {name: check["figures"][name]["overall"]["ap30"] for name in check["sets"]}
    say("AP at IoU 0.3 on box-test, overall:", ", ".join(f"{name} {format_number(v)}" for name, v in overall.items()))
    for verdict in ("does not beat the prior", "not scored"):
        if found := [f for f in check["findings"] if check["verdicts"][f].startswith(verdict)]:
            say(f"mined boxes {verdict.replace('does not beat', 'do not beat')} for:", ", ".join(found), style="yellow")


def run_options(
    preset: str,
    config: Path | None,
    run: str | None,
    size: int,
    shard_size: int,
    method: str,
    all_findings: bool,
    min_score: float,
    workers: int | None,
    dask_address: str | None,
    gpus: int | None,
    check_detector: bool = False,
    private: bool = False,
) -> dict:
    """The ``run`` flow's parameters, each checked (InputError) before anything starts."""
    from cxr_miner.flows.options import check_cluster, check_harvest, check_shard_layout

    check_shard_layout(size, shard_size)
    check_harvest(min_score)
    check_cluster(workers, dask_address, gpus)
    from cxr_miner.flows.options import check_train_settings

    check_train_settings(preset, str(config) if config else None, method)
    return {
        "preset": preset,
        "config_file": str(config) if config else None,
        "run": run,
        "size": size,
        "shard_size": shard_size,
        "method": method,
        "all_findings": all_findings,
        "min_score": min_score,
        "workers": workers,
        "dask_address": dask_address,
        "gpus": gpus,
        "detector_check": check_detector,
        "private": private,
    }


DetectorCheckOption = Annotated[
    bool,
    typer.Option(
        "--detector-check",
        help=(
            "Last stage: the detector check of the new release (`cxr-miner detector-check`), published as a "
            "further version."
        ),
    ),
]


@app.command("run")
def run_all(
    root: Annotated[Path, typer.Argument(help="Dataset root (NIH layout).")],
    workdir: Annotated[Path, typer.Option(help="Working folder (reused: finished stages are skipped).")],
    out: Annotated[Path, typer.Option(help="Releases folder.")],
    preset: PresetOption = "cpu-small",
    config: ConfigOption = None,
    run: RunOption = None,
    size: SizeOption = 512,
    shard_size: ShardSizeOption = 256,
    method: MethodOption = "am",
    all_findings: AllFindingsOption = False,
    min_score: MinScoreOption = 0.5,
    workers: WorkersOption = None,
    dask_address: AddressOption = None,
    gpus: GpusOption = None,
    check_detector: DetectorCheckOption = False,
    private: PrivateOption = False,
) -> None:
    """The whole chain: ingest, preprocess, train, evaluate (tunes on box-val), harvest, release
    (and with --detector-check, the detector check of the release)."""
    options = run_options(
        preset,
        config,
        run,
        size,
        shard_size,
        method,
        all_findings,
        min_score,
        workers,
        dask_address,
        gpus,
        check_detector,
        private,
    )
    with holding(creates=(workdir, out)), prefect_runs():
        from cxr_miner.flows.pipeline import run as run_flow

        published = run_flow(root=str(root), workdir=str(workdir), out=str(out), **options)
    print_release(published)
    if published.get("detector_check"):
        print_check(published["detector_check"])


@app.command()
def serve(
    root: Annotated[Path, typer.Argument(help="Dataset root (NIH layout).")],
    workdir: Annotated[Path, typer.Option(help="Working folder.")],
    out: Annotated[Path, typer.Option(help="Releases folder.")],
    cron: Annotated[str, typer.Option(help='Schedule, e.g. "0 3 * * 1" (Mondays 03:00).')],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "cxr-miner-release",
    preset: PresetOption = "cpu-small",
    config: ConfigOption = None,
    run: RunOption = None,
    size: SizeOption = 512,
    shard_size: ShardSizeOption = 256,
    method: MethodOption = "am",
    all_findings: AllFindingsOption = False,
    min_score: MinScoreOption = 0.5,
    workers: WorkersOption = None,
    dask_address: AddressOption = None,
    gpus: GpusOption = None,
    check_detector: DetectorCheckOption = False,
    private: PrivateOption = False,
) -> None:
    """Serve the `run` flow as a Prefect deployment on a cron schedule (needs PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL

    from cxr_miner.flows.pipeline import serve as serve_flow

    if not PREFECT_API_URL.value():
        raise InputError(
            "PREFECT_API_URL",
            "schedules need a Prefect server: start one with `prefect server start` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
        )
    options = run_options(
        preset,
        config,
        run,
        size,
        shard_size,
        method,
        all_findings,
        min_score,
        workers,
        dask_address,
        gpus,
        check_detector,
        private,
    )
    parameters = {"root": str(root.resolve()), "workdir": str(workdir.resolve()), "out": str(out.resolve()), **options}
    say(f"serving deployment run/{name}", f"on schedule {cron!r}; stop with Ctrl-C")
    with prefect_runs():
        serve_flow(cron, name=name, **parameters)


def print_release(published: dict) -> None:
    from cxr_miner.storage.vocab.text import ci_text

    say(f"release {published['version']}: {published['path']}", f"({published['boxes']} boxes)")
    say(f"report: {published['report']}")
    found = published.get("manifest", {}).get("localisation") or {}
    if found.get("findings"):
        say(
            f"localisation on box-test: mean Acc at IoU 0.3 {found['mean_acc']:.2f}{ci_text(found.get('mean_acc_ci'))} "
            f"(all boxes), {found['mean_acc_rank1']:.2f}{ci_text(found.get('mean_acc_rank1_ci'))} (rank 1 alone, as "
            "released: the most confident box, or the rule's first where box-val chose that; "
            f"{found.get('mean_acc_rank1_rule', float('nan')):.2f} by the box rule's order)",
            f"over {len(found.get('mean_over', found['findings']))} findings with NIH's boxes (95% CIs over "
            f"box-test's images); lowest {found['min_acc']:.2f}",
        )
        pooled = found.get("calibration") or {}
        if pooled.get("boxes"):
            say(
                f"confidence on box-test: expected calibration error {pooled['ece']:.3f}"
                f"{ci_text(pooled.get('ece_ci'), 3)} over its {pooled['boxes']} boxes"
            )


def print_auc_table(rows: list[dict]) -> None:
    from rich.table import Table

    from cxr_miner.storage.vocab.text import format_number

    table = Table(title="validation ROC AUC")
    columns = list(rows[0])
    for column in columns:
        table.add_column(column, justify="left" if column == "finding" else "right")
    for row in rows:
        table.add_row(*(format_number(row[c], digits=3) for c in columns))
    err.print(table)


def main() -> None:
    """Console entry point.

    A user error (storage.vocab.errors.UserError: a bad file, option or setting, a stage not run
    yet) ends with its one line, exit 2. An error of the machine (OSError: a disk full, a folder
    not writable) ends with its line, exit 2, and its traceback in a log file the line names.
    Anything else is a bug: one line, exit 1, the traceback in a log file under the work folder.
    SIGINT and SIGTERM stop the command cleanly with exit 130 and 143.
    """
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from cxr_miner.flows.logs import quiet_run_tracebacks
    from cxr_miner.flows.stopping import stop_on_signals

    quiet_run_tracebacks()
    with stop_on_signals():
        try:
            app()
        except BaseException as error:
            if isinstance(error, SystemExit):
                raise
            sys.exit(failure_status(error))


def failure_status(error: BaseException) -> int:
    """Say what ended the command, in one line; return its exit status (see main)."""
    from cxr_miner.flows.logs import held_errors, write_error_log
    from cxr_miner.flows.stopping import Stopped, stop_reported, stop_requested

    stop = error if isinstance(error, Stopped) else stop_requested()
    if stop is not None:
        say("stopped:", f"{stop}; temporary files removed, a rerun resumes", style="yellow")
        stop_reported()
        return stop.exit_status
    if isinstance(error, UserError):
        say(
            "error:",
            str(error) + (f" (Prefect's log of it: {write_error_log(error, sys.argv)})" if held_errors() else ""),
            style="red",
        )
        return 2
    if isinstance(error, OSError):
        say("error:", f"{error} (traceback in {write_error_log(error, sys.argv)})", style="red")
        return 2
    if not isinstance(error, Exception):
        raise error  # KeyboardInterrupt outside a stop, GeneratorExit: not ours to report
    log = write_error_log(error, sys.argv)
    say("internal error:", f"{type(error).__name__}: {error} (traceback in {log})", style="red")
    return 1


if __name__ == "__main__":
    main()
