"""The boxed images in two halves: ``box-val`` to choose from, ``box-test`` to report on.

Whatever is chosen from ground-truth boxes (box thresholds, the box rule, operating points,
calibration) is chosen on ``box-val``; every figure reported is on ``box-test``. Tuning on the
images one scores is the flaw the WSOL evaluation literature warns about (Choe et al., CVPR 2020,
"Evaluating Weakly Supervised Object Localization Methods Right").

The halves are by patient (a patient's boxed images are all on one side) and reproducible: a
patient's side depends only on the patient id and the fraction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cxr_miner.storage.stages.index import unit_hash

BOX_VAL, BOX_TEST = "box-val", "box-test"
BOX_SPLITS = (BOX_VAL, BOX_TEST)
BOX_VAL_FRACTION = 0.5
_SALT = "cxr-miner/box-split/v1"  # independent of the train/val/test hash


def box_split(patient_id: str, val_fraction: float = BOX_VAL_FRACTION) -> str:
    """``box-val`` for a patient whose hash falls below ``val_fraction``, else ``box-test``."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"box-val fraction must lie in (0, 1), got {val_fraction}")
    return BOX_VAL if unit_hash(patient_id, salt=_SALT) < val_fraction else BOX_TEST


def box_splits(patients: Mapping[str, str | None], boxed: Iterable[str], val_fraction: float = BOX_VAL_FRACTION) -> dict[str, str]:
    """image id -> its half, for the ``boxed`` image ids; ``patients`` maps image id -> patient id
    (an image without a patient id is its own patient)."""
    return {image: box_split(patients.get(image) or image, val_fraction) for image in boxed}
