"""Localisation methods: one registry (``registry``), one module per method.

``create_method("am", config)`` gives a method for a run; ``method_names()`` lists them.
A new method is a module here that registers its class, plus its import below. ``tuned`` is no
method of its own: it boxes each finding by the variant and rule chosen on box-val (harvest's
localiser).
"""

# Importing a method's module registers it; the CAM baseline first, so that it leads every table.
from cxr_miner.miner.methods import cam  # noqa: F401, I001
from cxr_miner.miner.methods import attention  # noqa: F401
from cxr_miner.miner.methods import mil  # noqa: F401
from cxr_miner.miner.methods import gradcam_pp  # noqa: F401
from cxr_miner.miner.methods.registry import (
    TRAINERS,
    BatchLocalization,
    LocalizationMethod,
    Select,
    TrainingStep,
    box_learners,
    check_method,
    create_method,
    harvest_fallback,
    method_class,
    method_names,
    method_of_variant,
    register_method,
)
from cxr_miner.miner.methods.tuned import FindingChoice, TunedLocalizer, choices_from_tuning

__all__ = [
    "TRAINERS",
    "BatchLocalization",
    "FindingChoice",
    "LocalizationMethod",
    "Select",
    "TrainingStep",
    "TunedLocalizer",
    "box_learners",
    "check_method",
    "choices_from_tuning",
    "create_method",
    "harvest_fallback",
    "method_class",
    "method_names",
    "method_of_variant",
    "register_method",
]
