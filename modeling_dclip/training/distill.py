"""`distill_student`: the student, initialised from the base, trained with a loss recipe (DCLIP's hybrid by
default) against teacher targets computed once and cached; optional LoRA (peft) and WiSE-FT interpolation.

Every recipe of `modeling_dclip.recipes` runs here unchanged, only its targets differ (see [`DistillConfig`]): DCLIP
(the teacher's fused embeddings), ConaCLIP (any frozen dual encoder's embeddings), Knowledge-CLIP (a language
model's caption embeddings and K-means concepts; its projection and concept head are parameters of the recipe, so
they train with the student and are not saved with it), two-stage compression (`compress` builds the smaller
student; stage 1 distils from the big model, stage 2 fine-tunes contrastively)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from torch import nn

from ..encoding import tokenize
from ..feature_store import FeatureStore
from ..loading import load_dual_encoder
from ..losses import LossRecipe
from ..modeling_dclip import DCLIPModel
from ..processing_dclip import DCLIPProcessor
from ..recipes import compress_student, parameter_counts
from .batching import PairBatches
from .checkpointing import save_model_atomically
from .config import DistillConfig
from .data import CaptionTable, load_split, pixel_values_of
from .freezing import freeze_by_patterns, keep_frozen_norms_in_eval
from .loop import make_accelerator, train
from .targets import recipe_targets

logger = logging.getLogger(__name__)


class DistillStep(nn.Module):
    """One student step: the student's embeddings of paired examples, the cached teacher targets, the recipe."""

    def __init__(self, student: nn.Module, recipe: LossRecipe, logit_scale: float, freeze_batchnorm: bool = True):
        super().__init__()
        self.model = student
        self.freeze_batchnorm = freeze_batchnorm
        self.recipe = recipe
        self.fixed_logit_scale = logit_scale

    def train(self, mode: bool = True) -> DistillStep:
        super().train(mode)
        keep_frozen_norms_in_eval(self.model)
        if self.freeze_batchnorm:
            # Small fine-tuning batches would wreck the pretrained running statistics.
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = self.model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = self.model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        logit_scale = (
            self.model.logit_scale.exp() if self.fixed_logit_scale <= 0 else torch.tensor(self.fixed_logit_scale)
        )
        outputs = {"image_embeds": image, "text_embeds": text, "logit_scale": logit_scale}
        outputs.update({k: v for k, v in batch.items() if k.startswith("teacher_")})
        return self.recipe(outputs)


def wise_ft(model: nn.Module, base: nn.Module, alpha: float) -> None:
    """WiSE-FT: replace `model`'s floating-point weights and buffers by `(1 - alpha) * base + alpha * model`."""
    base_state = base.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.lerp(base_state[name].to(tensor.dtype), tensor, alpha))


def build_student(config: DistillConfig) -> tuple[nn.Module, DCLIPProcessor]:
    """The student to train, from `base_model` (made smaller first when `compress` is set), with LoRA and freezing
    applied, and its processor."""
    student, processor = load_dual_encoder(config.base_model)
    if config.compress is not None:
        big = parameter_counts(student)["total"]
        student = compress_student(student, **config.compress)
        logger.info("distill_student: compressed student, %d of %d parameters", parameter_counts(student)["total"], big)
    if config.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_target_modules),
        )
        student = get_peft_model(student, lora)
    frozen = freeze_by_patterns(student, config.freeze_patterns)
    logger.info("distill_student: %d parameter tensors frozen by %s", len(frozen), config.freeze_patterns)
    return student, processor


def distill_student(
    config: DistillConfig,
    train_dataset: datasets.Dataset | None = None,
    evaluate: Callable[[DCLIPModel, DCLIPProcessor], dict[str, float]] | None = None,
    store: FeatureStore | None = None,
) -> Path:
    """Distil the student and save it (with its processor) to `config.output_dir`.

    The recipe's targets come from the registered target sources (`modeling_dclip.training.targets`) through the
    feature store (default `FeatureStore()`); `evaluate(student, processor)` selects the best epoch when given.
    With LoRA the adapter is saved to `{output_dir}/adapter` (loadable with `PeftModel.from_pretrained`) and the
    merged weights as the plain checkpoint in `output_dir`.
    """
    store = store if store is not None else FeatureStore()
    accelerator = make_accelerator(config)
    student, processor = build_student(config)
    train_rows = train_dataset if train_dataset is not None else load_split(config.data, config.train_split)
    table = CaptionTable.from_dataset(train_rows)
    with accelerator.main_process_first():
        targets, options = recipe_targets(config, train_rows, table, store, student.config.projection_dim)
    recipe = LossRecipe(config.loss_weights, options)

    def collate(pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows, captions = [row for row, _ in pairs], [caption for _, caption in pairs]
        batch = tokenize(processor, [table.captions[c] for c in captions])
        batch["pixel_values"] = pixel_values_of(processor, train_rows, rows)
        batch.update({name: tensor[captions] for name, tensor in targets.items()})
        return batch

    validate = (lambda trained: evaluate(trained, processor)) if evaluate is not None else None
    step = DistillStep(student, recipe, config.logit_scale, config.freeze_batchnorm_stats)
    batches = PairBatches(table.counts, config.batch_size, config.seed)
    trained, summary = train(accelerator, step, config, batches, collate, validate, "distill_student")
    if accelerator.is_main_process:
        if config.lora_r > 0:
            trained.save_pretrained(Path(config.output_dir) / "adapter")
            trained = trained.merge_and_unload()
        if config.wise_alpha < 1.0:
            wise_ft(trained, load_dual_encoder(config.base_model)[0], config.wise_alpha)
        summary |= {"loss_weights": recipe.weights, "parameters": parameter_counts(trained)}
        save_model_atomically(trained, processor, config.output_dir, {"stage": "distill_student", **summary})
    accelerator.wait_for_everyone()
    return Path(config.output_dir)
