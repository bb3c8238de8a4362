"""Training efficiency: the real training step fed from shards through the DataLoader, divided
by the same step fed with batches already in memory as tensors, measured in one run.

Both sides run miner.training.train_epoch with the same model, loss, batch size and input
size; only the source of the batches differs. Epochs alternate (shards, memory, shards,
memory, ...) after one warm-up epoch of each, and the ratio of the summed times is printed.

    python bench/train_efficiency.py [--images 512] [--preset cpu-small] [--device auto]

On a GPU (``--preset paper --device cuda``) it also gives the absolute images per second.
"""

from __future__ import annotations

import argparse
import json

from common import OUT, demo_collection, machine


def build_shards(n_images: int, size: int):
    from cxr_miner.storage.stages.batches import list_row_groups
    from cxr_miner.storage.stages.shards import ShardSettings, build_shard, plan_shards

    root = demo_collection(2000)
    shard_dir = OUT / f"train-shards-{n_images}-{size}"
    names = sorted(root.glob("images_*/images/*.png"))[:n_images]
    rows = [
        {
            "image_id": p.name,
            "patient_id": p.name[:8],
            "split": "train",
            "source_path": str(p.relative_to(root)),
            "findings": [],
            "has_box": False,
            "view_position": "PA",
            "age": 50,
            "sex": "F",
        }
        for p in names
    ]
    settings = ShardSettings(size=size)
    paths = [build_shard(spec, root, shard_dir, settings).path for spec in plan_shards(rows, shard_size=256)]
    return list_row_groups(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=512)
    parser.add_argument("--preset", default="cpu-small")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import torch

    from cxr_miner.flows.engine.loader import shard_loader
    from cxr_miner.miner.models import create_model
    from cxr_miner.miner.training import make_optimizer, pick_device, plain_loss, preset, train_epoch
    from cxr_miner.storage.stages.batches import batch_stream

    config = preset(args.preset).updated({"device": args.device})
    device = pick_device(config.device)
    groups = build_shards(args.images, args.shard_size)
    torch.manual_seed(0)
    model = create_model(config.model).to(
        device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format
    )
    optimizer, scheduler = make_optimizer(model, config, config.lr, 100, 100)
    loader = shard_loader(
        groups, config.batch_size, shuffle=True, workers=config.loader_workers, pin_memory=device.type == "cuda"
    )
    in_memory = [
        {"images": torch.from_numpy(b.images), "labels": torch.from_numpy(b.labels).float()}
        for b in batch_stream(groups, config.batch_size, shuffle=True, seed=0)
    ]

    def epoch(batches):
        stats = train_epoch(model, batches, plain_loss, optimizer, scheduler, config, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return stats

    epoch(loader), epoch(in_memory)  # warm-up: worker start, allocator, cuDNN autotune
    shards_s = memory_s = 0.0
    images = 0
    for _ in range(args.rounds):
        a = epoch(loader)
        b = epoch(in_memory)
        shards_s, memory_s, images = shards_s + a.seconds, memory_s + b.seconds, images + a.images
    result = {
        "machine": machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "preset": args.preset,
        "model": config.model.to_dict(),
        "input_size": config.input_size,
        "batch_size": config.batch_size,
        "loader_workers": config.loader_workers,
        "shard_size": args.shard_size,
        "images_per_epoch": images // args.rounds,
        "shards_images_per_s": round(images / shards_s, 2),
        "memory_images_per_s": round(images / memory_s, 2),
        "efficiency": round(memory_s / shards_s, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
