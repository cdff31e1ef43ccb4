"""Where a recipe's per-caption targets come from: the interface through which every recipe runs in
`distill_student` unchanged.

A [`TargetSource`] provides some `teacher_*` inputs of the loss terms (one row per training caption), computed
once through the feature store, and may size the loss terms from them (`loss_options`). `distill_student` asks
every registered source whose inputs the recipe's weighted terms read (`losses.required_inputs`); a new recipe
registers its loss terms (`losses.register_loss_term`) and, when it needs targets no source provides, its source
([`register_target_source`]).

Built in:
- `teacher_model`: `teacher_image_embeds` / `teacher_text_embeds` (DCLIP, ConaCLIP, compression). A DCLIP teacher
  gives its fused embeddings of each (image, caption) pair over the regions it was trained with; any other dual
  encoder (a `DCLIPModel`, a CLIP checkpoint) its own embeddings of the pair's image and caption.
- `text_teacher_model`: Knowledge-CLIP's `teacher_lm_text_embeds` / `teacher_concept_labels`, from a language model,
  with its projection and concept head sized from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
from transformers import AutoConfig

from ..feature_store import FeatureStore, digest, model_fingerprint, texts_fingerprint
from ..loading import load_model_and_processor
from ..losses import required_inputs, resolve_recipe
from ..modeling_dclip import DCLIPTeacherModel
from ..processing_dclip import DCLIPProcessor
from ..recipes.knowledge_clip import (
    CONCEPT_LABELS,
    LM_EMBEDS,
    TextTeacher,
    knowledge_clip_options,
    knowledge_clip_targets,
)
from .config import DistillConfig
from .data import CaptionTable

Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TargetSource:
    """A provider of per-caption targets.

    Attributes:
        name: the config field naming the source's model (reported when it is missing).
        provides: the `outputs` keys it fills, each `[n_captions, ...]`.
        compute: `(config, dataset, captions, store) -> targets`.
        loss_options: `(term weights, student width, targets) -> {term: options}` for terms sized from the targets.
    """

    name: str
    provides: tuple[str, ...]
    compute: Callable[[DistillConfig, datasets.Dataset, CaptionTable, FeatureStore], Features]
    loss_options: Callable[[dict[str, float], int, Features], dict[str, dict]] | None = None


TARGET_SOURCES: dict[str, TargetSource] = {}


def register_target_source(source: TargetSource) -> None:
    """Make `source` available to every recipe whose terms read what it provides."""
    TARGET_SOURCES[source.name] = source


def is_dclip_teacher(folder: str) -> bool:
    """Whether the model saved in `folder` is a DCLIP teacher (rather than a dual encoder), from its config."""
    return AutoConfig.from_pretrained(folder).model_type == DCLIPTeacherModel.config_class.model_type


def _teacher_targets(
    config: DistillConfig, dataset: datasets.Dataset, table: CaptionTable, store: FeatureStore
) -> Features:
    if not config.teacher_model:
        raise ValueError(
            f"distill_student: the recipe {config.loss_weights} needs a teacher, but teacher_model is empty"
        )
    if is_dclip_teacher(config.teacher_model):
        teacher = DCLIPTeacherModel.from_pretrained(config.teacher_model).eval()
        processor = DCLIPProcessor.from_pretrained(config.teacher_model)
        return store.teacher_targets(teacher, processor, dataset, table.captions, table.caption_to_image)
    model, processor = load_model_and_processor(config.teacher_model)
    images = store.image_embeddings(model, processor, dataset)
    texts = store.text_embeddings(model, processor, table.captions)
    return {"teacher_image_embeds": images[table.caption_to_image], "teacher_text_embeds": texts}


def _text_teacher_targets(
    config: DistillConfig, dataset: datasets.Dataset, table: CaptionTable, store: FeatureStore
) -> Features:
    if not config.text_teacher_model:
        raise ValueError("distill_student: the recipe has Knowledge-CLIP terms, but text_teacher_model is empty")
    teacher = TextTeacher.from_pretrained(config.text_teacher_model)
    parts = {
        "model": model_fingerprint(teacher),
        "texts": texts_fingerprint(table.captions),
        "num_concepts": config.num_concepts,
        "temperature": config.concept_temperature,
        "seed": config.seed,
        "tokenizer": digest(sorted(teacher.tokenizer.get_vocab().items())),
    }
    return store.load_or_compute(
        "text_teacher_targets",
        parts,
        lambda: knowledge_clip_targets(
            teacher, table.captions, config.num_concepts, temperature=config.concept_temperature, seed=config.seed
        ),
    )


def _knowledge_clip_options(weights: dict[str, float], student_dim: int, targets: Features) -> dict[str, dict]:
    return knowledge_clip_options(weights, student_dim, targets[LM_EMBEDS].shape[1], targets[CONCEPT_LABELS].shape[1])


register_target_source(TargetSource("teacher_model", ("teacher_image_embeds", "teacher_text_embeds"), _teacher_targets))
register_target_source(
    TargetSource("text_teacher_model", (LM_EMBEDS, CONCEPT_LABELS), _text_teacher_targets, _knowledge_clip_options)
)


def recipe_targets(
    config: DistillConfig, dataset: datasets.Dataset, table: CaptionTable, store: FeatureStore, student_dim: int
) -> tuple[Features, dict[str, dict]]:
    """The targets the recipe `config.loss_weights` reads, from every source that provides some of them, and the
    loss options sized from them (`config.loss_options` on top).

    Raises:
        ValueError: a weighted term reads a `teacher_*` input that no registered source provides.
    """
    needed = {key for key in required_inputs(config.loss_weights) if key.startswith("teacher_")}
    targets: Features = {}
    options: dict[str, dict] = {}
    weights = resolve_recipe(config.loss_weights)
    for source in TARGET_SOURCES.values():
        if needed & set(source.provides):
            found = source.compute(config, dataset, table, store)
            targets.update(found)
            if source.loss_options is not None:
                options.update(source.loss_options(weights, student_dim, found))
    missing = sorted(needed - set(targets))
    if missing:
        raise ValueError(f"distill_student: no target source provides {missing}; sources: {sorted(TARGET_SOURCES)}")
    for name, extra in config.loss_options.items():
        options[name] = {**options.get(name, {}), **extra}
    return targets, options


__all__ = ["TARGET_SOURCES", "TargetSource", "is_dclip_teacher", "recipe_targets", "register_target_source"]
