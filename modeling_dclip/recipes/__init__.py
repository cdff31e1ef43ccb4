"""The seeds' other training recipes, as loss terms and helpers for the distillation loop: ConaCLIP's interaction
graph (`conaclip`), Knowledge-CLIP's language-model teacher and concept learning (`knowledge_clip`), and two-stage
dual-encoder compression (`compression`). Importing this package registers their loss terms and named recipes with
`modeling_dclip.losses`."""

from .compression import (
    COMPRESSION_STAGE1,
    COMPRESSION_STAGE2,
    big_model_targets,
    compress_student,
    parameter_counts,
    reduce_vocabulary,
    select_blocks,
    select_layers,
    unknown_token_rate,
    vocabulary_tokens,
)
from .conaclip import CONACLIP, EDGES, LOSS_KINDS, conaclip_weights, edge_loss
from .knowledge_clip import (
    KNOWLEDGE_CLIP,
    ConceptLearningLoss,
    TextEmbeddingDistillationLoss,
    TextTeacher,
    fit_concept_centroids,
    knowledge_clip_options,
    knowledge_clip_recipe,
    knowledge_clip_targets,
    soft_concept_labels,
)

__all__ = [
    "CONACLIP",
    "COMPRESSION_STAGE1",
    "COMPRESSION_STAGE2",
    "EDGES",
    "KNOWLEDGE_CLIP",
    "LOSS_KINDS",
    "ConceptLearningLoss",
    "TextEmbeddingDistillationLoss",
    "TextTeacher",
    "big_model_targets",
    "compress_student",
    "conaclip_weights",
    "edge_loss",
    "fit_concept_centroids",
    "knowledge_clip_options",
    "knowledge_clip_recipe",
    "knowledge_clip_targets",
    "parameter_counts",
    "reduce_vocabulary",
    "select_blocks",
    "unknown_token_rate",
    "vocabulary_tokens",
    "select_layers",
    "soft_concept_labels",
]
