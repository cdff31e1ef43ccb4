"""
Evaluate a model on a dataset in the canonical schema: retrieval, compositional accuracy and zero-shot
classification, for any dual encoder and for the DCLIP teacher.

- A dual encoder (`DCLIPModel`, `CLIPModel` or any model with CLIP's `get_image_features` / `get_text_features`)
  embeds every image once and every text once; the metrics compare the L2-normalised embeddings.
- The teacher (`DCLIPTeacherModel`) has no standalone embeddings: it reads an image's regions together with a
  text, so it scores every (text, image) pair with `score_pairs`, over the frozen base's region embeddings
  (cached, see `modeling_dclip.data.region_cache`) and text token states.

Metric names: those of `retrieval_metrics` (`text_to_image_R@1`, ..., `image_to_text_MRR`),
`compositional_accuracy`, and `zeroshot_top1` / `zeroshot_top5`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from datasets import ClassLabel
from tqdm.auto import tqdm

from ..data.region_cache import RegionSource, add_region_boxes, region_embeddings
from ..modeling_dclip import DCLIPTeacherModel
from ..regions import to_rgb
from .compositional import compositional_accuracy, compositional_accuracy_from_embeddings
from .retrieval import retrieval_metrics, retrieval_metrics_from_embeddings
from .templates import get_templates
from .zeroshot import _in_eval_mode, build_zeroshot_classifier

TASKS = ("retrieval", "compositional", "zeroshot")
TEACHER_IMAGE_KEYS = ("region_embeds", "region_boxes", "region_scores", "region_mask", "image_embeds")

Features = dict[str, torch.Tensor]


@dataclass
class CaptionPairs:
    """A dataset's captions, flattened row by row.

    Attributes:
        captions (`list[str]`): every caption, `n_captions` of them.
        caption_to_image (`torch.LongTensor` of shape `[n_captions]`): the dataset row of each caption.
        hard_negatives (`list[str]`, *optional*): the hard negative of each caption (aligned with `captions`).
    """

    captions: list[str]
    caption_to_image: torch.Tensor
    hard_negatives: list[str] | None = None


def caption_pairs(dataset: datasets.Dataset, with_hard_negatives: bool = False) -> CaptionPairs:
    """
    Flatten `dataset["captions"]` (and `dataset["hard_negatives"]`) into caption-level lists.

    A row's `hard_negatives` hold one negative per caption (aligned) or one for the whole image, which then stands
    against each of the row's captions.

    Raises:
        `ValueError` naming the row and column of an empty caption, a missing hard negative or a count mismatch.
    """
    if "captions" not in dataset.column_names:
        raise ValueError(f"dataset has no 'captions' column; its columns are {dataset.column_names}")
    if with_hard_negatives and "hard_negatives" not in dataset.column_names:
        raise ValueError(
            f"dataset has no 'hard_negatives' column (its columns are {dataset.column_names}): compositional "
            "evaluation needs a hard negative caption per image or per caption (e.g. the synthetic scenes)"
        )
    columns = ["captions", "hard_negatives"] if with_hard_negatives else ["captions"]
    table = dataset.select_columns(columns)
    captions, owners, negatives = [], [], []
    for row, row_captions in enumerate(table["captions"]):
        if not row_captions:
            raise ValueError(f"dataset row {row}, column 'captions': no caption")
        for caption in row_captions:
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"dataset row {row}, column 'captions': empty or non-string caption {caption!r}")
        captions.extend(row_captions)
        owners.extend([row] * len(row_captions))
    if with_hard_negatives:
        for row, (row_captions, row_negatives) in enumerate(zip(table["captions"], table["hard_negatives"])):
            row_negatives = row_negatives or []
            if len(row_negatives) == 1:
                row_negatives = row_negatives * len(row_captions)
            if len(row_negatives) != len(row_captions):
                raise ValueError(
                    f"dataset row {row}, column 'hard_negatives': {len(row_negatives)} negatives for "
                    f"{len(row_captions)} captions; give one per caption or one per image"
                )
            for negative in row_negatives:
                if not isinstance(negative, str) or not negative.strip():
                    raise ValueError(f"dataset row {row}, column 'hard_negatives': empty negative {negative!r}")
            negatives.extend(row_negatives)
    return CaptionPairs(captions, torch.tensor(owners, dtype=torch.long), negatives if with_hard_negatives else None)


def dataset_classnames(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """The class names of `dataset`'s `ClassLabel` label column (an image folder's folder names)."""
    if label_column not in dataset.column_names:
        raise ValueError(
            f"dataset has no {label_column!r} column (its columns are {dataset.column_names}): zero-shot "
            "classification needs a labelled dataset, e.g. an image folder (imagefolder:PATH)"
        )
    feature = dataset.features[label_column]
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"column {label_column!r} is {feature}, not a ClassLabel with class names; give the class names explicitly"
        )
    return list(feature.names)


def supported_tasks(dataset: datasets.Dataset, label_column: str = "label") -> list[str]:
    """The tasks `dataset` has the columns for: captions (retrieval), hard negatives, a `ClassLabel` label."""
    tasks = []
    if "captions" in dataset.column_names:
        tasks.append("retrieval")
    if "hard_negatives" in dataset.column_names:
        tasks.append("compositional")
    if label_column in dataset.column_names and isinstance(dataset.features[label_column], ClassLabel):
        tasks.append("zeroshot")
    return tasks


def is_teacher(model) -> bool:
    """Whether `model` is evaluated through pairwise scoring (the DCLIP teacher) rather than embeddings."""
    return isinstance(model, DCLIPTeacherModel)


def _device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def encode_images(
    model, processor, dataset: datasets.Dataset, batch_size: int = 64, image_column: str = "image"
) -> torch.Tensor:
    """
    L2-normalised image embeddings of every row, in order.

    Args:
        model: a dual encoder with `get_image_features(pixel_values=).pooler_output`.
        processor: its processor (`processor(images=[...], return_tensors="pt")["pixel_values"]`).
        dataset (`datasets.Dataset`): rows with an image column (PIL on access).

    Returns:
        `torch.Tensor` of shape `[len(dataset), projection_dim]` (float32, on the CPU).
    """
    _check_batch_size(batch_size)
    device, dtype = _device_and_dtype(model)
    images = dataset.select_columns([image_column])
    embeds = []
    # A progress bar only on a terminal (disable=None): encoding a 10k-image set takes minutes on a CPU.
    with _in_eval_mode(model):
        for start in tqdm(range(0, len(images), batch_size), desc="Encoding images", unit="batch", disable=None):
            batch = [to_rgb(image) for image in images[start : start + batch_size][image_column]]
            pixel_values = processor(images=batch, return_tensors="pt")["pixel_values"]
            features = model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)).pooler_output
            embeds.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(embeds)


@torch.no_grad()
def encode_texts(model, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """
    L2-normalised text embeddings, truncated to the text tower's limit.

    Returns:
        `torch.Tensor` of shape `[len(texts), projection_dim]` (float32, on the CPU).
    """
    _check_batch_size(batch_size)
    device, _ = _device_and_dtype(model)
    embeds = []
    with _in_eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            inputs = processor(text=batch, return_tensors="pt", padding=True, truncation=True)
            features = model.get_text_features(
                input_ids=inputs["input_ids"].to(device), attention_mask=inputs["attention_mask"].to(device)
            ).pooler_output
            embeds.append(F.normalize(features.float(), dim=-1).cpu())
    return torch.cat(embeds)


@torch.no_grad()
def teacher_text_features(
    teacher: DCLIPTeacherModel, processor, texts: Sequence[str], batch_size: int = 128
) -> Features:
    """
    The teacher's frozen-base text inputs for `fuse` / `score_pairs`, padded to the longest text.

    Returns:
        `text_states [n, T, hidden]`, `attention_mask [n, T]` and `text_embeds [n, projection_dim]` (normalised),
        on the teacher's device.
    """
    _check_batch_size(batch_size)
    device, _ = _device_and_dtype(teacher)
    encoded = processor(text=list(texts), return_tensors="pt", padding=True)
    input_ids, attention_mask = encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
    states, embeds = [], []
    for start in range(0, len(texts), batch_size):
        rows = slice(start, start + batch_size)
        token_states, text_embeds = teacher.encode_text_tokens(input_ids[rows], attention_mask[rows])
        states.append(token_states.float())
        embeds.append(text_embeds.float())
    return {"text_states": torch.cat(states), "attention_mask": attention_mask, "text_embeds": torch.cat(embeds)}


def teacher_region_features(
    teacher: DCLIPTeacherModel,
    processor,
    dataset: datasets.Dataset,
    region_source: RegionSource | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
) -> Features:
    """The frozen base's region embeddings of every image (cached): boxes from `region_source` (default: the
    processor's own region extractor), then `region_embeddings`. See `modeling_dclip.data.region_cache`."""
    source = region_source if region_source is not None else processor.region_extractor
    with_regions = add_region_boxes(dataset, source, cache_dir=cache_dir)
    return region_embeddings(teacher, processor, with_regions, cache_dir=cache_dir, batch_size=batch_size)


def _labels(dataset: datasets.Dataset, label_column: str, n_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(dataset.select_columns([label_column])[label_column], dtype=torch.long)
    invalid = (labels < 0) | (labels >= n_classes)
    if bool(invalid.any()):
        row = int(torch.nonzero(invalid)[0])
        raise ValueError(
            f"dataset row {row}, column {label_column!r}: {int(labels[row])} is not a class index "
            f"(there are {n_classes} classes)"
        )
    return labels


def _topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 / top-5 accuracy of `scores [n_images, n_classes]` (top-5 is top-n_classes below 5 classes)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None].to(top.device)
    return {"zeroshot_top1": hits[:, 0].double().mean().item(), "zeroshot_top5": hits.any(dim=1).double().mean().item()}


@dataclass
class TaskInputs:
    """What the requested tasks read from a dataset, checked (see `prepare_task_inputs`).

    Attributes:
        num_images (`int`): rows of the dataset.
        pairs (`CaptionPairs`, *optional*): the captions (and hard negatives) for retrieval / compositional.
        classnames (`list[str]`, *optional*), labels (`torch.LongTensor` of shape `[n_images]`, *optional*) and
            templates (`list[str]`, *optional*): for zero-shot classification.
    """

    num_images: int
    pairs: CaptionPairs | None = None
    classnames: list[str] | None = None
    labels: torch.Tensor | None = None
    templates: list[str] | None = None

    def sizes(self) -> dict[str, int]:
        """`images`, and `captions` / `hard_negatives` / `classes` when the tasks use them."""
        sizes = {"images": self.num_images}
        if self.pairs is not None:
            sizes["captions"] = len(self.pairs.captions)
            if self.pairs.hard_negatives is not None:
                sizes["hard_negatives"] = len(self.pairs.hard_negatives)
        if self.classnames is not None:
            sizes["classes"] = len(self.classnames)
        return sizes


def prepare_task_inputs(
    dataset: datasets.Dataset,
    tasks: Sequence[str],
    classnames: Sequence[str] | None = None,
    templates: str | Sequence[str] = "simple",
    label_column: str = "label",
) -> TaskInputs:
    """
    Check that `dataset` has what each task needs and read it, before anything is encoded.

    Raises:
        `ValueError` naming the task, column and row at fault: an unknown task, an empty dataset, no captions,
        no hard negatives for `compositional`, no `ClassLabel` labels (nor `classnames`) for `zeroshot`, a label
        outside the classes, a template without exactly one `{}`.
    """
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown or no tasks {list(tasks)}; choose from {list(TASKS)}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    inputs = TaskInputs(num_images=len(dataset))
    if {"retrieval", "compositional"} & set(tasks):
        inputs.pairs = caption_pairs(dataset, with_hard_negatives="compositional" in tasks)
    if "zeroshot" in tasks:
        inputs.classnames = list(classnames) if classnames is not None else dataset_classnames(dataset, label_column)
        inputs.labels = _labels(dataset, label_column, len(inputs.classnames))
        inputs.templates = get_templates(templates) if isinstance(templates, str) else list(templates)
        if not inputs.templates or any(template.count("{}") != 1 for template in inputs.templates):
            raise ValueError(f"zero-shot templates must each contain exactly one '{{}}', got {inputs.templates}")
    return inputs


@torch.no_grad()
def evaluate_model(
    model,
    processor,
    dataset: datasets.Dataset,
    tasks: Sequence[str] = ("retrieval",),
    *,
    classnames: Sequence[str] | None = None,
    templates: str | Sequence[str] = "simple",
    label_column: str = "label",
    batch_size: int = 64,
    region_features: Features | None = None,
    region_source: RegionSource | None = None,
    cache_dir: str | os.PathLike | None = None,
    max_pairs_per_step: int = 4096,
) -> dict[str, float]:
    """
    Metrics of `model` on `dataset` for each task in `tasks`; each input is encoded once and shared by the tasks.

    Args:
        model: a dual encoder (`DCLIPModel`, `CLIPModel`, ...) or a `DCLIPTeacherModel`.
        processor: its processor (`DCLIPProcessor`, `CLIPProcessor`, ...).
        dataset (`datasets.Dataset`): canonical schema; `retrieval` reads `captions`, `compositional` also
            `hard_negatives`, `zeroshot` the images and `label_column`.
        tasks (`Sequence[str]`): any of `TASKS`.
        classnames (`Sequence[str]`, *optional*): zero-shot class names by label; default the label column's
            `ClassLabel` names.
        templates (`str` or `Sequence[str]`, *optional*, defaults to `"simple"`): zero-shot prompt templates with
            one `{}`, or the name of a set (`get_templates`: simple, cifar10, cifar100, imagenet).
        batch_size (`int`, *optional*, defaults to 64): images encoded at once (texts: 4x as many).
        region_features (`dict`, *optional*): teacher only, `region_embeddings` output for `dataset`'s rows.
        region_source (*optional*): teacher only, when `region_features` is not given: where the regions come from
            (a `RegionExtractor` or `DatasetBoxes()`); default the processor's region extractor.
        cache_dir (`str`, *optional*): teacher only, folder of the region caches.
        max_pairs_per_step (`int`, *optional*, defaults to 4096): teacher only, pairs fused at once.

    Returns:
        `dict[str, float]`: the metrics of the requested tasks (see the module docstring for their names).
    """
    _check_batch_size(batch_size)
    # Every input is checked before anything is computed, so a bad dataset fails in seconds, not after encoding.
    inputs = prepare_task_inputs(dataset, tasks, classnames, templates, label_column)
    pairs, classnames, labels, prompts = inputs.pairs, inputs.classnames, inputs.labels, inputs.templates

    if is_teacher(model):
        with _in_eval_mode(model):
            return _evaluate_teacher(
                model,
                processor,
                dataset,
                tasks,
                pairs,
                classnames,
                prompts,
                labels,
                region_features,
                region_source,
                cache_dir,
                max_pairs_per_step,
            )
    metrics: dict[str, float] = {}
    image_embeds = encode_images(model, processor, dataset, batch_size)
    if pairs is not None:
        caption_embeds = encode_texts(model, processor, pairs.captions, 4 * batch_size)
        if "retrieval" in tasks:
            metrics.update(retrieval_metrics_from_embeddings(caption_embeds, image_embeds, pairs.caption_to_image))
        if "compositional" in tasks:
            negative_embeds = encode_texts(model, processor, pairs.hard_negatives, 4 * batch_size)
            metrics["compositional_accuracy"] = compositional_accuracy_from_embeddings(
                image_embeds[pairs.caption_to_image], caption_embeds, negative_embeds
            )
    if "zeroshot" in tasks:
        classifier = build_zeroshot_classifier(model, processor, classnames, prompts, 4 * batch_size).cpu()
        metrics.update(_topk_accuracy(image_embeds @ classifier.T, labels))
    return metrics


def _evaluate_teacher(
    teacher: DCLIPTeacherModel,
    processor,
    dataset: datasets.Dataset,
    tasks: Sequence[str],
    pairs: CaptionPairs | None,
    classnames: list[str] | None,
    templates: list[str] | None,
    labels: torch.Tensor | None,
    region_features: Features | None,
    region_source: RegionSource | None,
    cache_dir: str | os.PathLike | None,
    max_pairs_per_step: int,
) -> dict[str, float]:
    if region_features is None:
        region_features = teacher_region_features(teacher, processor, dataset, region_source, cache_dir)
    if len(region_features["region_embeds"]) != len(dataset):
        raise ValueError(
            f"region_features cover {len(region_features['region_embeds'])} images but the dataset has "
            f"{len(dataset)} rows"
        )
    device, _ = _device_and_dtype(teacher)
    images = {key: region_features[key].to(device) for key in TEACHER_IMAGE_KEYS}
    metrics: dict[str, float] = {}
    if pairs is not None:
        texts = teacher_text_features(teacher, processor, pairs.captions)
        if "retrieval" in tasks:
            similarity = teacher.score_pairs(**images, **texts, max_pairs_per_step=max_pairs_per_step)
            metrics.update(retrieval_metrics(similarity.float().cpu(), pairs.caption_to_image))
        if "compositional" in tasks:
            negatives = teacher_text_features(teacher, processor, pairs.hard_negatives)
            true_scores = _paired_scores(teacher, images, texts, pairs.caption_to_image, max_pairs_per_step)
            negative_scores = _paired_scores(teacher, images, negatives, pairs.caption_to_image, max_pairs_per_step)
            metrics["compositional_accuracy"] = compositional_accuracy(true_scores, negative_scores)
    if "zeroshot" in tasks:
        prompts = [template.replace("{}", name) for name in classnames for template in templates]
        prompt_scores = teacher.score_pairs(
            **images, **teacher_text_features(teacher, processor, prompts), max_pairs_per_step=max_pairs_per_step
        )
        # The teacher's text embedding depends on the image it reads with, so templates are averaged as scores.
        class_scores = prompt_scores.float().view(len(classnames), len(templates), -1).mean(dim=1)
        metrics.update(_topk_accuracy(class_scores.T.cpu(), labels))
    return metrics


def _paired_scores(
    teacher: DCLIPTeacherModel, images: Features, texts: Features, image_rows: torch.Tensor, pairs_per_step: int
) -> torch.Tensor:
    """Score of text k with image `image_rows[k]`, for every k: `[n_texts]` (float32, CPU)."""
    scores = []
    for start in range(0, len(image_rows), pairs_per_step):
        rows = image_rows[start : start + pairs_per_step].to(images["region_embeds"].device)
        image, text, _ = teacher.fuse(
            **{key: images[key][rows] for key in TEACHER_IMAGE_KEYS},
            **{key: value[start : start + pairs_per_step] for key, value in texts.items()},
        )
        scores.append((image * text).sum(dim=-1).float().cpu())
    return torch.cat(scores)


def load_model_for_evaluation(name_or_path: str | os.PathLike, device: str | torch.device | None = None):
    """
    A saved model and its processor, ready to evaluate: a DCLIP student or teacher, or any dual encoder that
    `AutoModel` loads and that has `get_image_features` / `get_text_features` (a `CLIPModel` checkpoint).

    Args:
        name_or_path: a local folder (config, weights, processor files) or a Hub id.
        device: where to put the model; default the first CUDA device when there is one, else the CPU.

    Returns:
        `(model, processor)`, the model in eval mode.

    Raises:
        `FileNotFoundError` for a missing local folder, `ValueError` for a checkpoint that is not a dual encoder
        or cannot be loaded (the message names `name_or_path`).
    """
    from ..loading import load_model_and_processor

    model, processor = load_model_and_processor(name_or_path)
    name = os.fspath(name_or_path)
    if not is_teacher(model) and not all(
        callable(getattr(model, method, None)) for method in ("get_image_features", "get_text_features")
    ):
        raise ValueError(
            f"model {name!r} is a {type(model).__name__}, not a dual encoder (it has no get_image_features / "
            "get_text_features) nor a DCLIP teacher"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


__all__ = [
    "TASKS",
    "CaptionPairs",
    "TaskInputs",
    "caption_pairs",
    "dataset_classnames",
    "encode_images",
    "encode_texts",
    "evaluate_model",
    "is_teacher",
    "load_model_for_evaluation",
    "prepare_task_inputs",
    "supported_tasks",
    "teacher_region_features",
    "teacher_text_features",
]
