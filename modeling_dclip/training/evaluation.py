"""Held-out evaluation of the base, the teacher and the student during training: every task the evaluation set
has the columns for (retrieval, compositional accuracy, zero-shot with the "simple" template), computed by
`modeling_dclip.evaluation.evaluate_model`."""

from __future__ import annotations

import datasets

from ..evaluation import evaluate_model, supported_tasks
from .features import Features


def evaluate_dual_encoder(model, processor, dataset: datasets.Dataset, batch_size: int = 64) -> dict[str, float]:
    """Metrics of a dual encoder (`DCLIPModel`) on a dataset in the canonical schema."""
    return evaluate_model(model, processor, dataset, supported_tasks(dataset), batch_size=batch_size)


def evaluate_teacher(
    teacher, processor, dataset: datasets.Dataset, regions: Features, max_pairs_per_step: int = 4096
) -> dict[str, float]:
    """Metrics of the teacher, which scores every (text, image) pair with its enriched embeddings.

    Args:
        regions: the frozen base's region features of `dataset`'s images (cached; `region_features` or
            `modeling_dclip.data.region_cache.region_embeddings`).
    """
    return evaluate_model(
        teacher,
        processor,
        dataset,
        supported_tasks(dataset),
        region_features=regions,
        max_pairs_per_step=max_pairs_per_step,
    )
