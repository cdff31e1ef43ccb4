"""Which examples form each global batch, decided from the seed alone.

Every epoch pairs each image with one of its captions (so an image never meets itself as a negative) and shuffles;
the order depends only on `(seed, epoch)`, so a resumed run sees the batches an uninterrupted one would, and each
process takes its contiguous slice of every global batch, in rank order, as `gather_with_grad` concatenates them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class PairBatches:
    """Global batches of `(image_row, caption_index)` pairs.

    Args:
        caption_counts: number of captions of each image row; caption indices are flat, row by row.
        batch_size: global batch size; the last incomplete batch of an epoch is dropped.
        seed: shuffling seed.
    """

    def __init__(self, caption_counts: Sequence[int], batch_size: int, seed: int):
        if any(count < 1 for count in caption_counts):
            row = next(i for i, count in enumerate(caption_counts) if count < 1)
            raise ValueError(f"dataset row {row} has no caption")
        self.caption_counts = list(caption_counts)
        self.caption_offsets = [0]
        for count in self.caption_counts[:-1]:
            self.caption_offsets.append(self.caption_offsets[-1] + count)
        self.batch_size = batch_size
        self.seed = seed
        if len(self.caption_counts) < batch_size:
            raise ValueError(f"{len(self.caption_counts)} training images are fewer than one batch ({batch_size})")

    @property
    def batches_per_epoch(self) -> int:
        return len(self.caption_counts) // self.batch_size

    def epoch(self, epoch: int) -> list[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.caption_counts), generator=generator).tolist()
        picks = torch.rand(len(order), generator=generator).tolist()
        pairs = [(row, self.caption_offsets[row] + int(p * self.caption_counts[row])) for row, p in zip(order, picks)]
        return [
            pairs[i : i + self.batch_size] for i in range(0, self.batches_per_epoch * self.batch_size, self.batch_size)
        ]


def shard(batch: list, process_index: int, num_processes: int) -> list:
    """This process's contiguous slice of a global batch."""
    if len(batch) % num_processes:
        raise ValueError(f"global batch of {len(batch)} does not divide among {num_processes} processes")
    size = len(batch) // num_processes
    return batch[process_index * size : (process_index + 1) * size]
