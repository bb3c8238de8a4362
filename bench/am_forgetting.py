"""Does an AM step forget (issue 23, part 3)? AM settings varied on one trained step 1, each
step's validation ROC AUC per finding against step 1's.

    python bench/am_forgetting.py --workdir bench/out/demo-seed0/work [--base cpu-demo] [--only NAME,NAME]

Every variant copies the base run's step 1 (one classifier for all), trains AM steps 2..T with
its own settings (VARIANTS) and prints, per finding, step 1's validation AUC and the change at
each later step [its 90% interval, paired over a bootstrap of the val images], with the findings
that fell by more than the forgetting tolerance. The base
run's own steps are read, not retrained. Results go to bench/out/am_forgetting.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import OUT, machine, prefect_api, undefined

# "base" is the workdir's own run as it was trained. Before issue 23's fix N_A of Eq. 4 normalised
# by its running statistics (kp_norm running); every variant but kp-batch names that, as it was tried.
VARIANTS: dict[str, dict] = {
    "warmup-8": {"am_warmup_steps": 8, "kp_norm": "running"},
    "lr-half": {"am_lr": 2.5e-4, "kp_norm": "running"},
    "lambda-1": {"kp_lambda": 1.0, "kp_norm": "running"},
    "lambda-2": {"kp_lambda": 2.0, "kp_norm": "running"},
    "lambda-4": {"kp_lambda": 4.0, "kp_norm": "running"},
    # control: fine-tuning on at the AM rate with (almost) nothing erased and no KP
    "no-erasure": {"kp": "vanilla", "erased_fraction": 0.01, "kp_norm": "running"},
    "kp-running": {"kp_norm": "running"},
    "kp-batch": {"kp_norm": "batch"},
    # AM steps by SGD with momentum (the paper preset's optimiser, at its AM rate) where step 1 trained by AdamW:
    # the guess was that a fresh AdamW moves every weight by about its rate, gradient or not. It moved the
    # weights less and forgot more (BENCHMARKS.md, issue 23, third pass)
    "am-sgd": {"am_optimizer": "sgd", "am_lr": 0.01},
    "am-sgd-0.03": {"am_optimizer": "sgd", "am_lr": 0.03},
}


def signed(value: float | None) -> str:
    return "-" if undefined(value) else f"{value:+.3f}"


def train_variant(workdir: Path, base: str, name: str) -> tuple[str, float]:
    """Copy ``base``'s step 1 into run ``base-name`` and train its AM steps; (run, seconds)."""
    from cxr_miner.flows.train import train
    from cxr_miner.storage.stages.runs import RunFolder

    source, run = RunFolder.of(workdir, base), f"{base}-{name}"
    folder = RunFolder.of(workdir, run)
    folder.directory.mkdir(parents=True, exist_ok=True)
    for last in (False, True):
        shutil.copy(source.step(1, last), folder.step(1, last))
    config = workdir / f"{run}.json"
    config.write_text(json.dumps({**source.config(), **VARIANTS[name]}))
    started = time.perf_counter()
    train(workdir=str(workdir), preset="cpu-demo", config_file=str(config), run=run)
    return run, time.perf_counter() - started


def step_changes(workdir: Path, run: str) -> dict[str, dict]:
    """step<t> -> its last epoch's auc_against_step1 and forgotten findings (metrics.json)."""
    from cxr_miner.storage.stages.runs import RunFolder

    metrics = RunFolder.of(workdir, run).metrics()
    return {
        name: {"changes": rows[-1]["auc_against_step1"], "forgotten": rows[-1]["forgotten"]}
        for name, rows in metrics.items()
        if name != "step1"
    }


def change_intervals(
    workdir: Path, run: str, resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """step<t> -> finding -> 90% interval of (step t's validation AUC - step 1's), paired over a
    bootstrap of the val images (the same resample scores both models)."""
    import numpy as np
    import torch

    from cxr_miner.flows.engine.checkpoints import load_model
    from cxr_miner.flows.engine.loader import shard_loader
    from cxr_miner.miner.metrics import roc_auc
    from cxr_miner.miner.training import TrainConfig, predict
    from cxr_miner.storage.stages.batches import split_row_groups
    from cxr_miner.storage.stages.runs import RunFolder
    from cxr_miner.storage.vocab.findings import FINDINGS

    folder, device = RunFolder.of(workdir, run), torch.device("cpu")
    config = TrainConfig.from_dict(folder.config())
    val = split_row_groups(workdir, ("val",))
    scores = {}
    for step in range(1, config.am_steps + 1):
        model, _ = load_model(folder.step(step), device)
        predicted, labels = predict(
            model, shard_loader(val, config.batch_size, shuffle=False, workers=0), config, device
        )
        scores[step] = predicted.numpy()
    labels = labels.numpy()
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(resamples)]
    out = {}
    for step in range(2, config.am_steps + 1):
        out[f"step{step}"] = {}
        for c, finding in enumerate(FINDINGS):
            changes = [
                roc_auc(scores[step][d, c], labels[d, c]) - roc_auc(scores[1][d, c], labels[d, c]) for d in draws
            ]
            changes = [x for x in changes if not np.isnan(x)]
            out[f"step{step}"][finding] = (
                [float(np.percentile(changes, 5)), float(np.percentile(changes, 95))] if changes else []
            )
    return out


def weight_moves(workdir: Path, run: str) -> dict[str, float]:
    """step<t> -> ||theta_t - theta_1|| / ||theta_1|| over the learnt weights (BatchNorm's
    running statistics left out): how far each AM step moved the classifier."""
    import torch

    from cxr_miner.flows.engine.checkpoints import load_model
    from cxr_miner.miner.training import TrainConfig
    from cxr_miner.storage.stages.runs import RunFolder

    folder = RunFolder.of(workdir, run)
    config = TrainConfig.from_dict(folder.config())
    weights = {
        step: dict(load_model(folder.step(step), torch.device("cpu"))[0].named_parameters())
        for step in range(1, config.am_steps + 1)
    }
    first = weights[1]
    size = sum(float(p.detach().pow(2).sum()) for p in first.values()) ** 0.5
    return {
        f"step{step}": sum(float((p.detach() - first[n].detach()).pow(2).sum()) for n, p in weights[step].items())
        ** 0.5
        / size
        for step in range(2, config.am_steps + 1)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--base", default="cpu-demo")
    parser.add_argument("--only", default=",".join(VARIANTS))
    args = parser.parse_args()

    results_file = OUT / "am_forgetting.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    with prefect_api():
        for name in ["base", *filter(None, args.only.split(","))]:
            run, seconds = (args.base, float("nan")) if name == "base" else train_variant(args.workdir, args.base, name)
            results[f"{args.workdir}:{name}"] = {
                "variant": name,
                "settings": VARIANTS.get(name, {}),
                "am_seconds": seconds,
                "steps": step_changes(args.workdir, run),
                "intervals": change_intervals(args.workdir, run),
                "moved": weight_moves(args.workdir, run),
            }
            results_file.write_text(json.dumps(results, indent=2))
        for key, result in results.items():  # results of an older version of this script
            if key.startswith(f"{args.workdir}:") and "intervals" not in result:
                name = result["variant"]
                try:
                    result["intervals"] = change_intervals(
                        args.workdir, args.base if name == "base" else f"{args.base}-{name}"
                    )
                except (
                    FileNotFoundError,
                    ValueError,
                ) as error:  # a run removed, or of settings this code no longer has
                    print(f"{name}: no intervals ({error})")
                    continue
                results_file.write_text(json.dumps(results, indent=2))

    print(f"\nvalidation AUC per finding: step 1, then the change at each AM step ({machine()}, {args.workdir})")
    for key, result in results.items():
        if not key.startswith(f"{args.workdir}:"):
            continue
        steps = result["steps"]
        print(
            f"\n{result['variant']} {result['settings']}: forgotten { ({s: v['forgotten'] for s, v in steps.items()}) }"
        )
        if "moved" in result:
            print(
                "  weights moved from step 1 (relative): "
                + ", ".join(f"{s} {v:.4f}" for s, v in result["moved"].items())
            )
        first = next(iter(steps.values()))["changes"]
        for finding in first:
            intervals = result.get("intervals", {})
            cells = ", ".join(
                signed(steps[s]["changes"][finding]["change"])
                + (" [{:+.3f}, {:+.3f}]".format(*intervals[s][finding]) if intervals.get(s, {}).get(finding) else "")
                for s in steps
            )
            step1 = first[finding]["step1"]
            print(f"  {finding:20s} {'-' if undefined(step1) else f'{step1:.3f}'}: {cells}")


if __name__ == "__main__":
    main()
