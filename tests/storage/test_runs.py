"""Run folders: a run started before a setting existed resumes under the setting's default."""

from __future__ import annotations

from cxr_miner.storage.stages.runs import with_defaults


def test_settings_a_saved_config_lacks_take_their_defaults_nested_too():
    saved = {"epochs": 3, "model": {"trunk": "resnet18"}}
    defaults = {"epochs": 50, "mil_grid": 16, "model": {"trunk": "resnet50", "stages": 4}}
    assert with_defaults(saved, defaults) == {"epochs": 3, "mil_grid": 16, "model": {"trunk": "resnet18", "stages": 4}}
    assert with_defaults({**saved, "mil_grid": 8}, defaults)["mil_grid"] == 8  # a saved value is never replaced
