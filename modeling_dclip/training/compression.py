"""`distill_towers`: stage 1 of two-stage compression ("Leaner and Faster", NAACL 2022) on unpaired data.

The smaller student is built from the big one ([`compress_student`], optionally with a reduced vocabulary,
[`reduce_vocabulary`]); then each of its towers learns, on its own, the big model's projected embeddings of the same
inputs (intra-modal contrastive distillation, recipe `compression_stage1`). Images and texts come from separate
collections and are never paired: a batch holds `batch_size` images and about `len(texts) / len(images)` times as
many texts, and no loss term compares an image with a text. Stage 2 (contrastive fine-tuning on pairs) is the
ordinary `align_base` / `distill_student` run from this stage's output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch

from ..encoding import tokenize
from ..feature_store import FeatureStore
from ..losses import LossRecipe
from ..modeling_dclip import DCLIPModel
from ..processing_dclip import DCLIPProcessor
from ..recipes.compression import compress_student, parameter_counts, reduce_vocabulary
from .align import set_image_size
from .batching import PairBatches
from .checkpointing import save_model_atomically
from .config import TrainingConfig, option
from .data import pixel_values_of
from .distill import DistillStep
from .freezing import freeze_by_patterns
from .loop import make_accelerator, train

logger = logging.getLogger(__name__)


@dataclass
class TowerDistillConfig(TrainingConfig):
    """Stage 1 of two-stage compression on unpaired images and texts (`batch_size`: images per global batch; each
    image row brings its share of the texts)."""

    big_model: str = option(
        "outputs/student",
        "The full student (a saved `DCLIPModel` folder): compressed into the student and, frozen, the targets' source.",
    )
    compress: dict = option(
        {"text_layers": "every_other", "vision_blocks": "first"},
        "Keyword arguments of `modeling_dclip.recipes.compress_student` (`text_layers`, `vision_blocks`, ...).",
    )
    reduce_vocabulary: bool = option(
        True, "Shrink the text tower's word embeddings to the tokens of the vocabulary corpus (default: the texts)."
    )
    freeze_patterns: list = option(
        [], "`fnmatch` patterns of student parameters kept frozen (the stem and blocks a cut tower shares unchanged)."
    )
    loss_weights: dict | str = option(
        "compression_stage1", "The recipe: intra-modal contrastive distillation of each tower by default."
    )
    logit_scale: float = option(20.0, "Fixed inverse temperature of the distillation InfoNCE terms.")
    batch_size: int = option(64, "Images per global batch; each brings about len(texts) / len(images) texts.")
    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.")
    metric_for_best_model: str = option("loss", "Unused: stage 1 has no validation.")


def text_groups(num_texts: int, num_images: int, seed: int) -> list[list[int]]:
    """Texts dealt to image rows: a seeded permutation of `range(num_texts)` split into `num_images` groups of
    `num_texts // num_images` or one more, so that an epoch over the images also visits every text once."""
    order = torch.randperm(num_texts, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[row::num_images] for row in range(num_images)]


def build_compressed_student(
    config: TowerDistillConfig, vocabulary: list[str]
) -> tuple[DCLIPModel, DCLIPModel, DCLIPProcessor, DCLIPProcessor]:
    """`(big, student, big_processor, student_processor)`: the frozen big model and the smaller student built from
    it (`config.compress`, then the reduced vocabulary of `vocabulary`), each with its processor."""
    big = DCLIPModel.from_pretrained(config.big_model).eval()
    big.requires_grad_(False)
    big_processor = DCLIPProcessor.from_pretrained(config.big_model)
    set_image_size(big_processor, config.image_size)
    student = compress_student(big, **config.compress)
    tokenizer = big_processor.tokenizer
    if config.reduce_vocabulary:
        student, tokenizer = reduce_vocabulary(student, tokenizer, vocabulary)
    processor = DCLIPProcessor(
        image_processor=big_processor.image_processor, tokenizer=tokenizer, region_config=big_processor.region_config
    )
    student.requires_grad_(True)
    frozen = freeze_by_patterns(student, config.freeze_patterns)
    logger.info("distill_towers: %d parameter tensors frozen by %s", len(frozen), config.freeze_patterns)
    return big, student, big_processor, processor


def distill_towers(
    config: TowerDistillConfig,
    images: datasets.Dataset,
    texts: list[str],
    vocabulary: list[str] | None = None,
    store: FeatureStore | None = None,
) -> Path:
    """Build the compressed student and distil each tower from the big model; save it with its processor (and
    reduced tokenizer) to `config.output_dir`.

    Args:
        config: see [`TowerDistillConfig`].
        images: a dataset with an `image` column (photos from anywhere; no captions needed).
        texts: texts (captions from anywhere; not paired with `images`).
        vocabulary: the corpus whose tokens the reduced vocabulary keeps; defaults to `texts`.
        store: where the big model's embeddings (the targets) are cached (default `FeatureStore()`).

    Returns:
        `config.output_dir`.
    """
    if len(images) < config.batch_size or not texts:
        raise ValueError(f"distill_towers: {len(images)} images and {len(texts)} texts; need a batch of images")
    store = store if store is not None else FeatureStore()
    accelerator = make_accelerator(config)
    big, student, big_processor, processor = build_compressed_student(config, vocabulary or texts)
    with accelerator.main_process_first():
        # The big model's embeddings (L2-normalised; the InfoNCE terms compare directions only), computed once.
        targets = {
            "teacher_image_embeds": store.image_embeddings(big, big_processor, images, config.eval_batch_size),
            "teacher_text_embeds": store.text_embeddings(big, big_processor, texts),
        }
    groups = text_groups(len(texts), len(images), config.seed)

    def collate(pairs: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        rows = [row for row, _ in pairs]
        text_rows = [text for row in rows for text in groups[row]]
        batch = tokenize(processor, [texts[text] for text in text_rows])
        batch["pixel_values"] = pixel_values_of(processor, images, rows)
        batch["teacher_image_embeds"] = targets["teacher_image_embeds"][rows]
        batch["teacher_text_embeds"] = targets["teacher_text_embeds"][text_rows]
        return batch

    # BatchNorm statistics of the trainable blocks adapt to the blocks that were removed before them.
    step = DistillStep(student, LossRecipe(config.loss_weights), config.logit_scale, freeze_batchnorm=False)
    trained, summary = train(
        accelerator,
        step,
        config,
        PairBatches([1] * len(images), config.batch_size, config.seed),
        collate,
        None,
        "distill_towers",
    )
    if accelerator.is_main_process:
        summary |= {
            "parameters": parameter_counts(trained),
            "num_images": len(images),
            "num_texts": len(texts),
            "vocabulary_size": len(processor.tokenizer),
        }
        save_model_atomically(trained.eval(), processor, config.output_dir, {"stage": "distill_towers", **summary})
    accelerator.wait_for_everyone()
    return Path(config.output_dir)


__all__ = ["TowerDistillConfig", "build_compressed_student", "distill_towers", "text_groups"]
