"""Harvest efficiency and memory: the harvest flow against a bare forward loop, in one run.

- Efficiency: images per second of the harvest flow (Dask tasks per shard, models loaded once
  per worker, heatmaps, boxes, parts written) divided by images per second of a bare loop in
  one process that does only the step models' forward passes over the same shards with the
  same models and batch size. Like for like: the flow on one Dask worker with all the cores'
  torch threads, the loop with the same threads. The flow's Dask cluster is started, and a
  warm-up harvest run, before the clock starts. The flow is timed as it runs on a CPU (each
  batch boxed after its forward passes) and with ``overlap`` (boxed in a thread during the next
  batch's passes, the GPU default). The flow's default layout on a CPU (one
  single-threaded worker per core) is timed too, as the speed users get, against the bare loop
  at the same layout (as many processes of one torch thread, each taking a shard at a time).
- Memory: the peak resident memory of the whole process tree (this process, the Dask
  scheduler, nannies and workers, sampled every 50 ms) while harvesting N and 4N images.

The models are randomly initialised (a cpu-small run with the preset's architecture): the work
per image does not depend on the weights.

    python bench/harvest_efficiency.py [--images 512] [--shard-size 256] [--preset cpu-small] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import OUT, PeakMemory, demo_collection, machine, prefect_api


def make_workdir(images: int, shard_size: int, size: int) -> Path:
    from cxr_miner.flows.ingest import ingest
    from cxr_miner.flows.preprocess import run_preprocess

    root = demo_collection(images, size=512, seed=3)
    work = OUT / f"harvest-work-{images}-{size}"
    if not (work / "shards" / "manifest.json").exists():
        ingest(root=str(root), workdir=str(work))
        run_preprocess(str(work), workers=2, size=size, shard_size=shard_size)
    return work


def random_run(work: Path, preset_name: str, device: str) -> list:
    """A run folder ``bench`` with T randomly initialised step checkpoints; returns the models."""
    import torch

    from cxr_miner.flows.engine.checkpoints import load_model, save_checkpoint
    from cxr_miner.miner.models import create_model
    from cxr_miner.miner.training import preset
    from cxr_miner.storage.stages.runs import RunFolder

    config = preset(preset_name).updated({"device": device})
    folder = RunFolder.of(work, "bench")
    try:
        folder.start(config.to_dict(), work)
    except ValueError:  # a cached run of an older config or code: its random models are worth nothing
        shutil.rmtree(folder.directory)
        folder.start(config.to_dict(), work)
    for step in range(1, config.am_steps + 1):
        if not folder.step(step).exists():
            torch.manual_seed(step)
            save_checkpoint(folder.step(step), create_model(config.model), {"config": config.to_dict(), "step": step})
    return [load_model(folder.step(s))[0] for s in range(1, config.am_steps + 1)]


def bare_loop(
    work: Path, models: list, batch_size: int, preset_name: str, device_name: str, shards: list[str] | None = None
) -> float:
    """Seconds for the step models' forward passes over every shard image (or those of the shard
    files ``shards``), nothing else."""
    import torch

    from cxr_miner.miner.training import autocast, pick_device, prepare_images, preset
    from cxr_miner.storage.stages.batches import batch_stream, list_row_groups
    from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader

    config = preset(preset_name).updated({"device": device_name})
    device = pick_device(config.device)
    models = [m.to(device) for m in models]
    groups = list_row_groups(shards if shards is not None else ShardReader(work / SHARD_DIR).paths)
    started = time.perf_counter()
    with torch.no_grad(), autocast(device, config.precision):
        for batch in batch_stream(groups, batch_size):
            x = prepare_images(torch.from_numpy(batch.images), config.input_size, device)
            for model in models:
                model(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


_BARE_MODELS: list = []  # in each process of bare_parallel: the bench run's step models


def _load_bare_models(work: Path, preset_name: str) -> None:
    import torch

    from cxr_miner.flows.engine.checkpoints import load_model
    from cxr_miner.miner.training import preset
    from cxr_miner.storage.stages.runs import RunFolder

    torch.set_num_threads(1)
    folder = RunFolder.of(work, "bench")
    _BARE_MODELS[:] = [load_model(folder.step(step))[0] for step in range(1, preset(preset_name).am_steps + 1)]


def _bare_shard(work: Path, batch_size: int, preset_name: str, device_name: str, shard: str) -> float:
    return bare_loop(work, _BARE_MODELS, batch_size, preset_name, device_name, [shard])


def bare_parallel(work: Path, batch_size: int, preset_name: str, device_name: str, workers: int) -> float:
    """Seconds of the bare loop at the flow's CPU layout: ``workers`` processes of one torch
    thread, each with the models loaded once, taking a shard at a time as Dask gives the flow's
    workers their tasks; timed from the first shard given out to the last done (the processes'
    start and model loading before, as the flow's warm cluster has them before its clock)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cxr_miner.storage.stages.shards import SHARD_DIR, ShardReader

    shards = [str(path) for path in ShardReader(work / SHARD_DIR).paths]
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_load_bare_models,
        initargs=(work, preset_name),
    ) as pool:
        list(pool.map(time.sleep, [3.0] * workers))  # every process started and its models loaded
        started = time.perf_counter()
        list(pool.map(_bare_shard, *zip(*[(work, batch_size, preset_name, device_name, shard) for shard in shards])))
        return time.perf_counter() - started


def timed_harvest(
    work: Path, address: str, batch_size: int, threads: int, overlap: bool | None = None
) -> tuple[float, dict]:
    from cxr_miner.flows.dask import dask_task_runner
    from cxr_miner.flows.harvest import harvest

    shutil.rmtree(work / "harvest", ignore_errors=True)
    started = time.perf_counter()
    summary = harvest.with_options(task_runner=dask_task_runner(address=address))(
        workdir=str(work), run="bench", batch_size=batch_size, threads=threads, overlap=overlap
    )
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument(
        "--size", type=int, default=None, help="shard image side, px (default: 512 for paper, else 256)"
    )
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import dask
    import torch
    from distributed import LocalCluster

    from cxr_miner.flows.dask import LOCAL_WORKER_CONFIG, default_workers

    args.size = args.size or (512 if args.preset == "paper" else 256)
    result = {"machine": machine(), "preset": args.preset, "batch_size": args.batch_size, "shard_px": args.size}
    cores = default_workers()
    with prefect_api(), dask.config.set(LOCAL_WORKER_CONFIG):
        for scale in (1, 4):
            work = make_workdir(args.images * scale, args.shard_size, args.size)
            models = random_run(work, args.preset, args.device)
            if scale == 1:
                torch.set_num_threads(cores)
                with LocalCluster(n_workers=1, threads_per_worker=1, processes=True) as cluster:
                    timed_harvest(
                        work, cluster.scheduler_address, args.batch_size, cores
                    )  # warm-up: imports, model loads
                    flow_s, summary = timed_harvest(work, cluster.scheduler_address, args.batch_size, cores)
                    overlapped_s, _ = timed_harvest(
                        work, cluster.scheduler_address, args.batch_size, cores, overlap=True
                    )
                bare_s = bare_loop(work, models, args.batch_size, args.preset, args.device)
                images = summary["images"]
                result.update(
                    {
                        "images": images,
                        "torch_threads": cores,
                        "flow_images_per_s": round(images / flow_s, 2),
                        "bare_forward_images_per_s": round(images / bare_s, 2),
                        "efficiency": round(bare_s / flow_s, 3),
                        "flow_overlapped_images_per_s": round(images / overlapped_s, 2),
                        "efficiency_overlapped": round(bare_s / overlapped_s, 3),
                        "device": torch.cuda.get_device_name()
                        if torch.cuda.is_available() and args.device != "cpu"
                        else "cpu",
                    }
                )
            with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True) as cluster:
                threads = max(1, cores // args.workers)
                if scale == 1:
                    timed_harvest(work, cluster.scheduler_address, args.batch_size, threads)
                    default_s, _ = timed_harvest(work, cluster.scheduler_address, args.batch_size, threads)
                    result[f"flow_{args.workers}_workers_images_per_s"] = round(images / default_s, 2)
                    if args.device != "cuda":
                        parallel_s = bare_parallel(work, args.batch_size, args.preset, args.device, args.workers)
                        result[f"bare_{args.workers}_processes_images_per_s"] = round(images / parallel_s, 2)
                        result["efficiency_default_layout"] = round(parallel_s / default_s, 3)
                    print(json.dumps(result, indent=2), flush=True)
                with PeakMemory() as peak:
                    timed_harvest(work, cluster.scheduler_address, args.batch_size, threads)
            result[f"peak_rss_mib_{scale}x"] = round(peak.peak / 2**20)
            result[f"images_{scale}x"] = args.images * scale
    result["peak_ratio_4x_1x"] = round(result["peak_rss_mib_4x"] / result["peak_rss_mib_1x"], 3)
    print(json.dumps(result, indent=2))
    (OUT / "harvest_efficiency.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
