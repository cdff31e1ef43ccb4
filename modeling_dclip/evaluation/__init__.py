"""Evaluation of dual encoders: image-text retrieval, compositional accuracy and zero-shot classification."""

from .compositional import compositional_accuracy, compositional_accuracy_from_embeddings
from .retrieval import RECALL_AT_K, retrieval_metrics, retrieval_metrics_from_embeddings
from .templates import get_classnames, get_templates
from .zeroshot import build_zeroshot_classifier, zeroshot_classification


__all__ = [
    "RECALL_AT_K",
    "build_zeroshot_classifier",
    "compositional_accuracy",
    "compositional_accuracy_from_embeddings",
    "get_classnames",
    "get_templates",
    "retrieval_metrics",
    "retrieval_metrics_from_embeddings",
    "zeroshot_classification",
]
