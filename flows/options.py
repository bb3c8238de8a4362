"""Checks of the commands' option values, cheap and before anything starts.

The command line calls them before it starts a Prefect API or a Dask cluster, so that a bad value is
refused at once; the flows call them too, for callers of the Python API. Each raises
:class:`InputError` naming the option and the value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxr_miner.miner.method_names import check_method_name
from cxr_miner.miner.settings import TrainConfig, preset
from cxr_miner.storage.releases.reviews import read_ground_truth
from cxr_miner.storage.stages.index import GT_BOXES_FILE, INDEX_FILE, read_index
from cxr_miner.storage.stages.runs import read_settings_file
from cxr_miner.storage.stages.shards import ENCODINGS
from cxr_miner.storage.vocab.errors import InputError, SettingError

# Fewer boxed patients than this per fold, and a fold's figures rest on a handful of people.
MIN_PATIENTS_PER_FOLD = 5


def check_range(
    option: str, value: float, low: float, high: float, *, open_low: bool = False, open_high: bool = False
) -> None:
    """InputError unless ``low <= value <= high`` (``<`` at an open end)."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    if not (above and below):
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise InputError(option, f"{value:g} is not in {interval}")


def check_at_least(option: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise InputError(option, f"{value} is below {low}")


def check_cluster(workers: int | None, dask_address: str | None, gpus: int | None = None) -> None:
    if workers is not None and dask_address:
        raise InputError(
            "--workers/--dask-address",
            "give either --workers (a local cluster) or --dask-address (an existing one), not both",
        )
    check_at_least("--workers", workers, 1)
    check_at_least("--gpus", gpus, 1)


def check_ingest(val_fraction: float, test_fraction: float, max_shrink: float) -> None:
    check_range("--val-fraction", val_fraction, 0, 1, open_high=True)
    check_range("--test-fraction", test_fraction, 0, 1, open_high=True)
    check_range("--max-shrink", max_shrink, 0, 1)


def check_shard_layout(size: int, shard_size: int) -> None:
    check_at_least("--size", size, 32)
    check_at_least("--shard-size", shard_size, 1)


def check_preprocess(size: int, shard_size: int, encoding: str, max_lost: float, max_pixels: int) -> None:
    check_shard_layout(size, shard_size)
    check_at_least("--max-pixels", max_pixels, 1)
    if encoding not in ENCODINGS:
        raise InputError("--encoding", f"{encoding!r} is not one of {', '.join(ENCODINGS)}")
    check_range("--max-lost", max_lost, 0, 1)


def check_evaluate(box_val_fraction: float, precision_target: float) -> None:
    check_range("--box-val-fraction", box_val_fraction, 0, 1, open_low=True, open_high=True)
    check_range("--precision-target", precision_target, 0, 1, open_low=True)


def check_harvest(min_score: float, batch_size: int | None = None) -> None:
    check_range("--min-score", min_score, 0, 1)
    check_at_least("--batch-size", batch_size, 1)


def box_options(
    box_fraction: float | None, folds: int | None, method: str, box_learners: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """``--box-fraction`` and ``--folds`` as config overrides, their ranges checked; they only mean
    something for a method that learns from boxes (``box_learners``: the registry's names of
    those; None: not known yet, as on the command line before the registry is imported)."""
    overrides = {k: v for k, v in (("box_fraction", box_fraction), ("box_folds", folds)) if v is not None}
    if overrides and box_learners is not None and method not in box_learners:
        do = ", ".join(f"--method {name}" for name in box_learners) or "none is registered"
        raise InputError(
            "--box-fraction/--folds",
            f"they choose the boxes a model learns from: method {method!r} learns from none (those that do: {do})",
        )
    if box_fraction is not None:
        check_range("--box-fraction", box_fraction, 0, 1)
    if folds is not None and folds < 2:
        raise InputError("--folds", f"{folds}: K-fold cross-validation needs at least 2 folds")
    return overrides


def boxed_patients(workdir: Path) -> int | None:
    """How many patients have an image with a ground-truth box (None before ingest)."""
    if not (workdir / GT_BOXES_FILE).exists() or not (workdir / INDEX_FILE).exists():
        return None
    boxed = set(read_ground_truth(workdir)[0])  # NIH's boxes and the reviewers'
    index = read_index(workdir / INDEX_FILE).select(["image_id", "patient_id"]).to_pydict()
    return len({patient or image for image, patient in zip(index["image_id"], index["patient_id"]) if image in boxed})


def check_folds(workdir: Path, folds: int) -> str | None:
    """InputError when ``folds`` (a run's K, 0 for none) outnumber the boxed patients (a fold would
    hold none out, and every other fold would learn from every box); returns a warning when a
    fold holds out fewer than MIN_PATIENTS_PER_FOLD patients on average, else None."""
    patients = boxed_patients(Path(workdir)) if folds >= 2 else None
    if patients is None:
        return None
    if folds > patients:
        raise InputError(
            "--folds",
            f"{folds} folds, but {workdir / GT_BOXES_FILE} has boxes of {patients} patients: "
            f"each fold needs at least one patient to hold out (use at most {patients})",
        )
    if patients / folds < MIN_PATIENTS_PER_FOLD:
        return (
            f"--folds {folds}: {patients} boxed patients give each fold about {patients / folds:.1f} to hold out "
            f"(fewer than {MIN_PATIENTS_PER_FOLD}): its figures will rest on very few images"
        )
    return None


def resolve_config(preset_name: str, config_file: str | None) -> TrainConfig:
    """The preset's settings with the settings file's on top; SettingError naming an unknown preset,
    InputError naming the file and its bad setting."""
    config = preset(preset_name)
    if config_file:
        try:
            config = config.updated(read_settings_file(config_file))
        except SettingError as error:
            raise InputError(config_file, str(error)) from None
    return config


def check_train_settings(preset_name: str, config_file: str | None, method: str) -> TrainConfig:
    """The checks of a training run's preset, settings file and method that need no torch: the
    command line makes them first, so that a bad value is refused within a second."""
    check_method_name(method)
    return resolve_config(preset_name, config_file)
