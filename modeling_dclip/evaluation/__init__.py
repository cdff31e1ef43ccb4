"""Evaluation of dual encoders: image-text retrieval, compositional accuracy and zero-shot classification."""

from ..data.captions import CaptionPairs, caption_pairs
from .compositional import compositional_accuracy, compositional_accuracy_from_embeddings
from .model_eval import (
    TASKS,
    TaskInputs,
    dataset_classnames,
    evaluate_model,
    load_model_for_evaluation,
    prepare_task_inputs,
    supported_tasks,
)
from .retrieval import RECALL_AT_K, retrieval_metrics, retrieval_metrics_from_embeddings
from .templates import get_classnames, get_templates
from .validation import validator
from .zeroshot import build_zeroshot_classifier, zeroshot_classification

__all__ = [
    "RECALL_AT_K",
    "TASKS",
    "CaptionPairs",
    "TaskInputs",
    "build_zeroshot_classifier",
    "caption_pairs",
    "compositional_accuracy",
    "compositional_accuracy_from_embeddings",
    "dataset_classnames",
    "evaluate_model",
    "get_classnames",
    "get_templates",
    "load_model_for_evaluation",
    "prepare_task_inputs",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "supported_tasks",
    "validator",
    "zeroshot_classification",
]
