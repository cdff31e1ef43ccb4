"""Held-out validation during training: the `evaluate(model, processor)` callable the training stages take."""

from __future__ import annotations

from collections.abc import Callable

import datasets

from ..feature_store import FeatureStore
from .model_eval import evaluate_model, is_teacher, supported_tasks

Validator = Callable[..., dict[str, float]]


def validator(dataset: datasets.Dataset, batch_size: int = 64, store: FeatureStore | None = None) -> Validator:
    """`evaluate(model, processor) -> metrics` on `dataset` for every task it has the columns for (retrieval,
    compositional accuracy, zero-shot with the "simple" template).

    A dual encoder changes every epoch, so its embeddings are computed afresh; the teacher's region features and
    token states come from its frozen base, so they are read from `store` (when given) after the first epoch.
    """
    tasks = supported_tasks(dataset)

    def evaluate(model, processor) -> dict[str, float]:
        return evaluate_model(
            model, processor, dataset, tasks, batch_size=batch_size, store=store if is_teacher(model) else None
        )

    return evaluate


__all__ = ["Validator", "validator"]
