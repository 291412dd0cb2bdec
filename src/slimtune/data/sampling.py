"""The training order: a shuffle that depends on (seed, epoch) alone, split by global batch over ranks, resumable.

Why not the samplers torch and torchdata ship: their shuffle draws from one generator that every `iter()` advances, so
a run resumed mid-epoch (which creates iterators in another order) shuffles the following epochs differently from the
run it continues; and `DistributedSampler` deals samples to ranks round-robin, so the global batch of N processes is
not the batch one process would draw. Here epoch `e` is always the permutation of `Generator(seed + e)`, global batch
`g` is always `perm[g*B*W:(g+1)*B*W]` (rank `r` takes its `r`-th slice of `B`), and the iterator's state is
(epoch, samples yielded): resuming from any checkpoint continues the uninterrupted run's exact sequence, and W
processes of batch B see the batches one process of batch W*B sees.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils.data import DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """Per-rank indices of a seeded per-epoch shuffle, cut into global batches of ``batch_size * world_size``.

    Derives from `DistributedSampler` so Lightning leaves it in place under DDP/DeepSpeed/FSDP (it splits the data
    itself). ``drop_last``: drop the final global batch when it is not full (always, with several ranks: every rank
    must run the same number of steps).
    """

    def __init__(self, length: int, batch_size: int, seed: int = 42, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"GlobalBatchSampler batch_size={batch_size}, rank={rank}, world_size={world_size} "
                             "are not valid; valid: batch_size > 0 and 0 <= rank < world_size")
        self.length = int(length)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.rank = int(rank)
        self.num_replicas = self.world_size = int(world_size)
        self.drop_last = bool(drop_last) or self.world_size > 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int) -> list[int]:
        """Every index of this rank for `epoch`, in the order they are yielded."""
        if self.shuffle:
            perm = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        else:
            perm = list(range(self.length))
        global_batch = self.batch_size * self.world_size
        full, rest = divmod(self.length, global_batch)
        indices = []
        for g in range(full):
            start = g * global_batch + self.rank * self.batch_size
            indices.extend(perm[start:start + self.batch_size])
        if rest and not self.drop_last:  # one process only: the last, smaller batch
            indices.extend(perm[full * global_batch:])
        return indices

    def __len__(self) -> int:
        global_batch = self.batch_size * self.world_size
        full, rest = divmod(self.length, global_batch)
        return full * self.batch_size + (0 if self.drop_last else rest)

    def __iter__(self) -> Iterator[int]:
        return _EpochIterator(self, self.epoch)


class _EpochIterator:
    """Iterator over one epoch; torchdata's StatefulDataLoader saves and restores it (state: epoch, yielded)."""

    def __init__(self, sampler: GlobalBatchSampler, epoch: int, yielded: int = 0):
        self.sampler = sampler
        self._start(epoch, yielded)

    def _start(self, epoch: int, yielded: int) -> None:
        self.epoch, self.yielded = int(epoch), int(yielded)
        self.indices = self.sampler.order(self.epoch)

    def __iter__(self) -> Iterator[int]:
        return self

    def __next__(self) -> int:
        if self.yielded >= len(self.indices):
            raise StopIteration
        self.yielded += 1
        return self.indices[self.yielded - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._start(state["epoch"], state["yielded"])
        if self.yielded >= len(self.indices):
            # Saved after the epoch's last batch (Lightning checkpoints on that batch's end, and on resume keeps the
            # iterator it restored for the following epoch): continue with the next epoch, as the run would have.
            self._start(self.epoch + 1, 0)
