"""The localisation methods by name, known without importing them (and torch with them).

Each name maps to its module in ``miner.methods``, which registers the method's class
(``miner.methods.registry``) when ``miner.methods`` imports it; the order is the tables' order,
the CAM baseline first. A new method is its module plus its line here. The command line checks
``--method`` against this list before it imports anything heavy.
"""

from __future__ import annotations

from cxr_miner.storage.vocab.errors import SettingError

METHOD_MODULES = {
    "cam": "cam",
    "am": "attention",
    "mil": "mil",
    "gradcam-pp": "gradcam_pp",
    "ensemble": "ensemble",
}
PLANNED: dict[str, str] = {}  # a name known to be coming -> why it is not there yet


def check_method_name(name: str) -> None:
    """SettingError for a method that is not in the catalogue, listing the known ones."""
    if name in METHOD_MODULES:
        return
    known = ", ".join(METHOD_MODULES)
    if name in PLANNED:
        raise SettingError(f"method {name!r}: {PLANNED[name]}; known: {known}")
    raise SettingError(f"unknown method {name!r}; known: {known}")
