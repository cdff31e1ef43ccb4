"""Evaluation of dual encoders: image-text retrieval, compositional accuracy and zero-shot classification."""

from .compositional import compositional_accuracy, compositional_accuracy_from_embeddings
from .model_eval import (
    TASKS,
    CaptionPairs,
    TaskInputs,
    caption_pairs,
    dataset_classnames,
    encode_images,
    encode_texts,
    evaluate_model,
    load_model_for_evaluation,
    prepare_task_inputs,
    supported_tasks,
)
from .retrieval import RECALL_AT_K, retrieval_metrics, retrieval_metrics_from_embeddings
from .templates import get_classnames, get_templates
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
    "encode_images",
    "encode_texts",
    "evaluate_model",
    "get_classnames",
    "get_templates",
    "load_model_for_evaluation",
    "prepare_task_inputs",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "supported_tasks",
    "zeroshot_classification",
]
