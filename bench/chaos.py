"""The chaos run (issue 38): `cxr-miner run` on demo data killed at random moments across all its
stages, rerun after each, and at the end the same release an uninterrupted run makes.

    python bench/chaos.py [--kills 20] [--images 160] [--size 256] [--seed 0] [--signal both]

A demo collection (``--images`` phantoms of ``--size`` px, 20% boxed, 2 corrupt files) goes
through an uninterrupted ``run`` first (the reference; its duration sets the span the kill moments
are drawn from). Then episodes, each from a fresh work and releases folder: ``run`` is started and
killed at a moment drawn uniformly from 1 s to the reference's duration (seeded), with SIGKILL or
SIGTERM in turn (``--signal both``; or only one kind), started again and killed again, up to
KILLS_PER_EPISODE times or until a run ends before its moment; then run to the end. (One chain
killed 20 times would be done after a few: its reruns keep what is finished.) Episodes follow until
``--kills`` kills have hit a running command. Each command is a user's: its own temporary Prefect
API (a shared PREFECT_HOME), a local Dask cluster of 2 workers. After each kill: every process the
command had started is gone within 10 s (those alive just before the kill, its temporary Prefect
server included). After each episode:

- its latest release's boxes.parquet equals the reference's, row for row (schema metadata and the
  ``model_id`` column aside: it hashes the checkpoint files, whose metadata keeps each epoch's
  seconds), and every checkpoint holds the reference's weights, tensor for tensor;
- no ``*.tmp`` file or ``.staging-*`` folder is left, and the work and releases folders' locks are
  free; at the end, no process of any command is left.

Prints each kill point (the seconds in, the signal, the stage the command was in by its log) and
what the next run found (its log lines that say a stage's work was kept, resumed or redone), then
the checks; writes bench/out/chaos.json. A training run of the tests' size (cpu-small settings,
a ResNet-10, 6 epochs at 128 px) keeps it within about half an hour on 2 cores.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from common import OUT, machine

# The tests' shared run, a little shorter: the chaos is in the stops, not in the learning.
SETTINGS = {"epochs": 6, "am_steps": 2, "am_epochs": 1, "loader_workers": 1, "model": {"trunk": "resnet10"}}
GONE_WITHIN_S = 10
KILLS_PER_EPISODE = 3  # an episode's chain is killed at most this often before it is run to the end
STAGES = ("start-up", "ingest", "preprocess", "train", "evaluate", "harvest", "release", "done")
# What a rerun says of the work it finds: kept, resumed, skipped, or removed half-done.
REDONE = re.compile(r"kept|resum|skip|removed|reus|already|nothing to do|up to date", re.IGNORECASE)


def user_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}


def command(root: Path, work: Path, out: Path, config: Path) -> list[str]:
    cli = [sys.executable, "-c", "from cxr_miner.flows.cli import main; main()"]
    return [
        *cli, "run", str(root), "--workdir", str(work), "--out", str(out), "--preset", "cpu-small",
        "--config", str(config), "--size", "128", "--shard-size", "32", "--workers", "2",
    ]  # fmt: skip


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def stage_of(log: str) -> str:
    """The last stage whose flow run the log shows beginning."""
    begun = re.findall(r"for flow '([a-z-]+)'", log)
    return begun[-1] if begun else "start-up"


def kill_at(words: list[str], env: dict, delay: float, signum: int, log_path: Path) -> dict:
    """Start ``words``, send ``signum`` ``delay`` s in (to the command alone, as kill does); the
    kill point and whether its processes went within GONE_WITHIN_S."""
    with log_path.open("w") as log:
        process = subprocess.Popen(words, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started = time.monotonic()
        while time.monotonic() - started < delay and process.poll() is None:
            time.sleep(0.1)
        if process.poll() is not None:  # it finished first: this point hit nothing
            return {
                "delay_s": round(delay, 1),
                "signal": "none",
                "stage": "done",
                "exit": process.returncode,
                "left": [],
            }
        helpers = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signum)
        process.wait(timeout=120)
    deadline = time.monotonic() + GONE_WITHIN_S
    while (left := [p for p in helpers if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    left_lines = [" ".join(p.cmdline())[:100] for p in left if alive(p)]
    for p in left:
        p.kill()
    return {
        "delay_s": round(delay, 1),
        "signal": signal.Signals(signum).name,
        "stage": stage_of(log_path.read_text()),
        "exit": process.returncode,
        "helpers": len(helpers),
        "left": left_lines,
    }


def finish(words: list[str], env: dict, log_path: Path) -> float:
    started = time.monotonic()
    with log_path.open("w") as log:
        done = subprocess.run(words, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(words[3:6])} failed ({done.returncode}); see {log_path}")
    return time.monotonic() - started


def redone(log: str) -> list[str]:
    """The lines of a rerun's log that say what it found done or half-done."""
    lines = [line.split(" - ", 1)[-1].strip() for line in log.splitlines() if REDONE.search(line)]
    return [line[:140] for line in lines if "temporary server" not in line][:12]


def boxes(release: Path):
    """The latest release's boxes.parquet without its ``model_id`` column (and schema metadata):
    model_id hashes the checkpoint files, which hold each epoch's seconds beside the weights, so
    a retrained run gets another id for the same weights (compared apart: same_weights)."""
    import pyarrow.parquet as pq

    table = pq.read_table(release / "latest" / "boxes.parquet").replace_schema_metadata(None)
    return table.drop_columns(["model_id"])


def same_weights(work: Path, calm_work: Path) -> bool:
    """Whether every checkpoint of the two work folders holds the same tensors: the models', and
    the resume states' (``*-last``: weights and optimiser) but for their random generators'
    states (``rng.*``), which a resumed run leaves elsewhere (a data loader made again after the
    resume draws its workers' base seed once more; the batches are seeded by epoch, so the weights
    do not move)."""
    import numpy as np
    from safetensors.numpy import load_file

    mine, theirs = (sorted((w / "models").rglob("*.safetensors")) for w in (work, calm_work))
    if [p.relative_to(work) for p in mine] != [p.relative_to(calm_work) for p in theirs]:
        return False
    for a, b in zip(mine, theirs):
        x, y = load_file(a), load_file(b)
        names = [k for k in x if not k.startswith("rng.")]
        if x.keys() != y.keys() or not all(np.array_equal(x[k], y[k]) for k in names):
            return False
    return True


def recheck(base: Path, calm_out: Path) -> None:
    """The checks of every episode of bench/out/chaos.json again, from its folders (``--recheck``)."""
    result = json.loads((OUT / "chaos.json").read_text())
    for entry in result["episodes"]:
        work, out = base / f"episode-{entry['episode']}-work", base / f"episode-{entry['episode']}-releases"
        entry |= {
            "same_boxes": boxes(out).equals(boxes(calm_out)),
            "same_weights": same_weights(work, base / "calm-work"),
            "leftovers": leftovers(work, out),
            "locks_free": lock_free(work) and lock_free(out),
        }
    checks = episode_checks(result["episodes"], result["points"], stray=[])
    result["checks"], result["rechecked"] = checks, True
    for name, ok in checks.items():
        print(f"{'holds' if ok else 'FAILS'}: {name}")
    (OUT / "chaos.json").write_text(json.dumps(result, indent=2))


def episode_checks(episodes: list[dict], points: list[dict], stray: list[str]) -> dict[str, bool]:
    return {
        "every episode's boxes equal the uninterrupted run's, row for row": all(e["same_boxes"] for e in episodes),
        "every episode's checkpoints hold the uninterrupted run's weights": all(e["same_weights"] for e in episodes),
        "every kill's processes gone within 10 s": all(not p["left"] for p in points),
        "no process left at the end": not stray,
        "no temporary file or staging folder left": all(not e["leftovers"] for e in episodes),
        "the locks are free": all(e["locks_free"] for e in episodes),
    }


def lock_free(folder: Path) -> bool:
    lock = folder / ".cxr-miner.lock"
    if not lock.exists():
        return True
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        found += [str(p) for p in folder.rglob("*.tmp")] + [str(p) for p in folder.glob(".staging-*")]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", choices=("both", "kill", "term"), default="both")
    parser.add_argument("--recheck", action="store_true", help="only the checks of bench/out/chaos.json's episodes")
    args = parser.parse_args()
    from cxr_miner.storage.phantoms.generator import generate

    base = OUT / f"chaos-{args.images}-{args.size}-{args.seed}"
    if args.recheck:
        recheck(base, base / "calm-releases")
        return
    root, home, config = base / "nih", base / "prefect-home", base / "settings.json"
    if not (root / "demo_manifest.json").exists():
        generate(root, n_images=args.images, size=args.size, seed=args.seed, box_fraction=0.2, corrupt=2, workers=2)
    config.write_text(json.dumps(SETTINGS))
    env = user_env(home)
    calm_work, calm_out = base / "calm-work", base / "calm-releases"
    if not (calm_out / "latest").exists() or read_text(base / "calm-code.txt") != code_state():
        fresh(calm_work, calm_out)  # the reference must come from this very code
        calm_s = finish(command(root, calm_work, calm_out, config), env, base / "calm.log")
        (base / "calm-seconds.txt").write_text(f"{calm_s:.1f}")
        (base / "calm-code.txt").write_text(code_state())
    calm_s = float((base / "calm-seconds.txt").read_text())
    print(f"uninterrupted run: {calm_s:.0f} s ({machine()})")

    rng = random.Random(args.seed)
    kinds = {"both": (signal.SIGKILL, signal.SIGTERM), "kill": (signal.SIGKILL,), "term": (signal.SIGTERM,)}
    points: list[dict] = []
    episodes: list[dict] = []
    started = time.monotonic()
    while len(points) < args.kills:
        episodes.append(
            episode(
                base, len(episodes), root, config, env, calm_out, calm_s, rng, kinds[args.signal], points, args.kills
            )
        )
    stray = [" ".join(p.info["cmdline"] or [])[:100] for p in psutil.process_iter(["cmdline"])
             if str(base) in " ".join(p.info["cmdline"] or [])]  # fmt: skip
    checks = episode_checks(episodes, points, stray)
    for name, ok in checks.items():
        print(f"{'holds' if ok else 'FAILS'}: {name}")
    sigkills = sum(p["signal"] == "SIGKILL" for p in points)
    stages = sorted({p["stage"] for p in points}, key=lambda s: STAGES.index(s) if s in STAGES else 99)
    print(f"{len(points)} kills ({sigkills} SIGKILL) in {len(episodes)} episodes, {time.monotonic() - started:.0f} s;"
          f" stages hit: {', '.join(stages)}")  # fmt: skip
    result = {"machine": machine(), "images": args.images, "uninterrupted_s": calm_s, "points": points,
              "episodes": episodes, "checks": checks, "stages_hit": stages}  # fmt: skip
    (OUT / "chaos.json").write_text(json.dumps(result, indent=2))
    if not all(checks.values()):
        raise SystemExit(1)


def code_state() -> str:
    """The commit and the uncommitted changes of flows/, miner/ and storage/: the uninterrupted
    reference is made again when they change (another code's boxes are no reference)."""
    repo = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    changes = subprocess.run(
        ["git", "diff", "HEAD", "--", "flows", "miner", "storage"], cwd=repo, capture_output=True, text=True
    ).stdout
    return f"{head} {hashlib.sha256(changes.encode()).hexdigest()[:12]}"


def read_text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def fresh(*folders: Path) -> None:
    for folder in folders:
        if folder.exists():
            subprocess.run(["chmod", "-R", "u+w", str(folder)], check=True)  # releases are read-only
            subprocess.run(["rm", "-rf", str(folder)], check=True)


def episode(
    base: Path, number: int, root: Path, config: Path, env: dict, calm_out: Path, calm_s: float,
    rng: random.Random, kinds: tuple, points: list[dict], kills: int,
) -> dict:  # fmt: skip
    """One chain from a fresh work folder: killed at a random moment, rerun and killed again (at
    most KILLS_PER_EPISODE times, or until a run finishes before its moment), then run to the end;
    its release against the uninterrupted one's. Appends its kill points to ``points``."""
    work, out = base / f"episode-{number}-work", base / f"episode-{number}-releases"
    fresh(work, out)
    words = command(root, work, out, config)
    finished = False
    for attempt in range(KILLS_PER_EPISODE):
        if len(points) >= kills:
            break
        signum = kinds[len(points) % len(kinds)]
        log = base / f"episode-{number}-attempt-{attempt}.log"
        point = kill_at(words, env, rng.uniform(1.0, calm_s), signum, log)
        found = redone(log.read_text()) if attempt else []
        if point["stage"] == "done":
            if point["exit"] != 0:
                raise SystemExit(f"episode {number}: a rerun failed ({point['exit']}); see {log}")
            finished = True
            print(f"episode {number}, attempt {attempt + 1}: finished before its moment ({point['delay_s']} s)")
            break
        point |= {"episode": number, "attempt": attempt + 1, "rerun_found": found}
        points.append(point)
        print(
            f"kill {len(points):2d} (episode {number}, attempt {attempt + 1}): {point['delay_s']:6.1f} s in, "
            f"{point['signal']:7s} in {point['stage']:10s} -> exit {point.get('exit')}, {point.get('helpers', 0)} "
            f"helpers, left: {point['left'] or 'none'}"
        )
        for line in found:
            print(f"           this run found: {line}")
    if not finished:
        final_s = finish(words, env, base / f"episode-{number}-final.log")
        found = redone((base / f"episode-{number}-final.log").read_text())
        print(f"episode {number}: final run {final_s:.0f} s; it found: " + ("; ".join(found) or "nothing"))
    same, weights = boxes(out).equals(boxes(calm_out)), same_weights(work, calm_out.parent / "calm-work")
    result = {"episode": number, "same_boxes": same, "same_weights": weights, "leftovers": leftovers(work, out),
              "locks_free": lock_free(work) and lock_free(out)}  # fmt: skip
    print(f"episode {number}: boxes {'equal' if same else 'DIFFER from'} the uninterrupted run's, weights "
          f"{'equal' if weights else 'DIFFER'}; leftovers: {result['leftovers'] or 'none'}; "
          f"locks free: {result['locks_free']}")  # fmt: skip
    return result


if __name__ == "__main__":
    main()
