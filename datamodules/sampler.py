"""A batch sampler that splits whole batches across ranks without padding or duplicates.

Lightning's default `DistributedSampler` pads the dataset so every rank gets the same number of
items, which scores some edit cases twice, and it deals out single items, so which cases share a
batch (and, in sequential editing, which K edits share one model state) changes with the world
size. Here the batches are fixed first, as consecutive runs of `batch_size` indices, and batch j goes
to rank j % world_size: one process and N processes score exactly the same batches, each once.

Ranks may therefore get one batch more or fewer than each other. That is safe for evaluation as long
as nothing in a step waits on the other ranks (metric states are synced once at the end of the
epoch); the Trainer must run with `use_distributed_sampler=False` so Lightning keeps this sampler.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler


def batch_bounds(num_items: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of every batch; the last batch may be short."""
    return [(start, min(start + batch_size, num_items)) for start in range(0, num_items, batch_size)]


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields the batches of indices that belong to `rank` out of `world_size`.

    Args:
        num_items: dataset length.
        batch_size: items per batch; the batch composition depends only on this and `num_items`.
        rank: this process's global rank, 0 <= rank < world_size.
        world_size: number of processes.
    """

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world_size: int = 1) -> None:
        if num_items < 0:
            raise ValueError(f"num_items must be >= 0, got {num_items}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_items = num_items
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._bounds = batch_bounds(num_items, batch_size)[rank::world_size]

    @property
    def num_batches_total(self) -> int:
        return -(-self.num_items // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self._bounds:
            yield list(range(start, stop))

    def __len__(self) -> int:
        return len(self._bounds)
