"""The review server under load (issue 38): 20 simulated reviewers (locust) judging boxes and
reading pages for 60 s on loopback; throughput, p50 and p99 latency, errors, and every
acknowledged verdict found in SQLite afterwards.

    python bench/review_load.py [--users 20] [--seconds 60] [--boxes 2000] [--images 200]

Needs locust (``pip install -e '.[bench]'``; `make bench` installs it). A release of ``--boxes``
boxes on ``--images`` phantom-sized images (256 px) is written under bench/out, and
``cxr-miner review``'s own server (storage.releases.review_server, the command's defaults) serves
it in a process of its own on 127.0.0.1 (this script again, with ``--serve``: locust patches the
standard library with gevent, so the server must not share its process). Each reviewer, in a loop
with no wait: asks for the next box of a finding (``/api/next``) and posts a verdict on it (accept,
reject, skip or a redraw; a box whose queue is done is judged again, as a second reviewer would),
and now and then reads the progress (``/api/state``), the page (``/``) and a box's image. Traffic
stays on loopback and stops after ``--seconds``. Writes bench/out/review-load.json.
"""

from __future__ import annotations

import sys

if "--serve" not in sys.argv:  # the load process; the server process stays unpatched (module doc)
    import locust  # noqa: F401

import argparse
import json
import random
import sqlite3
import subprocess
import time
from pathlib import Path

from common import OUT, machine

FINDINGS = ("Atelectasis", "Effusion", "Mass", "Nodule", "Pneumothorax")
SIDE = 256


def make_release(base: Path, n_boxes: int, n_images: int, seed: int = 0) -> tuple[Path, Path]:
    """A release folder of ``n_boxes`` boxes on ``n_images`` images of SIDE px (written once), and
    the images' root."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from cxr_miner.storage.releases.release import BOXES_FILE, release_rows
    from cxr_miner.storage.stages.harvest import PART_SCHEMA

    release, root = base / "releases" / "20261207T000000Z", base / "images"
    if (release / BOXES_FILE).exists():
        return release, root
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{k:05d}.png" for k in range(n_images)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (SIDE, SIDE), dtype=np.uint8)).save(root / name)
    rows = []
    for k in range(n_boxes):
        x0, y0 = (float(v) for v in rng.uniform(0, SIDE / 2, 2))
        w, h = (float(v) for v in rng.uniform(16, SIDE / 2, 2))
        rows.append({
            "image_id": names[k % n_images], "finding": FINDINGS[k % len(FINDINGS)], "rank": 1 + k // n_images,
            "rule_rank": 1 + k // n_images, "x_min": x0, "y_min": y0, "x_max": x0 + w, "y_max": y0 + h,
            "score": float(rng.uniform()), "probability": 0.9, "confidence": float(rng.uniform()),
            "at_operating_point": True, "method": "am", "model_id": "load@0",
        })  # fmt: skip
    images = pa.table({
        "image_id": names, "patient_id": [str(k) for k in range(n_images)], "split": ["train"] * n_images,
        "source_path": names, "width": pa.array([SIDE] * n_images, pa.int32()),
        "height": pa.array([SIDE] * n_images, pa.int32()),
    })  # fmt: skip
    (release / "report").mkdir(parents=True)
    pq.write_table(release_rows(pa.Table.from_pylist(rows, schema=PART_SCHEMA), images), release / BOXES_FILE)
    (release / "report" / "index.html").write_text("<title>report</title>")
    return release, root


def serve(release: Path, root: Path, store: Path) -> None:
    """The server process: the review command's server on a free loopback port; prints its URL and
    write token, then serves until killed."""
    from cxr_miner.storage.releases.review_server import ReviewApp, review_server

    names = sorted(p.name for p in root.iterdir())
    app = ReviewApp(release, root, {n: n for n in names}, store)
    server = review_server(app, "127.0.0.1", 0)
    print(json.dumps({"url": f"http://127.0.0.1:{server.server_address[1]}", "token": app.token}), flush=True)
    server.serve_forever()


def load(url: str, token: str, users: int, seconds: float) -> tuple[dict, list[int]]:
    """locust's figures of ``users`` reviewers against ``url`` for ``seconds``; the sequence numbers
    the server acknowledged."""
    import gevent
    from locust import HttpUser, events, task
    from locust.env import Environment

    acknowledged: list[int] = []

    class Reviewer(HttpUser):
        host = url

        def on_start(self) -> None:
            self.name_ = f"reviewer-{id(self) % 10_000}"
            self.headers = {"X-Review-Token": token, "Origin": url}

        @task(10)
        def judge(self) -> None:
            finding = random.choice(FINDINGS)
            got = self.client.get(f"/api/next?finding={finding}&reviewer={self.name_}", name="/api/next").json()
            box_id = got.get("box_id") or random.choice(BOX_IDS[finding])  # its queue done: judged again
            verdict = random.choice(("accept", "reject", "skip", "redraw"))
            body = {"box_id": box_id, "verdict": verdict, "reviewer": self.name_}
            if verdict == "redraw":
                body["box"] = [10, 10, 100, 90]
            with self.client.post("/api/verdict", json=body, headers=self.headers, catch_response=True) as answer:
                if answer.status_code == 200:
                    acknowledged.append(answer.json()["stored"])
                else:
                    answer.failure(f"{answer.status_code}: {answer.text[:100]}")

        @task(2)
        def progress(self) -> None:
            self.client.get("/api/state", name="/api/state")

        @task(1)
        def page(self) -> None:
            self.client.get("/", name="/")

        @task(1)
        def image(self) -> None:
            finding = random.choice(FINDINGS)
            self.client.get(f"/image/{random.choice(BOX_IDS[finding])}", name="/image/<box_id>")

    environment = Environment(user_classes=[Reviewer], events=events)
    runner = environment.create_local_runner()
    runner.start(users, spawn_rate=users)
    gevent.spawn_later(seconds, runner.quit)
    runner.greenlet.join()
    total = environment.stats.total
    per_route = {
        name: {
            "requests": entry.num_requests,
            "failures": entry.num_failures,
            "p50_ms": entry.get_response_time_percentile(0.5),
            "p99_ms": entry.get_response_time_percentile(0.99),
        }
        for (name, _), entry in sorted(environment.stats.entries.items())
    }
    figures = {
        "requests": total.num_requests,
        "failures": total.num_failures,
        "requests_per_s": total.num_requests / seconds,
        "p50_ms": total.get_response_time_percentile(0.5),
        "p99_ms": total.get_response_time_percentile(0.99),
        "routes": per_route,
        "errors": [str(e.error)[:200] for e in environment.stats.errors.values()],
    }
    return figures, acknowledged


BOX_IDS: dict[str, list[str]] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--boxes", type=int, default=2000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--serve", nargs=3, metavar=("RELEASE", "ROOT", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*(Path(p) for p in args.serve))
        return
    import pyarrow.parquet as pq

    base = OUT / f"review-load-{args.boxes}-{args.images}"
    release, root = make_release(base, args.boxes, args.images)
    table = pq.read_table(release / "boxes.parquet", columns=["box_id", "finding"]).to_pydict()
    for box_id, finding in zip(table["box_id"], table["finding"]):
        BOX_IDS.setdefault(finding, []).append(box_id)
    store = base / f"reviews-{int(time.time())}.sqlite"
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(release), str(root), str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        ready = json.loads(server.stdout.readline())
        figures, acknowledged = load(ready["url"], ready["token"], args.users, args.seconds)
    finally:
        server.terminate()
        server.wait(timeout=30)
    with sqlite3.connect(store) as db:
        stored = {seq for (seq,) in db.execute("SELECT seq FROM verdicts")}
    missing = sorted(set(acknowledged) - stored)
    result = {
        "machine": machine(),
        "users": args.users,
        "seconds": args.seconds,
        "boxes": args.boxes,
        **figures,
        "verdicts_acknowledged": len(acknowledged),
        "verdicts_stored": len(stored),
        "acknowledged_but_missing": len(missing),
    }
    (OUT / "review-load.json").write_text(json.dumps(result, indent=2))
    print(f"{args.users} reviewers for {args.seconds:.0f} s on loopback ({machine()}):")
    print(
        f"  {figures['requests']} requests, {figures['requests_per_s']:.0f}/s, p50 {figures['p50_ms']:.0f} ms, "
        f"p99 {figures['p99_ms']:.0f} ms, {figures['failures']} failed"
    )
    for name, route in per_route_lines(figures["routes"]):
        print(f"  {name:22s} {route}")
    print(f"  verdicts: {len(acknowledged)} acknowledged, {len(stored)} in SQLite, {len(missing)} missing")
    if figures["failures"] or missing:
        raise SystemExit(1)


def per_route_lines(routes: dict) -> list[tuple[str, str]]:
    return [
        (
            name,
            f"{r['requests']:6d} requests, p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms, {r['failures']} failed",
        )
        for name, r in routes.items()
    ]


if __name__ == "__main__":
    main()
