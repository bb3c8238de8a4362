"""The boxed images in two halves: ``box-val`` to choose from, ``box-test`` to report on.

Whatever is chosen from ground-truth boxes (box thresholds, the box rule, operating points,
calibration) is chosen on ``box-val``; every figure reported is on ``box-test``. Tuning on the
images one scores is the flaw the WSOL evaluation literature warns about (Choe et al., CVPR 2020,
"Evaluating Weakly Supervised Object Localization Methods Right").

The halves are by patient (a patient's boxed images are all on one side) and reproducible: a
patient's side depends only on the patient id and the fraction.

For a model trained on boxes (the MIL patch model, Li et al. 2018) two more choices by patient:
``box_folds`` (K folds for cross-validation, as in the paper's section 4: each model learns from the
boxes of K - 1 folds and is scored on the last) and ``box_subset`` (the boxed images a model may
learn from at a fraction F of them, the paper's 0% to 80% experiments; a patient in the subset at
F stays in it at every larger F).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cxr_miner.storage.stages.index import unit_hash
from cxr_miner.storage.vocab.errors import SettingError

BOX_VAL, BOX_TEST = "box-val", "box-test"
BOX_SPLITS = (BOX_VAL, BOX_TEST)
BOX_VAL_FRACTION = 0.5
_SALT = "cxr-miner/box-split/v1"  # independent of the train/val/test hash
_FOLD_SALT = "cxr-miner/box-fold/v1"
_SUBSET_SALT = "cxr-miner/box-subset/v1"


def box_split(patient_id: str, val_fraction: float = BOX_VAL_FRACTION) -> str:
    """``box-val`` for a patient whose hash falls below ``val_fraction``, else ``box-test``."""
    if not 0 < val_fraction < 1:
        raise SettingError(f"box-val fraction must lie in (0, 1), got {val_fraction}")
    return BOX_VAL if unit_hash(patient_id, salt=_SALT) < val_fraction else BOX_TEST


def box_splits(
    patients: Mapping[str, str | None], boxed: Iterable[str], val_fraction: float = BOX_VAL_FRACTION
) -> dict[str, str]:
    """image id -> its half, for the ``boxed`` image ids; ``patients`` maps image id -> patient id
    (an image without a patient id is its own patient)."""
    return {image: box_split(patients.get(image) or image, val_fraction) for image in boxed}


def box_folds(patients: Mapping[str, str | None], boxed: Iterable[str], folds: int) -> dict[str, int]:
    """image id -> its fold in 0..folds-1, for the ``boxed`` image ids, by patient (``patients``:
    image id -> patient id; an image without one is its own patient)."""
    if folds < 2:
        raise SettingError(f"folds must be at least 2, got {folds}")
    return {image: int(unit_hash(patients.get(image) or image, salt=_FOLD_SALT) * folds) for image in boxed}


def box_subset(patients: Mapping[str, str | None], boxed: Iterable[str], fraction: float) -> set[str]:
    """The ``boxed`` image ids whose boxes a model may learn from at ``fraction`` in [0, 1] of them,
    by patient: those whose patient's hash falls below ``fraction``."""
    if not 0 <= fraction <= 1:
        raise SettingError(f"box fraction must lie in [0, 1], got {fraction}")
    return {image for image in boxed if unit_hash(patients.get(image) or image, salt=_SUBSET_SALT) < fraction}
