"""`align_base`: LiT-style contrastive alignment of two pretrained towers into the base dual encoder.

With the image tower locked (the default), its pooled features are computed once and cached, and only the text
tower, the projections and the temperature train, as in LiT ("locked-image tuning"). With the text tower locked
too (`train_text_tower: false`, the fast CPU preset), its pooled features are cached as well and an epoch trains
only the two projections and the temperature."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch import nn

from ..encoding import tokenize
from ..feature_store import FeatureStore
from ..loading import load_dual_encoder
from ..losses import ContrastiveLoss
from ..modeling_dclip import DCLIPModel
from ..processing_dclip import DCLIPProcessor
from .batching import PairBatches
from .checkpointing import save_model_atomically
from .config import AlignConfig
from .data import CaptionTable, load_split, pixel_values_of
from .freezing import keep_frozen_norms_in_eval, unlock_last_blocks
from .loop import make_accelerator, train


def set_image_size(processor: DCLIPProcessor, image_size: int | None) -> None:
    """Resize and crop images to `image_size` pixels (a smaller size trades accuracy for speed on CPU)."""
    if image_size:
        processor.image_processor.size = {"shortest_edge": image_size}
        processor.image_processor.crop_size = {"height": image_size, "width": image_size}


class AlignStep(nn.Module):
    """One LiT step: cached (or live, when unlocked) image features and live text features, symmetric InfoNCE."""

    def __init__(self, model: DCLIPModel):
        super().__init__()
        self.model = model
        self.loss = ContrastiveLoss()

    def train(self, mode: bool = True) -> AlignStep:
        super().train(mode)
        keep_frozen_norms_in_eval(self.model)
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if "image_features" in batch:
            image = self.model.visual_projection(batch["image_features"])
        else:
            image = self.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        if "text_features" in batch:
            text = self.model.text_projection(batch["text_features"])
        else:
            text = self.model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).pooler_output
        terms = self.loss({"image_embeds": image, "text_embeds": text, "logit_scale": self.model.logit_scale.exp()})
        terms["loss"] = terms["contrastive"]
        return terms


def build_base(config: AlignConfig) -> tuple[DCLIPModel, DCLIPProcessor]:
    if config.init_from:
        return load_dual_encoder(config.init_from)
    model = DCLIPModel.from_vision_text_pretrained(
        config.vision_model, config.text_model, projection_dim=config.projection_dim
    )
    processor = DCLIPProcessor.from_vision_text_pretrained(
        config.vision_model, config.text_model, regions=config.region_config
    )
    return model, processor


def align_base(
    config: AlignConfig,
    train_dataset: datasets.Dataset | None = None,
    evaluate: Callable[[DCLIPModel, DCLIPProcessor], dict[str, float]] | None = None,
    store: FeatureStore | None = None,
) -> Path:
    """Train the base dual encoder and save it (with its processor) to `config.output_dir`.

    Args:
        config: see [`AlignConfig`].
        train_dataset: a dataset in the canonical schema; defaults to `config.data`'s `train_split`.
        evaluate: `(model, processor) -> metrics`, run after each epoch to select the best weights
            (`modeling_dclip.evaluation.validator` builds one).
        store: where the locked towers' features are cached (default `FeatureStore()`).

    Returns:
        `config.output_dir`.
    """
    store = store if store is not None else FeatureStore()
    accelerator = make_accelerator(config)
    model, processor = build_base(config)
    set_image_size(processor, config.image_size)
    train_rows = train_dataset if train_dataset is not None else load_split(config.data, config.train_split)
    table = CaptionTable.from_dataset(train_rows)

    model.requires_grad_(False)
    for parameter in (model.visual_projection.weight, model.text_projection.weight, model.logit_scale):
        parameter.requires_grad_(True)
    unlock_last_blocks(model.vision_model, config.unlock_vision_blocks)
    if config.train_text_tower:
        unlock_last_blocks(model.text_model, config.unlock_text_layers)

    image_features = text_tower_features = None
    with accelerator.main_process_first():
        if config.unlock_vision_blocks == 0:
            image_features = store.image_tower_features(model, processor, train_rows, config.eval_batch_size)
        if not config.train_text_tower:
            text_tower_features = store.text_tower_features(model, processor, table.captions)

    def collate(pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows, captions = [row for row, _ in pairs], [caption for _, caption in pairs]
        if text_tower_features is not None:
            batch = {"text_features": text_tower_features[captions]}
        else:
            batch = tokenize(processor, [table.captions[caption] for caption in captions])
        if image_features is not None:
            batch["image_features"] = image_features[rows]
        else:
            batch["pixel_values"] = pixel_values_of(processor, train_rows, rows)
        return batch

    validate = (lambda trained: evaluate(trained, processor)) if evaluate is not None else None
    batches = PairBatches(table.counts, config.batch_size, config.seed)
    trained, summary = train(accelerator, AlignStep(model), config, batches, collate, validate, "align_base")
    if accelerator.is_main_process:
        save_model_atomically(trained, processor, config.output_dir, {"stage": "align_base", **summary})
    accelerator.wait_for_everyone()
    return Path(config.output_dir)
