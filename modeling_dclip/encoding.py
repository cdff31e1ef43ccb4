"""The one encoding module: every embedding, token state and region feature the package computes comes from here.

Training, evaluation, zero-shot classification, the feature store, the search index and the demo call these
functions; none of them batches images or texts through a model on its own. Images are read through
`processing_dclip.load_image`, so an unreadable file is an error naming it (or naming `images[i]` / the dataset row).

Shapes: `N` images, `n` texts, `D` the projection width, `W` a tower's pooled width, `T` tokens, `R` regions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import datasets
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .processing_dclip import ImageInput, load_image
from .regions import Regions

Features = dict[str, torch.Tensor]
Images = Sequence[ImageInput] | datasets.Dataset
"""A list of images (PIL, arrays or paths) or a `datasets.Dataset` whose `image_column` holds them."""

IMAGE_FEATURES = ("region_embeds", "region_boxes", "region_scores", "region_mask", "image_embeds")
"""The image-side inputs of `DCLIPTeacherModel.fuse` / `score_pairs`, as [`region_features`] returns them."""
TEXT_FEATURES = ("text_states", "attention_mask", "text_embeds")
"""The text-side inputs of `DCLIPTeacherModel.fuse` / `score_pairs`, as [`text_token_features`] returns them."""


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run without dropout, then give the model back in the mode it came in (e.g. mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def check_batch_size(batch_size: int) -> None:
    """Raise a `ValueError` unless `batch_size` is a positive integer."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def undecoded(dataset: datasets.Dataset, image_column: str = "image") -> datasets.Dataset:
    """The image column of `dataset` alone, its `datasets.Image` cells left as `{"bytes", "path"}`."""
    if image_column not in dataset.column_names:
        raise ValueError(f"dataset has no {image_column!r} column; its columns are {dataset.column_names}")
    column = dataset.select_columns([image_column])
    feature = column.features[image_column]
    if isinstance(feature, datasets.Image) and feature.decode:
        column = column.cast_column(image_column, datasets.Image(decode=False))
    return column


def load_images_at(images: Images, rows: Sequence[int], image_column: str = "image") -> list[Image.Image]:
    """RGB PIL images of `images[rows]`, each read and checked by `load_image`.

    A `datasets.Dataset` is read with its image column undecoded, so that a bad file is reported by its path and
    row rather than by `datasets`' decoder.
    """
    rows = list(rows)
    if isinstance(images, datasets.Dataset):
        cells = undecoded(images, image_column)[rows][image_column] if rows else []
        return [load_image(cell, name=f"dataset row {row}") for row, cell in zip(rows, cells)]
    return [load_image(images[row], name=f"images[{row}]") for row in rows]


def image_batches(
    images: Images, batch_size: int, image_column: str = "image", start: int = 0, stop: int | None = None
) -> Iterator[list[Image.Image]]:
    """[`load_images_at`] of `images[start:stop]`, `batch_size` images at a time."""
    check_batch_size(batch_size)
    stop = len(images) if stop is None else min(stop, len(images))
    if isinstance(images, datasets.Dataset):
        images = undecoded(images, image_column)
    for first in range(start, stop, batch_size):
        yield load_images_at(images, range(first, min(first + batch_size, stop)), image_column)


def pixel_values(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """The processor's `pixel_values [len(images), 3, H, W]` of already loaded RGB images."""
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def tokenize(processor, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` `[n, T]` of `texts` (padded to the longest, truncated to the tower's limit)."""
    encoded = processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def _progress(total: int, desc: str, unit: str):
    # A bar only on a terminal (disable=None): encoding a 10k-image set takes minutes on a CPU.
    return tqdm(total=total, desc=desc, unit=unit, disable=None)


@torch.no_grad()
def encode_images(
    model,
    processor,
    images: Images,
    batch_size: int = 64,
    image_column: str = "image",
    normalize: bool = True,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Projected image embeddings of `images[start:stop]`, in order.

    Args:
        model: a dual encoder with CLIP's `get_image_features(pixel_values=).pooler_output` (`DCLIPModel`,
            `CLIPModel`).
        processor: its processor (`processor(images=[...], return_tensors="pt")["pixel_values"]`).
        images: a list of images or a `datasets.Dataset` (see [`Images`]).
        normalize: L2-normalise the embeddings.

    Returns:
        `torch.FloatTensor` of shape `[N, D]` (float32, on the CPU).
    """
    device, dtype = _device_and_dtype(model)
    stop = len(images) if stop is None else min(stop, len(images))
    with eval_mode(model), _progress(stop - start, "Encoding images", "img") as bar:
        embeds = []
        for batch in image_batches(images, batch_size, image_column, start, stop):
            values = pixel_values(processor, batch).to(device=device, dtype=dtype)
            features = model.get_image_features(pixel_values=values).pooler_output.float()
            embeds.append((F.normalize(features, dim=-1) if normalize else features).cpu())
            bar.update(len(batch))
    if not embeds:
        raise ValueError("no images to encode")
    return torch.cat(embeds)


@torch.no_grad()
def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
    """Projected text embeddings of `texts`, truncated to the text tower's limit.

    Returns:
        `torch.FloatTensor` of shape `[n, D]` (float32, on the CPU).
    """
    check_batch_size(batch_size)
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    device, _ = _device_and_dtype(model)
    embeds = []
    with eval_mode(model):
        for first in range(0, len(texts), batch_size):
            inputs = tokenize(processor, texts[first : first + batch_size])
            features = model.get_text_features(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ).pooler_output.float()
            embeds.append((F.normalize(features, dim=-1) if normalize else features).cpu())
    return torch.cat(embeds)


@torch.no_grad()
def image_tower_features(model, processor, images: Images, batch_size: int = 64, image_column: str = "image"):
    """Pooled, unprojected outputs of `model`'s image tower (what a locked tower contributes to LiT training).

    Returns:
        `torch.FloatTensor` of shape `[N, W]` (float32, on the CPU).
    """
    device, dtype = _device_and_dtype(model)
    chunks = []
    with eval_mode(model):
        for batch in image_batches(images, batch_size, image_column):
            values = pixel_values(processor, batch).to(device=device, dtype=dtype)
            outputs = model.vision_model(pixel_values=values, return_dict=True)
            chunks.append(model.pool_vision(outputs).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def text_tower_features(model, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """Pooled, unprojected outputs of `model`'s text tower.

    Returns:
        `torch.FloatTensor` of shape `[n, W]` (float32, on the CPU).
    """
    check_batch_size(batch_size)
    device, _ = _device_and_dtype(model)
    chunks = []
    with eval_mode(model):
        for first in range(0, len(texts), batch_size):
            encoded = {k: v.to(device) for k, v in tokenize(processor, texts[first : first + batch_size]).items()}
            outputs = model.text_model(**encoded, return_dict=True)
            chunks.append(model.pool_text(outputs, encoded["attention_mask"]).float().cpu())
    return torch.cat(chunks)


@torch.no_grad()
def text_token_features(teacher, processor, texts: Sequence[str], batch_size: int = 128) -> Features:
    """The teacher's frozen-base token states and global embeddings of `texts`, padded to the longest text.

    Texts of similar length are encoded together and trimmed to their own longest, so that short captions do not
    pay for the longest one's padding; the result is padded back with zeros.

    Returns:
        `text_states [n, T, hidden]`, `attention_mask [n, T]`, `text_embeds [n, D]` (L2-normalised); float32 on the
        CPU.
    """
    check_batch_size(batch_size)
    if len(texts) == 0:
        raise ValueError("no texts to encode")
    device, _ = _device_and_dtype(teacher)
    encoded = tokenize(processor, texts)
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    positions = torch.arange(1, attention_mask.shape[1] + 1)
    lengths = (attention_mask.bool() * positions).amax(dim=1)  # up to the last real token, whatever the padding side
    order = lengths.argsort(descending=True, stable=True)
    states = embeds = None
    with eval_mode(teacher):
        for first in range(0, len(texts), batch_size):
            rows = order[first : first + batch_size]
            length = max(1, int(lengths[rows].max()))
            token_states, global_embeds = teacher.encode_text_tokens(
                input_ids[rows, :length].to(device), attention_mask[rows, :length].to(device)
            )
            if states is None:
                states = torch.zeros(len(texts), attention_mask.shape[1], token_states.shape[-1])
                embeds = torch.zeros(len(texts), global_embeds.shape[-1])
            states[rows, :length] = token_states.float().cpu()
            embeds[rows] = global_embeds.float().cpu()
    return {"text_states": states, "attention_mask": attention_mask, "text_embeds": embeds}


def _pad_to(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    padding: list[int] = []
    for have, want in zip(reversed(tensor.shape[1:]), reversed(shape[1:])):
        padding += [0, want - have]
    return F.pad(tensor, padding) if any(padding) else tensor


def concatenate(parts: Sequence[Features]) -> Features:
    """Concatenate feature dicts along dimension 0, zero-padding the other dimensions (regions, tokens) to the
    largest of any part."""
    result = {}
    for name in parts[0]:
        tensors = [part[name] for part in parts]
        shape = [max(sizes) for sizes in zip(*(tensor.shape for tensor in tensors))]
        result[name] = torch.cat([_pad_to(tensor, shape) for tensor in tensors])
    return result


def regions_to_tensors(per_image: Sequence[Regions]) -> Features:
    """Pack per-image `Regions` into padded tensors: `region_boxes [N, R, 4]`, `region_scores [N, R]`,
    `region_labels [N, R]` (int64, -1 unknown) and `region_mask [N, R]` (int64, 1 for real regions)."""
    most = max(len(found) for found in per_image)
    boxes, scores = torch.zeros(len(per_image), most, 4), torch.zeros(len(per_image), most)
    labels = torch.full((len(per_image), most), -1, dtype=torch.long)
    mask = torch.zeros(len(per_image), most, dtype=torch.long)
    for row, found in enumerate(per_image):
        count = len(found)
        boxes[row, :count] = torch.from_numpy(found.boxes).float()
        scores[row, :count] = torch.from_numpy(found.scores).float()
        labels[row, :count] = torch.from_numpy(found.labels).long()
        mask[row, :count] = 1
    return {"region_boxes": boxes, "region_scores": scores, "region_labels": labels, "region_mask": mask}


def tensors_to_regions(boxes: Features, row: int) -> Regions:
    """The `Regions` of image `row` of [`regions_to_tensors`]' output."""
    count = int(boxes["region_mask"][row].sum())
    return Regions(
        boxes["region_boxes"][row, :count].numpy(),
        boxes["region_scores"][row, :count].numpy(),
        boxes["region_labels"][row, :count].numpy(),
    )


@torch.no_grad()
def region_features(
    teacher,
    processor,
    images: Images,
    boxes: Features,
    batch_size: int = 16,
    image_column: str = "image",
    start: int = 0,
    stop: int | None = None,
) -> Features:
    """The teacher's frozen-base view of the regions of `images[start:stop]` (region 0 the whole image).

    Args:
        teacher (`DCLIPTeacherModel`): its `encode_regions` embeds the crops (only the frozen base is used).
        processor (`DCLIPProcessor`): crops and preprocesses the regions (`pack_regions`).
        boxes: the regions of every image of `images`, as [`regions_to_tensors`] packs them.

    Returns:
        float32 CPU tensors, R the most regions of any of these images, zero padding: `region_embeds [N, R, D]`
        (L2-normalised), `region_boxes [N, R, 4]`, `region_scores [N, R]`, `region_mask [N, R]` (int64) and
        `image_embeds [N, D]` (region 0).
    """
    device, dtype = _device_and_dtype(teacher)
    stop = len(images) if stop is None else min(stop, len(images))
    if len(boxes["region_mask"]) != len(images):
        raise ValueError(f"boxes cover {len(boxes['region_mask'])} images but there are {len(images)}")
    parts: list[Features] = []
    row = start
    with eval_mode(teacher):
        for batch in image_batches(images, batch_size, image_column, start, stop):
            per_image = [tensors_to_regions(boxes, row + offset) for offset in range(len(batch))]
            inputs = processor.pack_regions(batch, per_image)
            embeds = teacher.encode_regions(
                inputs["region_pixel_values"].to(device=device, dtype=dtype), inputs["region_mask"].to(device)
            )
            parts.append(
                {
                    "region_embeds": embeds.float().cpu(),
                    "region_boxes": inputs["region_boxes"].float(),
                    "region_scores": inputs["region_scores"].float(),
                    "region_mask": inputs["region_mask"].long(),
                }
            )
            row += len(batch)
    features = concatenate(parts)
    features["image_embeds"] = features["region_embeds"][:, 0].clone()
    return features


def gather_pairs(regions: Features, texts: Features, image_rows: torch.Tensor, text_rows: torch.Tensor) -> Features:
    """The teacher's `fuse` inputs for the pairs (image `image_rows[k]`, text `text_rows[k]`)."""
    pairs = {key: regions[key][image_rows] for key in IMAGE_FEATURES}
    pairs.update({key: texts[key][text_rows] for key in TEXT_FEATURES})
    return pairs


@torch.no_grad()
def teacher_pair_embeddings(
    teacher, regions: Features, texts: Features, caption_to_image: torch.Tensor, batch_size: int = 256
) -> Features:
    """The teacher's enriched embeddings of every (image, its caption) pair: DCLIP's distillation targets.

    Args:
        regions: [`region_features`] of the images; texts: [`text_token_features`] of the captions.
        caption_to_image (`torch.LongTensor` of shape `[n]`): the image row of each caption.

    Returns:
        `teacher_image_embeds [n, D]`, `teacher_text_embeds [n, D]` (float32, CPU).
    """
    check_batch_size(batch_size)
    device, _ = _device_and_dtype(teacher)
    images, texts_out = [], []
    with eval_mode(teacher):
        for first in range(0, len(caption_to_image), batch_size):
            text_rows = torch.arange(first, min(first + batch_size, len(caption_to_image)))
            pairs = gather_pairs(regions, texts, caption_to_image[text_rows], text_rows)
            image, text, _ = teacher.fuse(**{key: value.to(device) for key, value in pairs.items()})
            images.append(image.float().cpu())
            texts_out.append(text.float().cpu())
    return {"teacher_image_embeds": torch.cat(images), "teacher_text_embeds": torch.cat(texts_out)}


@torch.no_grad()
def teacher_pair_scores(
    teacher,
    regions: Features,
    texts: Features,
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    batch_size: int = 4096,
) -> torch.Tensor:
    """The teacher's score (inner product of its enriched embeddings) of image `image_rows[k]` with text
    `text_rows[k]`, for every k, `batch_size` pairs fused at once.

    Args:
        regions: [`region_features`] of the images; texts: [`text_token_features`] of the texts.

    Returns:
        `[n_pairs]` float32 on the CPU.
    """
    check_batch_size(batch_size)
    device, _ = _device_and_dtype(teacher)
    scores = []
    with eval_mode(teacher):
        for first in range(0, len(image_rows), batch_size):
            step = slice(first, first + batch_size)
            pairs = gather_pairs(regions, texts, image_rows[step], text_rows[step])
            image, text, _ = teacher.fuse(**{key: value.to(device) for key, value in pairs.items()})
            scores.append((image * text).sum(dim=-1).float().cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


__all__ = [
    "IMAGE_FEATURES",
    "TEXT_FEATURES",
    "check_batch_size",
    "concatenate",
    "encode_images",
    "encode_texts",
    "eval_mode",
    "gather_pairs",
    "image_batches",
    "load_images_at",
    "image_tower_features",
    "pixel_values",
    "region_features",
    "regions_to_tensors",
    "teacher_pair_embeddings",
    "teacher_pair_scores",
    "tensors_to_regions",
    "text_token_features",
    "text_tower_features",
    "tokenize",
    "undecoded",
]
