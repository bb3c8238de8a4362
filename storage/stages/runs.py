"""Training runs on disk: ``W/models/<run>/``.

- ``config.json``: the training config (a plain dict here) and the identity of the shards;
- ``<checkpoint>.safetensors``: a model a method uses; AM step t is ``step<t>`` (step 1: the
  classifier, best mean validation AUC); the MIL patch model ``mil`` (learning from box-val's
  boxes), ``mil-fold<k>`` (K-fold cross-validation) and ``mil-all`` (all boxes, for releases);
- ``<checkpoint>-last.safetensors``: the resumable state after the last finished epoch;
- ``metrics.json``: per-epoch loss, throughput and validation AUCs of every step;
- ``summary.json``, ``evaluation.json`` and ``evaluation.md``: what train and evaluate report;
  ``tuning.json``: what evaluate chose on box-val for harvest to apply.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxr_miner.storage.stages.atomic import read_json, write_json
from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader
from cxr_miner.storage.vocab.errors import InputError, MissingInput

RUNS_DIR = "models"


def shards_identity(workdir: str | Path) -> str:
    """sha256 over the shard files' names and sha256s: what a run was trained on."""
    entries = sorted((s["file"], s["sha256"]) for s in ShardReader(Path(workdir) / SHARD_DIR).shards)
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the settings it lacks taken from ``defaults`` (nested dicts merged)."""
    merged = {**defaults, **saved}
    for key, value in defaults.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            merged[key] = with_defaults(saved[key], value)
    return json.loads(json.dumps(merged))


@dataclass(frozen=True)
class RunFolder:
    """The files of run ``name`` under ``directory`` (W/models/<name>)."""

    directory: Path

    @classmethod
    def of(cls, workdir: str | Path, run: str) -> RunFolder:
        return cls(Path(workdir) / RUNS_DIR / run)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def config_file(self) -> Path:
        return self.directory / "config.json"

    @property
    def metrics_file(self) -> Path:
        return self.directory / "metrics.json"

    @property
    def summary_file(self) -> Path:
        return self.directory / "summary.json"

    @property
    def evaluation_json(self) -> Path:
        return self.directory / "evaluation.json"

    @property
    def evaluation_md(self) -> Path:
        return self.directory / "evaluation.md"

    @property
    def tuning_json(self) -> Path:
        """What evaluate chose on box-val per finding (method, box rule, calibration, operating point)."""
        return self.directory / "tuning.json"

    def checkpoint(self, name: str, last: bool = False) -> Path:
        """``<name>.safetensors``, or with ``last`` the resumable ``<name>-last.safetensors``."""
        return self.directory / f"{name}{'-last' if last else ''}.safetensors"

    def step(self, step: int, last: bool = False) -> Path:
        """The checkpoint of AM step ``step`` (1 = the classifier)."""
        return self.checkpoint(f"step{step}", last)

    def missing(self, names: tuple[str, ...]) -> list[str]:
        """File names of the checkpoints in ``names`` that do not exist."""
        return [self.checkpoint(n).name for n in names if not self.checkpoint(n).exists()]

    def start(self, config: dict[str, Any], workdir: str | Path, defaults: dict[str, Any] | None = None) -> None:
        """Create the run with its config, or check that a resumed run has the same config and shards.
        A setting the saved config lacks (a run started before the setting existed) counts as its
        value in ``defaults``, so that adding a setting does not orphan the runs made before."""
        record = {"config": config, "shards": shards_identity(workdir)}
        if self.config_file.exists():
            saved = read_json(self.config_file, self.restart_hint)
            saved["config"] = with_defaults(saved.get("config", {}), defaults or {})
            if saved != json.loads(json.dumps(record)):
                raise InputError(
                    self.config_file,
                    f"run {self.name!r} was started with other settings or shards; "
                    f"pass another --run, or delete {self.directory} to start it again",
                )
        else:
            write_json(self.config_file, record)

    def config(self) -> dict[str, Any]:
        """The training config the run was started with (FileNotFoundError for no run)."""
        if not self.config_file.exists():
            raise MissingInput(f"{self.config_file}: no such training run")
        return read_json(self.config_file, self.restart_hint)["config"]

    def record_metrics(self, name: str, history: list[dict[str, Any]]) -> None:
        """The per-epoch history of checkpoint ``name`` (``step1``, ``mil``, ...)."""
        metrics = self.metrics() if self.metrics_file.exists() else {}
        metrics[name] = history
        write_json(self.metrics_file, metrics)

    def metrics(self) -> dict[str, list[dict[str, Any]]]:
        """Per checkpoint, its epochs' records; an undefined figure (an AUC without positives) is None."""
        return read_json(self.metrics_file, self.restart_hint)

    @property
    def restart_hint(self) -> str:
        return f"restore it, or delete {self.directory} (or pass another --run) to train the run again"


def read_settings_file(path: str | Path) -> dict[str, Any]:
    """A settings file (``--config``): a JSON object of setting: value; MissingInput or InputError
    naming the file."""
    path = Path(path)
    if not path.exists():
        raise MissingInput(f"{path}: no such config file")
    try:
        settings = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(path, f"not JSON ({error})") from None
    if not isinstance(settings, dict):
        raise InputError(path, f"expected a JSON object of setting: value, got {type(settings).__name__}")
    return settings
