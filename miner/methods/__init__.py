"""Localisation methods: one registry (``registry``), one module per method.

``create_method("am", config)`` gives a method for a run; ``method_names()`` lists them.
A new method is a module here that registers its class, plus its line in
``miner.method_names.METHOD_MODULES`` (the catalogue the command line checks ``--method`` against
without importing torch); importing this package imports them in that order. ``tuned`` is no
method of its own: it boxes each finding by the variant and rule chosen on box-val (harvest's
localiser).
"""

import importlib

from cxr_miner.miner.method_names import METHOD_MODULES
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

# Importing a method's module registers it; the catalogue's order (the CAM baseline first) is the tables'.
for _module in METHOD_MODULES.values():
    importlib.import_module(f"{__name__}.{_module}")
if method_names() != tuple(METHOD_MODULES):
    raise ImportError(f"miner.method_names lists {tuple(METHOD_MODULES)}; the modules registered {method_names()}")

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
