"""Releases: ``RELEASES/<version>/`` with boxes.parquet, coco/<split>.json, report/, manifest.json.

A version is the UTC creation time, ``YYYYMMDDTHHMMSSZ``, so versions sort by time; ``latest``
is a symbolic link to the newest and never moves back. A release is built in a hidden staging
folder of its own and renamed into place when complete; its files are then read-only, and a
version that exists is never written again (the releases folder's lock keeps writers one at a time).

boxes.parquet: one row per box (RELEASE_SCHEMA), named by its ``box_id`` (``box_ids``: the same
box found again in a later release has the same id). Coordinates are xyxy in source pixels,
continuous (pixel (i, j) covers [i, i + 1) x [j, j + 1)), and again divided by the image's
width and height (``*_norm``, in [0, 1]). The schema metadata ``cxr_miner.provenance`` holds
the release, model and code provenance as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxr_miner.storage.stages.atomic import read_json
from cxr_miner.storage.stages.evaluation import operating_points
from cxr_miner.storage.stages.harvest import finding_counts, part_path, read_part
from cxr_miner.storage.stages.index import INDEX_FILE, read_index
from cxr_miner.storage.stages.provenance import code_version, file_sha256, package_versions
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader
from cxr_miner.storage.vocab.errors import MissingInput, UserError
from cxr_miner.storage.vocab.findings import FINDINGS

LATEST = "latest"
BOXES_FILE = "boxes.parquet"
MANIFEST_FILE = "manifest.json"
PROVENANCE_META = b"cxr_miner.provenance"
IMAGE_COLUMNS = ("image_id", "patient_id", "split", "source_path", "width", "height")
BOX_IDENTITY = ("image_id", "finding", "rank", "x_min", "y_min", "x_max", "y_max")

RELEASE_SCHEMA = pa.schema(
    [
        ("box_id", pa.string()),
        ("image_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("finding", pa.string()),
        ("x_min", pa.float32()),
        ("y_min", pa.float32()),
        ("x_max", pa.float32()),
        ("y_max", pa.float32()),
        ("x_min_norm", pa.float32()),
        ("y_min_norm", pa.float32()),
        ("x_max_norm", pa.float32()),
        ("y_max_norm", pa.float32()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("score", pa.float32()),
        ("probability", pa.float32()),
        ("confidence", pa.float32()),
        ("at_operating_point", pa.bool_()),
        ("rank", pa.int8()),
        ("rule_rank", pa.int8()),
        ("method", pa.string()),
        ("model_id", pa.string()),
    ]
)


class ReleaseExists(UserError, FileExistsError):
    """A release of that version exists already; releases are immutable."""


def new_version(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def staging_dir(out: Path, version: str) -> Path:
    """A new, empty, hidden folder of this process for building ``version`` (never shared)."""
    return Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=out))


def fresh_version(out: Path) -> str:
    """Now as a version; if a release of this second exists, the next second."""
    version = new_version()
    if (out / version).exists():
        time.sleep(1.05)
        version = new_version()
    check_new_version(out, version)
    return version


def latest_release(out: Path) -> Path | None:
    """The release ``latest`` points to, or None before the first."""
    link = out / LATEST
    return link.resolve() if link.is_symlink() and link.resolve().is_dir() else None


def check_new_version(out: Path, version: str) -> None:
    if (out / version).exists():
        raise ReleaseExists(f"{out / version}: release {version} exists already; releases are immutable")


def release_rows(part: pa.Table, images: pa.Table) -> pa.Table:
    """Harvest part rows joined with their images (IMAGE_COLUMNS) -> RELEASE_SCHEMA rows,
    sorted by image, finding and rank. A box of an image not in ``images`` raises ValueError."""
    joined = part.join(images.select(list(IMAGE_COLUMNS)), "image_id", join_type="left outer")
    orphans = joined.filter(pc.is_null(joined.column("split")))
    if len(orphans):
        raise ValueError(
            f"boxes of {len(orphans)} images not in the index, e.g. {orphans.column('image_id')[0].as_py()!r}"
        )
    width = pc.cast(joined.column("width"), pa.float32())
    height = pc.cast(joined.column("height"), pa.float32())
    columns = {
        name: joined.column(name)
        for name in (
            "image_id",
            "patient_id",
            "split",
            "finding",
            "x_min",
            "y_min",
            "x_max",
            "y_max",
            "score",
            "probability",
            "confidence",
            "at_operating_point",
            "rank",
            "rule_rank",
            "method",
            "model_id",
        )
    }
    for axis, size in (("x", width), ("y", height)):
        for end in ("min", "max"):
            columns[f"{axis}_{end}_norm"] = pc.divide(columns[f"{axis}_{end}"], size)
    columns["image_width"] = joined.column("width")
    columns["image_height"] = joined.column("height")
    table = pa.table({name: columns[name] for name in RELEASE_SCHEMA.names if name != "box_id"})
    table = table.add_column(0, "box_id", box_ids(table.cast(RELEASE_SCHEMA.remove(0)))).cast(RELEASE_SCHEMA)
    return table.sort_by([("image_id", "ascending"), ("finding", "ascending"), ("rank", "ascending")])


def box_id(image_id: str, finding: str, xyxy: Iterable[float]) -> str:
    """A box's name: the first 16 hex digits of SHA-256 over ``image_id/finding/x0,y0,x1,y1``, the
    corners in source pixels as boxes.parquet stores them (float32) written to 2 decimals. Rank,
    confidence, method and model are not in it: a box found again at the same place in a later
    release keeps its id (and its reviews); a box moved by more than rounding is a new box."""
    corners = ",".join(f"{value:.2f}" for value in xyxy)
    return hashlib.sha256(f"{image_id}/{finding}/{corners}".encode()).hexdigest()[:16]


def box_ids(table: pa.Table) -> pa.Array:
    """``box_id`` of every row of a table with image_id, finding and x_min..y_max (float32). A box
    that a pair holds twice (two rules' boxes can coincide) is named ``<id>-2`` the second time,
    and so on, in row order: ids are unique within a release."""
    columns = [table.column(name).to_pylist() for name in ("image_id", "finding", "x_min", "y_min", "x_max", "y_max")]
    seen: dict[str, int] = {}
    ids = []
    for image_id, finding, *corners in zip(*columns):
        name = box_id(image_id, finding, corners)
        seen[name] = seen.get(name, 0) + 1
        ids.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return pa.array(ids, pa.string())


class BoxesWriter:
    """boxes.parquet written part by part (zstd), so memory does not grow with the collection."""

    def __init__(self, path: Path, provenance: Mapping[str, Any]) -> None:
        schema = RELEASE_SCHEMA.with_metadata({PROVENANCE_META: json.dumps(dict(provenance), sort_keys=True).encode()})
        self.writer = pq.ParquetWriter(path, schema, compression="zstd")
        self.schema = schema
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table.replace_schema_metadata(self.schema.metadata))
        self.rows += len(table)

    def close(self) -> None:
        self.writer.close()


def harvested_images(workdir: Path, columns: Iterable[str] = IMAGE_COLUMNS) -> pa.Table:
    """The index's ``columns`` of the images in the shards (quarantined and missing files are not)."""
    index = read_index(workdir / INDEX_FILE).select(list(columns))
    ids = pa.concat_arrays(
        [
            pq.read_table(p, columns=["image_id"]).column("image_id").combine_chunks()
            for p in ShardReader(workdir / SHARD_DIR).paths
        ]
    )
    return index.filter(pc.is_in(index.column("image_id"), value_set=ids))


def write_release_boxes(
    path: Path, workdir: Path, shards: Iterable[str], images: pa.Table, provenance: Mapping[str, Any]
) -> int:
    """boxes.parquet from the harvest parts of ``shards`` (names), part by part; returns its rows."""
    wanted = set(shards)
    writer = BoxesWriter(path, provenance)
    try:
        for shard in ShardReader(workdir / SHARD_DIR).shards:
            if shard["name"] in wanted:
                writer.write(release_rows(read_part(part_path(workdir, shard["file"])), images))
    finally:
        writer.close()
    return writer.rows


def count_boxes(path: Path) -> dict[str, dict[str, int]]:
    """{finding: {"boxes", "images", "at_operating_point"}} of a boxes.parquet, every finding
    present (zeros included); the last counts the boxes at their finding's operating point."""
    table = pq.read_table(path, columns=["image_id", "finding", "at_operating_point"])
    at_point = finding_counts(table.filter(pc.fill_null(table.column("at_operating_point"), False)))
    return {f: {**c, "at_operating_point": at_point[f]["boxes"]} for f, c in finding_counts(table).items()}


def diff_boxes(previous: Path | None, current: Path) -> dict[str, dict[str, int]]:
    """Per finding: boxes before and after, and boxes added and removed (a box is the same when
    image, finding, rank and coordinates are equal). Without a previous release all are added."""
    now = pq.read_table(current, columns=list(BOX_IDENTITY))
    before = pq.read_table(previous, columns=list(BOX_IDENTITY)) if previous else now.schema.empty_table()
    added = now.join(before, list(BOX_IDENTITY), join_type="left anti")
    removed = before.join(now, list(BOX_IDENTITY), join_type="left anti")

    def per_finding(table: pa.Table) -> dict[str, int]:
        counts = pc.value_counts(table.column("finding")) if len(table) else []
        return {item["values"].as_py(): item["counts"].as_py() for item in counts}

    sizes = {
        name: per_finding(t) for name, t in (("before", before), ("after", now), ("added", added), ("removed", removed))
    }
    return {f: {name: sizes[name].get(f, 0) for name in sizes} for f in FINDINGS}


def file_digests(folder: Path, skip: Iterable[str] = (MANIFEST_FILE,)) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path (POSIX), except ``skip``."""
    skipped = set(skip)
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative not in skipped:
            digests[relative] = file_sha256(path)
    return digests


# A published release is read-only for everyone and readable by all (the analysts it is for),
# or with ``private`` by its owner alone.
FILE_MODE, FOLDER_MODE = 0o444, 0o555
PRIVATE_FILE_MODE, PRIVATE_FOLDER_MODE = 0o400, 0o500


def publish(staging: Path, out: Path, version: str, private: bool = False) -> Path:
    """Rename the complete staging folder to ``out/<version>``, make it read-only (files 0444,
    folders 0555; ``private``: 0400 and 0500), and point ``latest`` at it (replaced atomically).
    Returns the release folder."""
    check_new_version(out, version)
    target = out / version
    file_mode, folder_mode = (PRIVATE_FILE_MODE, PRIVATE_FOLDER_MODE) if private else (FILE_MODE, FOLDER_MODE)
    os.rename(staging, target)
    tree = [target, *target.rglob("*")]
    for path in tree:
        if path.is_file():
            path.chmod(file_mode)
    for folder in sorted((p for p in tree if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        folder.chmod(folder_mode)  # the deepest first, so that each parent is still writable while its children change
    point_latest(out, version)
    return target


def is_private(release: Path) -> bool:
    """Whether a published release is readable by its owner alone."""
    return not release.stat().st_mode & 0o004


def read_manifest(release: Path) -> dict[str, Any]:
    """``RELEASE/manifest.json``; MissingInput naming a folder that is not a release."""
    check_is_release(release)
    return read_json(
        Path(release) / MANIFEST_FILE, "the release is damaged: publish a new one with `cxr-miner release`"
    )


def check_is_release(folder: Path) -> None:
    """MissingInput unless ``folder`` is a published release (it holds manifest.json); the message
    says what the folder looks like instead (a work folder, a releases folder)."""
    folder = Path(folder)
    if (folder / MANIFEST_FILE).is_file():
        return
    if not folder.is_dir():
        raise MissingInput(f"{folder}: no such release folder (give RELEASES/<version> or RELEASES/latest)")
    if (folder / LATEST).is_dir():
        looks = f"a releases folder: give one of its releases, e.g. {folder / LATEST}"
    elif (folder / INDEX_FILE).exists():
        looks = "a work folder: give a release made from it, RELEASES/<version> or RELEASES/latest"
    else:
        looks = "give RELEASES/<version> or RELEASES/latest"
    raise MissingInput(f"{folder}: this is not a release (it has no {MANIFEST_FILE}); {looks}")


def release_file(release: Path, name: str) -> Path:
    """The path of file ``name`` of a release; MissingInput that says it is missing, or that the
    folder is no release at all."""
    check_is_release(release)
    path = Path(release) / name
    if not path.exists():
        raise MissingInput(
            f"{path}: missing from release {Path(release).name} (a release is immutable: "
            "publish a new one with `cxr-miner release`)"
        )
    return path


def point_latest(out: Path, version: str) -> None:
    """Point ``latest`` at ``version`` (an atomic replace), unless it points at a newer one."""
    current = latest_release(out)
    if current is not None and current.name > version:
        return
    link = out / f".{LATEST}.{os.getpid()}.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(version, target_is_directory=True)
    os.replace(link, out / LATEST)


def discard_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def discard_stale_staging(out: Path) -> list[str]:
    """Remove the staging folders that killed releases left behind (call with the folder's lock held:
    then no other release is building). Returns their names."""
    stale = sorted(path for path in out.glob(".staging-*") if path.is_dir())
    for path in stale:
        discard_staging(path)
    return [path.name for path in stale]


def release_provenance(
    version: str, run: str, key: Mapping[str, Any], ingest_report: Mapping[str, Any]
) -> dict[str, Any]:
    """What every box row of a release made now records about where it came from (boxes.parquet's
    metadata)."""
    return {
        "release": version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "model": {"run": run, "model_id": key["model_id"], "checkpoints_sha256": key["checkpoints"]},
        "method": key["method"],
        "mode": key["mode"],
        "index_sha256": ingest_report.get("index_sha256"),
    }


def coco_counts(coco: Mapping[str, Mapping[str, Mapping[str, int]]]) -> dict[str, Any]:
    """write_coco_splits' counts per COCO folder (coco, coco-all) and split, as the manifest keeps them."""
    return {
        variant.replace("-", "_"): {split: {**c[split], "boxes": c[split]["annotations"]} for split in c}
        for variant, c in coco.items()
    }


def release_manifest(
    provenance: Mapping[str, Any],
    config: Mapping[str, Any],
    key: Mapping[str, Any],
    tuned: Mapping[str, dict[str, Any]],
    localisation: Mapping[str, Any],
    forgetting: Mapping[str, Any] | None,
    counts: Mapping[str, Any],
    changes: Mapping[str, Any],
) -> dict[str, Any]:
    """manifest.json without its ``files`` (the digests of what is written beside it): the release's
    provenance, the package versions, the settings, each finding's operating point and box-test
    settings (``tuned``: storage.stages.evaluation.harvested_choices; ``localisation``: their box-test
    figures, miner.tuning.released_figures), the counts and the changes."""
    return {
        "version": provenance["release"],
        "created": provenance["created"],
        "code_version": provenance["code_version"],
        "packages": package_versions(),
        "index_sha256": provenance["index_sha256"],
        "model": provenance["model"],
        "harvest_key": dict(key),
        "config": dict(config),
        "operating_points": operating_points(dict(tuned)),
        "localisation": dict(localisation),
        "forgetting": forgetting,
        "counts": dict(counts),
        "changes": dict(changes),
    }
