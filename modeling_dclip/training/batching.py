"""Which examples form each global batch, decided from the seed alone.

Every epoch pairs each image with one of its captions (so an image never meets itself as a negative) and shuffles;
the order depends only on `(seed, epoch)` (`set_epoch`, which accelerate's prepared data loader calls), so a resumed
run sees the batches an uninterrupted one would. With several processes accelerate gives each process its contiguous
slice of every global batch, in rank order (`split_batches=True`), as `gather_with_grad` concatenates them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class PairOrder(Sampler[int]):
    """The caption indices of an epoch's pairs, in the epoch's order: each image once, with one of its captions.

    Args:
        caption_counts: number of captions of each image row; caption indices are flat, row by row.
        seed: shuffling seed.
    """

    def __init__(self, caption_counts: Sequence[int], seed: int):
        if any(count < 1 for count in caption_counts):
            row = next(i for i, count in enumerate(caption_counts) if count < 1)
            raise ValueError(f"dataset row {row} has no caption")
        self.caption_counts = list(caption_counts)
        self.caption_offsets = [0]
        for count in self.caption_counts[:-1]:
            self.caption_offsets.append(self.caption_offsets[-1] + count)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.caption_counts)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.caption_counts), generator=generator).tolist()
        picks = torch.rand(len(order), generator=generator).tolist()
        for row, pick in zip(order, picks):
            yield self.caption_offsets[row] + int(pick * self.caption_counts[row])


class PairBatches(BatchSampler):
    """The global batches of each epoch, as caption indices into [`pairs`]; the last incomplete batch is dropped.

    Use it as a `DataLoader`'s `batch_sampler` over `pairs`, which turns caption index `c` into the pair
    `(image_row, c)`.

    Args:
        caption_counts: number of captions of each image row.
        batch_size: global batch size.
        seed: shuffling seed.
    """

    sampler: PairOrder

    def __init__(self, caption_counts: Sequence[int], batch_size: int, seed: int):
        super().__init__(PairOrder(caption_counts, seed), batch_size, drop_last=True)
        if len(self.sampler) < batch_size:
            raise ValueError(f"{len(self.sampler)} training images are fewer than one batch ({batch_size})")
        offsets = self.sampler.caption_offsets
        self.pairs = [
            (row, caption)
            for row, count in enumerate(caption_counts)
            for caption in range(offsets[row], offsets[row] + count)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
