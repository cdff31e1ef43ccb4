"""`distill_student`: the student, initialised from the base, trained with a loss recipe (DCLIP's hybrid by
default) against teacher targets computed once and cached; optional LoRA (peft) and WiSE-FT interpolation.

Every recipe of `modeling_dclip.recipes` runs here unchanged, only its targets differ (see [`DistillConfig`]): DCLIP
(the teacher's fused embeddings), ConaCLIP (any frozen dual encoder's embeddings), Knowledge-CLIP (a language
model's caption embeddings and K-means concepts; its projection and concept head are parameters of the recipe, so
they train with the student and are not saved with it), two-stage compression (`compress` builds the smaller
student; stage 1 distils from the big model, stage 2 fine-tunes contrastively)."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import torch
from torch import nn
from transformers import AutoConfig

from ..evaluation.model_eval import encode_images, encode_texts, load_model_for_evaluation
from ..losses import LossRecipe, resolve_recipe
from ..modeling_dclip import DCLIPModel, DCLIPTeacherModel
from ..processing_dclip import DCLIPProcessor
from ..recipes import compress_student, knowledge_clip_options, knowledge_clip_targets, parameter_counts
from ..recipes.knowledge_clip import (
    CONCEPT_LABELS,
    LM_EMBEDS,
    ConceptLearningLoss,
    TextEmbeddingDistillationLoss,
    TextTeacher,
)
from .batching import PairBatches
from .checkpointing import save_model_atomically
from .config import DistillConfig
from .data import CaptionTable, load_split, pixel_values_of, tokenize
from .evaluation import evaluate_dual_encoder
from .features import Features, cached, region_features, teacher_targets, text_features
from .freezing import freeze_by_patterns, keep_frozen_norms_in_eval
from .loop import make_accelerator, train

logger = logging.getLogger(__name__)

DUAL_ENCODER_KEYS = ("teacher_image_embeds", "teacher_text_embeds")
"""The targets `teacher_model` provides (DCLIP's, ConaCLIP's and compression's distillation terms read them)."""
KNOWLEDGE_CLIP_TERMS = (TextEmbeddingDistillationLoss.name, ConceptLearningLoss.name)
"""The terms whose targets come from `text_teacher_model`."""


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


def is_dclip_teacher(folder: str) -> bool:
    """Whether the model saved in `folder` is a DCLIP teacher (rather than a dual encoder), from its config."""
    return AutoConfig.from_pretrained(folder).model_type == DCLIPTeacherModel.config_class.model_type


def dual_encoder_targets(model, processor, dataset: datasets.Dataset, table: CaptionTable) -> Features:
    """A frozen dual encoder's embeddings of every training pair, indexed by caption: `teacher_image_embeds`, its
    embedding of the caption's image, and `teacher_text_embeds`, of the caption (ConaCLIP's teacher encoders; the
    big model of two-stage compression, whose stage-1 terms read each modality on its own)."""
    images, texts = encode_images(model, processor, dataset), encode_texts(model, processor, table.captions)
    return {"teacher_image_embeds": images[table.caption_to_image], "teacher_text_embeds": texts}


def compute_teacher_targets(config: DistillConfig, dataset: datasets.Dataset, table: CaptionTable) -> Features:
    """`teacher_image_embeds` / `teacher_text_embeds` of every training pair from `config.teacher_model`, from
    `work_dir` when already cached: a DCLIP teacher's enriched embeddings of each pair, or a dual encoder's
    embeddings of its image and caption ([`dual_encoder_targets`])."""
    if is_dclip_teacher(config.teacher_model):

        def compute() -> Features:
            teacher = DCLIPTeacherModel.from_pretrained(config.teacher_model).eval()
            teacher_processor = DCLIPProcessor.from_pretrained(config.teacher_model)
            regions = region_features(teacher, teacher_processor, dataset, use_dataset_boxes=config.use_dataset_boxes)
            texts = text_features(teacher, teacher_processor, table.captions)
            return teacher_targets(teacher, regions, texts, table.caption_to_image)

        return cached(Path(config.work_dir) / "teacher_targets.safetensors", compute)
    # A separate file: switching `teacher_model` between the two kinds must not reuse the other kind's targets.
    return cached(
        Path(config.work_dir) / "dual_encoder_targets.safetensors",
        lambda: dual_encoder_targets(*load_model_for_evaluation(config.teacher_model), dataset, table),
    )


def compute_text_teacher_targets(config: DistillConfig, table: CaptionTable) -> Features:
    """Knowledge-CLIP's per-caption targets from `config.text_teacher_model` (its mean-pooled caption embeddings and
    soft labels over their K-means concepts), from `work_dir` when already cached."""
    if not config.text_teacher_model:
        raise ValueError("distill_student: the recipe has Knowledge-CLIP terms, but text_teacher_model is empty")
    return cached(
        Path(config.work_dir) / "text_teacher_targets.safetensors",
        lambda: knowledge_clip_targets(
            TextTeacher.from_pretrained(config.text_teacher_model),
            table.captions,
            config.num_concepts,
            temperature=config.concept_temperature,
            seed=config.seed,
        ),
    )


def build_recipe(config: DistillConfig, student_dim: int, targets: Features) -> LossRecipe:
    """`config.loss_weights` as a [`LossRecipe`]: Knowledge-CLIP's projection and concept head sized from the
    student's width and the cached text-teacher targets, `config.loss_options` on top."""
    weights = resolve_recipe(config.loss_weights)
    options: dict[str, dict] = {}
    if LM_EMBEDS in targets:
        options = knowledge_clip_options(
            weights, student_dim, targets[LM_EMBEDS].shape[1], targets[CONCEPT_LABELS].shape[1]
        )
    for name, extra in config.loss_options.items():
        options[name] = {**options.get(name, {}), **extra}
    return LossRecipe(weights, options)


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
    student = DCLIPModel.from_pretrained(config.base_model)
    processor = DCLIPProcessor.from_pretrained(config.base_model)
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
    config: DistillConfig, train_dataset: datasets.Dataset | None = None, eval_dataset: datasets.Dataset | None = None
) -> Path:
    """Distil the student and save it (with its processor) to `config.output_dir`.

    With LoRA the adapter is saved to `{output_dir}/adapter` (loadable with `PeftModel.from_pretrained`) and the
    merged weights as the plain checkpoint in `output_dir`.
    """
    accelerator = make_accelerator(config)
    student, processor = build_student(config)
    train_rows = train_dataset if train_dataset is not None else load_split(config.data, config.train_split)
    if eval_dataset is None and config.eval_split:
        eval_dataset = load_split(config.data, config.eval_split)
    table = CaptionTable.from_dataset(train_rows)
    targets: Features = {}
    if any(resolve_recipe(config.loss_weights).get(name) for name in KNOWLEDGE_CLIP_TERMS):
        with accelerator.main_process_first():
            targets.update(compute_text_teacher_targets(config, table))
    recipe = build_recipe(config, student.config.projection_dim, targets)
    if set(DUAL_ENCODER_KEYS) & set(recipe.required_inputs):
        if not config.teacher_model:
            raise ValueError(
                f"distill_student: the recipe {recipe.weights} needs a teacher, but teacher_model is empty"
            )
        with accelerator.main_process_first():
            targets.update(compute_teacher_targets(config, train_rows, table))

    def collate(pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows, captions = [row for row, _ in pairs], [caption for _, caption in pairs]
        batch = tokenize(processor, [table.captions[c] for c in captions])
        batch["pixel_values"] = pixel_values_of(processor, train_rows, rows)
        batch.update({name: tensor[captions] for name, tensor in targets.items()})
        return batch

    evaluate = None
    if eval_dataset is not None:
        evaluate = lambda trained: evaluate_dual_encoder(trained, processor, eval_dataset, config.eval_batch_size)  # noqa: E731
    step = DistillStep(student, recipe, config.logit_scale, config.freeze_batchnorm_stats)
    trained, summary = train(
        accelerator,
        step,
        config,
        PairBatches(table.counts, config.batch_size, config.seed),
        collate,
        evaluate,
        "distill_student",
    )
    if accelerator.is_main_process:
        if config.lora_r > 0:
            trained.save_pretrained(Path(config.output_dir) / "adapter")
            trained = trained.merge_and_unload()
        if config.wise_alpha < 1.0:
            wise_ft(trained, DCLIPModel.from_pretrained(config.base_model), config.wise_alpha)
        summary |= {"loss_weights": recipe.weights, "parameters": parameter_counts(trained)}
        save_model_atomically(trained, processor, config.output_dir, {"stage": "distill_student", **summary})
    accelerator.wait_for_everyone()
    return Path(config.output_dir)
