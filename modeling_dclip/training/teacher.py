"""`train_teacher`: the teacher's cross-modal fusion, trained with a symmetric InfoNCE on cached base features.

Two objectives (`TeacherConfig.objective`):

- `"pairwise"` (default): every image of the batch is fused with every caption of the batch, and the teacher's
  score of a (caption, image) pair is the cosine of that pair's enriched embeddings, `S [B, B]`, exactly what
  `DCLIPTeacherModel.score_pairs` ranks with at evaluation. InfoNCE runs over the rows and the columns of `S`.
- `"paired"` (the DCLIP paper's formulation): each image is fused with its own caption only, and InfoNCE runs
  between the enriched image of pair i and the enriched text of pair j. It is B times cheaper, but it trains
  embeddings the teacher never produces at evaluation (an image is read there with every caption, not only its
  own) and the enriched image embedding carries its own caption, so the positives are easy to tell apart.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..encoding import IMAGE_FEATURES, TEXT_FEATURES, gather_pairs
from ..feature_store import DatasetBoxes, FeatureStore, region_source_from_config
from ..loading import load_dual_encoder
from ..losses import ContrastiveLoss, gather_with_grad
from ..modeling_dclip import DCLIPTeacherModel
from ..processing_dclip import DCLIPProcessor
from .batching import PairBatches
from .checkpointing import save_model_atomically
from .config import TeacherConfig
from .data import CaptionTable, load_split
from .loop import make_accelerator, train

TEACHER_OBJECTIVES = ("pairwise", "paired")
Features = dict[str, torch.Tensor]


def pairwise_contrastive_loss(
    teacher: DCLIPTeacherModel, images: Features, texts: Features, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over the teacher's scores of every (caption, image) pair of the global batch.

    Args:
        images: this process's `B` images, the image inputs of `DCLIPTeacherModel.fuse` (`[B, ...]`).
        texts: this process's `B` captions, caption k belonging to image k (`[B, ...]`).
        logit_scale: inverse temperature.

    Returns:
        The loss: each caption must pick its image among all images of the global batch, and each image its
        caption among all captions. With several processes every process scores its own captions against all
        images and its own images against all captions (the inputs are gathered; they are cached features, so no
        gradient crosses processes), so the mean of the processes' losses is the single-process loss of the
        global batch.
    """
    local = len(texts["text_states"])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        labels = torch.arange(local, device=logit_scale.device)
        scores = teacher.score_pairs(**images, **texts, max_pairs_per_step=local * local)
        rows, columns = scores, scores.t()
    else:
        all_images = {key: gather_with_grad(value) for key, value in images.items()}
        all_texts = {key: gather_with_grad(value) for key, value in texts.items()}
        pairs = local * len(all_texts["text_states"])
        labels = torch.arange(local, device=logit_scale.device) + dist.get_rank() * local
        rows = teacher.score_pairs(**all_images, **texts, max_pairs_per_step=pairs)  # [B, global batch]
        columns = teacher.score_pairs(**images, **all_texts, max_pairs_per_step=pairs).t()  # [B, global batch]
    return (F.cross_entropy(logit_scale * rows, labels) + F.cross_entropy(logit_scale * columns, labels)) / 2


class TeacherStep(nn.Module):
    """One teacher step over cached features of paired examples, with the configured objective (module
    docstring) at the teacher's temperature (learnable when its config says so)."""

    def __init__(self, teacher: DCLIPTeacherModel, objective: str = "pairwise"):
        super().__init__()
        if objective not in TEACHER_OBJECTIVES:
            raise ValueError(f"teacher objective must be one of {TEACHER_OBJECTIVES}, got {objective!r}")
        self.model = teacher
        self.objective = objective
        self.loss = ContrastiveLoss()

    def forward(self, batch: Features) -> dict[str, torch.Tensor]:
        logit_scale = self.model.log_inverse_temperature.exp()
        if self.objective == "pairwise":
            images = {key: batch[key] for key in IMAGE_FEATURES}
            texts = {key: batch[key] for key in TEXT_FEATURES}
            terms = {"contrastive": pairwise_contrastive_loss(self.model, images, texts, logit_scale)}
        else:
            image, text, _ = self.model.fuse(**batch)
            terms = self.loss({"image_embeds": image, "text_embeds": text, "logit_scale": logit_scale})
        terms["loss"] = terms["contrastive"]
        return terms


def build_teacher(config: TeacherConfig) -> tuple[DCLIPTeacherModel, DCLIPProcessor]:
    """The teacher over the frozen `config.base_model`, and its processor, whose `region_config` records where the
    teacher's regions come from (`config.regions`, or `{"type": "dataset", ...}` with `use_dataset_boxes`): every
    later use of the teacher (its distillation targets, its evaluation) reads its regions from there."""
    base, processor = load_dual_encoder(config.base_model)
    if config.use_dataset_boxes:
        processor.region_config = DatasetBoxes().to_dict()
    elif config.regions:
        processor.region_config = dict(config.regions)
    processor._region_extractor = None
    teacher = DCLIPTeacherModel.from_backbone(
        base,
        fusion_dim=config.fusion_dim,
        num_fusion_layers=config.num_fusion_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        dropout=config.dropout,
        temperature=config.temperature,
        learnable_temperature=config.learnable_temperature,
    )
    return teacher, processor


def train_teacher(
    config: TeacherConfig,
    train_dataset: datasets.Dataset | None = None,
    evaluate: Callable[[DCLIPTeacherModel, DCLIPProcessor], dict[str, float]] | None = None,
    store: FeatureStore | None = None,
) -> Path:
    """Train the teacher's fusion over the frozen `config.base_model` and save it to `config.output_dir`.

    Region embeddings and text token states of the frozen base are computed once in the feature store (default
    `FeatureStore()`); an epoch then costs only the fusion's forward and backward. `evaluate(teacher, processor)`
    runs after each epoch when given.
    """
    if config.objective not in TEACHER_OBJECTIVES:
        raise ValueError(f"TeacherConfig.objective must be one of {TEACHER_OBJECTIVES}, got {config.objective!r}")
    store = store if store is not None else FeatureStore()
    accelerator = make_accelerator(config)
    teacher, processor = build_teacher(config)
    train_rows = train_dataset if train_dataset is not None else load_split(config.data, config.train_split)
    table = CaptionTable.from_dataset(train_rows)
    source = region_source_from_config(processor.region_config)
    with accelerator.main_process_first():
        regions = store.region_features(teacher, processor, train_rows, source)
        texts = store.text_token_features(teacher, processor, table.captions)

    def collate(pairs: list[tuple[int, int]]) -> Features:
        rows = torch.tensor([row for row, _ in pairs])
        captions = torch.tensor([caption for _, caption in pairs])
        return gather_pairs(regions, texts, rows, captions)

    validate = (lambda trained: evaluate(trained, processor)) if evaluate is not None else None
    step = TeacherStep(teacher, config.objective)
    batches = PairBatches(table.counts, config.batch_size, config.seed)
    trained, summary = train(accelerator, step, config, batches, collate, validate, "train_teacher")
    if accelerator.is_main_process:
        save_model_atomically(trained, processor, config.output_dir, {"stage": "train_teacher", **summary})
    accelerator.wait_for_everyone()
    return Path(config.output_dir)
