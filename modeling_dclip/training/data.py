"""Training data: a split of a canonical dataset, its captions flattened, and the tensors the stages read."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import torch

from ..data.captions import caption_pairs
from ..data.spec import load_dataset_spec
from ..encoding import load_images_at, pixel_values

logger = logging.getLogger(__name__)


def load_split(spec, split: str) -> datasets.Dataset:
    """Rows of `split` from the dataset a spec names (see `modeling_dclip.data.spec`), or a given `Dataset`.

    A dataset whose rows all belong to one other split is used whole, with a warning, so that a single-split spec
    (`synthetic:?n=200`, an image folder) can be trained on directly.
    """
    dataset = spec if isinstance(spec, datasets.Dataset) else load_dataset_spec(spec)
    if "split" not in dataset.column_names:
        return dataset
    splits = dataset.unique("split")
    if split in splits:
        return dataset.filter(lambda value: value == split, input_columns="split")
    if len(splits) == 1:
        logger.warning("dataset %s has no %r split; using all its rows (split %r)", spec, split, splits[0])
        return dataset
    raise ValueError(f"dataset {spec} has no split {split!r}; its splits are {sorted(splits)}")


@dataclass
class CaptionTable:
    """The captions of a dataset, flattened row by row.

    Attributes:
        captions: every caption, `[n_captions]`.
        caption_to_image: the image row of each caption, `[n_captions]`.
        counts: captions per image row.
    """

    captions: list[str]
    caption_to_image: torch.Tensor
    counts: list[int]

    @classmethod
    def from_dataset(cls, dataset: datasets.Dataset) -> CaptionTable:
        """Raises `ValueError` naming the row of an empty caption (through `caption_pairs`)."""
        pairs = caption_pairs(dataset)
        counts = torch.bincount(pairs.caption_to_image, minlength=len(dataset)).tolist()
        return cls(pairs.captions, pairs.caption_to_image, counts)


def pixel_values_of(processor, dataset: datasets.Dataset, rows: list[int]) -> torch.Tensor:
    """Preprocessed images of `rows`, `[len(rows), 3, H, W]`."""
    return pixel_values(processor, load_images_at(dataset, rows))
