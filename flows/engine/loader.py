"""torch DataLoaders over shards: a thin adapter around storage.stages.batches (which has no torch)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cxr_miner.storage.stages.batches import RowGroup, batch_stream
from cxr_miner.storage.vocab.letterbox import Letterbox
from cxr_miner.storage.vocab.lifetime import die_with_parent

# (image ids, letterboxes) of a batch -> extra tensors of the batch, by name
Targets = Callable[[list[str], list[Letterbox]], dict[str, torch.Tensor]]


class ShardBatches(IterableDataset):
    """Yields {"images": uint8 (B, S, S), "labels": float (B, C)}, plus what ``targets(image ids,
    letterboxes)`` gives (MIL's patch labels, miner.mil.PatchLabels) when set; each loader worker
    reads its own row groups (storage.stages.batches.batch_stream).

    Each full pass is one epoch: the epoch number starts at ``start_epoch`` and counts up
    with every ``iter()``, in the main process and in each persistent worker alike, so the
    shuffle of epoch e is the same whether a run went straight through or resumed at e.
    """

    def __init__(
        self,
        groups: Sequence[RowGroup],
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        start_epoch: int = 0,
        targets: Targets | None = None,
    ) -> None:
        self.groups, self.batch_size, self.shuffle, self.seed = list(groups), batch_size, shuffle, seed
        self.epoch, self.targets = start_epoch, targets

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        part, parts = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, self.epoch = self.epoch, self.epoch + 1
        for batch in batch_stream(
            self.groups, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=epoch, part=part, parts=parts
        ):
            extra = self.targets(batch.meta["image_id"], batch.letterboxes()) if self.targets is not None else {}
            yield {"images": torch.from_numpy(batch.images), "labels": torch.from_numpy(batch.labels).float(), **extra}


def shard_loader(
    groups: Sequence[RowGroup],
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    seed: int = 0,
    start_epoch: int = 0,
    pin_memory: bool = False,
    targets: Targets | None = None,
) -> DataLoader:
    """A DataLoader of whole batches (batching happens in the dataset, by row group).

    Workers are spawned, not forked, and kept for the loader's life, so the start-up is
    paid once. A forked child of a process that runs a Prefect flow exits with status 1:
    Prefect's log worker leaves a ``threading._register_atexit`` hook that its after-fork
    reset does not remove, and that hook fails an assertion in the child's shutdown
    (prefect 3.8.8). Spawning is also what CUDA needs.
    """
    dataset = ShardBatches(groups, batch_size, shuffle, seed, start_epoch, targets)
    workers = min(workers, len(groups))
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=bool(workers),
        multiprocessing_context="spawn" if workers else None,
        worker_init_fn=partial(start_worker, os.getpid()) if workers else None,
    )


def start_worker(parent_pid: int, worker_id: int) -> None:
    """A loader worker leaves the command's process group: a signal sent to the whole group
    (Ctrl-C in a terminal, ``timeout``) would kill it before the command's own clean stop, which
    then fails as "DataLoader worker killed by signal". The command ends its workers as it stops
    (signals sent to the worker itself still reach it); a worker whose parent ``parent_pid`` is
    gone, even by SIGKILL, dies at once (storage.vocab.lifetime; torch's own watch of the parent
    takes up to 5 s)."""
    os.setpgid(0, 0)
    die_with_parent(parent_pid)
