"""A dataset's captions flattened row by row, checked: what retrieval, training and the feature store index by."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import torch


@dataclass
class CaptionPairs:
    """A dataset's captions, flattened row by row.

    Attributes:
        captions (`list[str]`): every caption, `n_captions` of them.
        caption_to_image (`torch.LongTensor` of shape `[n_captions]`): the dataset row of each caption.
        hard_negatives (`list[str]`, *optional*): the hard negative of each caption (aligned with `captions`).
    """

    captions: list[str]
    caption_to_image: torch.Tensor
    hard_negatives: list[str] | None = None


def caption_pairs(dataset: datasets.Dataset, with_hard_negatives: bool = False) -> CaptionPairs:
    """
    Flatten `dataset["captions"]` (and `dataset["hard_negatives"]`) into caption-level lists.

    A row's `hard_negatives` hold one negative per caption (aligned) or one for the whole image, which then stands
    against each of the row's captions.

    Raises:
        `ValueError` naming the row and column of an empty caption, a missing hard negative or a count mismatch.
    """
    if "captions" not in dataset.column_names:
        raise ValueError(f"dataset has no 'captions' column; its columns are {dataset.column_names}")
    if with_hard_negatives and "hard_negatives" not in dataset.column_names:
        raise ValueError(
            f"dataset has no 'hard_negatives' column (its columns are {dataset.column_names}): compositional "
            "evaluation needs a hard negative caption per image or per caption (e.g. the synthetic scenes)"
        )
    columns = ["captions", "hard_negatives"] if with_hard_negatives else ["captions"]
    table = dataset.select_columns(columns)
    captions, owners, negatives = [], [], []
    for row, row_captions in enumerate(table["captions"]):
        if not row_captions:
            raise ValueError(f"dataset row {row}, column 'captions': no caption")
        for caption in row_captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"dataset row {row}, column 'captions': empty or non-string caption {caption!r}")
        captions.extend(row_captions)
        owners.extend([row] * len(row_captions))
    if with_hard_negatives:
        for row, (row_captions, row_negatives) in enumerate(zip(table["captions"], table["hard_negatives"])):
            row_negatives = row_negatives or []
            if len(row_negatives) == 1:
                row_negatives = row_negatives * len(row_captions)
            if len(row_negatives) != len(row_captions):
                raise ValueError(
                    f"dataset row {row}, column 'hard_negatives': {len(row_negatives)} negatives for "
                    f"{len(row_captions)} captions; give one per caption or one per image"
                )
            for negative in row_negatives:
                if not isinstance(negative, str) or not negative.strip():
                    raise ValueError(f"dataset row {row}, column 'hard_negatives': empty negative {negative!r}")
            negatives.extend(row_negatives)
    return CaptionPairs(captions, torch.tensor(owners, dtype=torch.long), negatives if with_hard_negatives else None)


__all__ = ["CaptionPairs", "caption_pairs"]
