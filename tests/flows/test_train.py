"""Training, attention mining and evaluation end to end on phantoms, with the cpu-small preset.

The phantoms have findings drawn at known places, so the classifier must rank planted
findings above chance and attention mining must localise at least as well as the CAM
baseline at T(IoU) = 0.1, the comparison of Cai et al. Table 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_miner.flows.engine.checkpoints import load_model
from cxr_miner.flows.evaluate import evaluate
from cxr_miner.flows.engine.loader import shard_loader
from cxr_miner.flows.train import row_groups, run_dir, step_file, train
from cxr_miner.miner.metrics import roc_auc
from cxr_miner.miner.training import predict, preset
from cxr_miner.storage.vocab.findings import BOXED_FINDINGS, FINDINGS
from tests.flows.conftest import SETTINGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(trained_workdir) -> Path:
    return trained_workdir


def test_run_folder_holds_every_step_and_its_metrics(trained):
    directory = run_dir(trained, "t")
    metrics = json.loads((directory / "metrics.json").read_text())
    assert [len(metrics[f"step{t}"]) for t in (1, 2, 3)] == [SETTINGS["epochs"], 1, 1]
    model, record = load_model(step_file(directory, 3))
    assert record["step"] == 3 and record["config"]["kp"] == "kp"
    assert all(math.isfinite(row["loss_kp"]) for row in metrics["step2"] + metrics["step3"])


def test_planted_findings_are_ranked_above_chance(trained):
    config = preset("cpu-small")
    model, _ = load_model(step_file(run_dir(trained, "t"), 1))
    loader = shard_loader(row_groups(trained, ("test",)), 32, shuffle=False, workers=0)
    scores, labels = predict(model, loader, config, torch.device("cpu"))
    aucs = {f: roc_auc(scores[:, c].numpy(), labels[:, c].numpy()) for c, f in enumerate(FINDINGS)}
    finite = [v for v in aucs.values() if not math.isnan(v)]
    assert np.mean(finite) > 0.6, aucs
    assert aucs["Cardiomegaly"] > 0.8, aucs  # the largest planted pattern


def test_attention_mining_localises_at_least_as_well_as_cam(trained):
    report = evaluate(workdir=str(trained), run="t")
    assert report["steps"] == [1, 2, 3]
    evaluated = [f for f in BOXED_FINDINGS if report["evaluated"][f] > 0]
    assert len(evaluated) >= 4

    def mean_acc(method):
        return np.mean([report["results"][method][f]["iou"][0.1]["acc"] for f in evaluated])

    assert mean_acc("am-t3") >= mean_acc("cam"), report["markdown"]
    assert (run_dir(trained, "t") / "evaluation.md").read_text().count("| 0.1 |") == 6  # 3 methods, IoU and IoR tables


def test_rerun_skips_finished_steps_and_other_settings_are_refused(trained, tmp_path):
    directory = run_dir(trained, "t")
    before = {p.name: p.stat().st_mtime_ns for p in directory.glob("*.safetensors")}
    config = trained / "settings.json"
    summary = train(workdir=str(trained), preset="cpu-small", config_file=str(config), run="t")
    assert summary["steps"] == [1, 2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in directory.glob("*.safetensors")} == before
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SETTINGS, "epochs": 3}))
    with pytest.raises(ValueError, match="run 't' was started with other settings"):
        train(workdir=str(trained), preset="cpu-small", config_file=str(other), run="t")
