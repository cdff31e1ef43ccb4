"""Features computed once and cached: frozen image-tower features (LiT), the frozen base's region embeddings and
text token states (teacher), and the teacher's targets (student). Caches are safetensors files of tensors."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import torch
from safetensors.torch import load_file, save_file

from ..data.region_cache import DatasetBoxes
from ..evaluation.model_eval import teacher_region_features
from .data import batched, pixel_values_of, tokenize

Features = dict[str, torch.Tensor]
IMAGE_FEATURES = ("region_embeds", "region_boxes", "region_scores", "region_mask", "image_embeds")
"""The image-side inputs of `DCLIPTeacherModel.fuse` / `score_pairs`, as `region_features` returns them."""
TEXT_FEATURES = ("text_states", "attention_mask", "text_embeds")
"""The text-side inputs of `DCLIPTeacherModel.fuse` / `score_pairs`, as `text_features` returns them."""


def cached(path: str | os.PathLike | None, compute) -> Features:
    """`compute()`'s tensors, read from `path` when it exists, else computed and written there atomically."""
    if path is not None and Path(path).is_file():
        return load_file(str(path))
    features = {name: tensor.contiguous() for name, tensor in compute().items()}
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{path}.tmp"
        save_file(features, temporary)
        os.replace(temporary, path)
    return features


@torch.no_grad()
def image_tower_features(model, processor, dataset: datasets.Dataset, batch_size: int = 64) -> Features:
    """Pooled, unprojected outputs of a locked image tower: `{"image_features": [n_images, tower_width]}`."""
    model.eval()
    chunks = []
    for rows in batched(len(dataset), batch_size):
        outputs = model.vision_model(pixel_values=pixel_values_of(processor, dataset, rows), return_dict=True)
        chunks.append(model._pool_vision(outputs).float())
    return {"image_features": torch.cat(chunks)}


def region_features(
    teacher, processor, dataset: datasets.Dataset, batch_size: int = 16, use_dataset_boxes: bool = False
) -> Features:
    """The frozen base's view of each image's regions (row 0 the whole image, which is also the image embedding):
    boxes from the dataset's `boxes` column or the processor's extractor, through the `Dataset.map` region cache.

    Returns:
        `region_embeds [N, R, P]` (normalised), `region_boxes [N, R, 4]`, `region_scores [N, R]`,
        `region_mask [N, R]`, `image_embeds [N, P]`; R is the most regions of any image.
    """
    if use_dataset_boxes and "boxes" not in dataset.column_names:
        raise ValueError("use_dataset_boxes=True but the dataset has no 'boxes' column")
    source = DatasetBoxes() if use_dataset_boxes else None
    return teacher_region_features(teacher, processor, dataset, source, batch_size=batch_size)


@torch.no_grad()
def text_features(teacher, processor, texts: list[str], batch_size: int = 128) -> Features:
    """The frozen base's token states and global embeddings of `texts`, padded to the longest text.

    Returns:
        `text_states [n, T, H]`, `attention_mask [n, T]`, `text_embeds [n, P]` (normalised).
    """
    encoded = tokenize(processor, texts)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    positions = torch.arange(1, attention_mask.shape[1] + 1)
    lengths = (attention_mask.bool() * positions).amax(dim=1)  # up to the last real token, whatever the padding side
    # Texts of similar length are encoded together and trimmed to their own longest, so that short captions do not
    # pay for the longest one's padding; the cache is padded back (with zeros) to the longest text.
    order = lengths.argsort(descending=True, stable=True)
    states, embeds = None, None
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        length = max(1, int(lengths[rows].max()))
        token_states, global_embeds = teacher.encode_text_tokens(
            input_ids[rows, :length], attention_mask[rows, :length]
        )
        if states is None:
            states = token_states.new_zeros(
                len(texts), attention_mask.shape[1], token_states.shape[-1], dtype=torch.float32
            )
            embeds = global_embeds.new_zeros(len(texts), global_embeds.shape[-1], dtype=torch.float32)
        states[rows, :length] = token_states.float()
        embeds[rows] = global_embeds.float()
    return {"text_states": states, "attention_mask": attention_mask, "text_embeds": embeds}


def gather_pairs(regions: Features, texts: Features, image_rows: torch.Tensor, text_rows: torch.Tensor) -> Features:
    """The teacher's `fuse` inputs for pairs (image `image_rows[k]`, text `text_rows[k]`)."""
    return {
        "region_embeds": regions["region_embeds"][image_rows],
        "region_boxes": regions["region_boxes"][image_rows],
        "region_scores": regions["region_scores"][image_rows],
        "region_mask": regions["region_mask"][image_rows],
        "image_embeds": regions["image_embeds"][image_rows],
        "text_states": texts["text_states"][text_rows],
        "attention_mask": texts["attention_mask"][text_rows],
        "text_embeds": texts["text_embeds"][text_rows],
    }


@torch.no_grad()
def teacher_targets(
    teacher, regions: Features, texts: Features, caption_to_image: torch.Tensor, batch_size: int = 256
) -> Features:
    """The teacher's enriched embeddings of every (image, its caption) pair, computed once for distillation.

    Returns:
        `teacher_image_embeds [n_captions, P]`, `teacher_text_embeds [n_captions, P]`.
    """
    teacher.eval()
    images, texts_out = [], []
    for rows in batched(len(caption_to_image), batch_size):
        text_rows = torch.tensor(rows)
        image, text, _ = teacher.fuse(**gather_pairs(regions, texts, caption_to_image[text_rows], text_rows))
        images.append(image.float())
        texts_out.append(text.float())
    return {"teacher_image_embeds": torch.cat(images), "teacher_text_embeds": torch.cat(texts_out)}
