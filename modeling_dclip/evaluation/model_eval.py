"""
Evaluate a model on a dataset in the canonical schema: retrieval, compositional accuracy and zero-shot
classification, for any dual encoder and for the DCLIP teacher.

- A dual encoder (`DCLIPModel`, `CLIPModel` or any model with CLIP's `get_image_features` / `get_text_features`)
  embeds every image once and every text once; the metrics compare the L2-normalised embeddings.
- The teacher (`DCLIPTeacherModel`) has no standalone embeddings: it reads an image's regions together with a
  text, so it scores every (text, image) pair with `score_pairs`, over the frozen base's region embeddings
  and text token states (both cached in the feature store when one is given, see `modeling_dclip.feature_store`).
  Given a first stage's similarity matrix (`first_stage`), it re-ranks that stage's top-k in each direction
  instead (retrieve, then re-rank: how `dclip search --rerank` uses it), which fuses `k x (n_captions + n_images)`
  pairs rather than `n_captions x n_images`.

Metric names: those of `retrieval_metrics` (`text_to_image_R@1`, ..., `image_to_text_MRR`),
`compositional_accuracy`, and `zeroshot_top1` / `zeroshot_top5`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch
from datasets import ClassLabel

from .. import encoding
from ..data.captions import CaptionPairs, caption_pairs
from ..encoding import IMAGE_FEATURES, eval_mode, teacher_pair_scores
from ..feature_store import FeatureStore, RegionSource, compute_region_boxes, region_source_from_config
from ..loading import load_model_and_processor as load_model_for_evaluation
from ..modeling_dclip import DCLIPTeacherModel
from .compositional import compositional_accuracy, compositional_accuracy_from_embeddings
from .retrieval import retrieval_metrics, retrieval_metrics_from_embeddings
from .templates import get_templates
from .zeroshot import build_zeroshot_classifier

TASKS = ("retrieval", "compositional", "zeroshot")

Features = dict[str, torch.Tensor]


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
    region_source: RegionSource | None = None,
    store: FeatureStore | None = None,
    max_pairs_per_step: int = 4096,
    first_stage: torch.Tensor | None = None,
    rerank_top_k: int = 20,
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
        region_source (*optional*): teacher only: where the regions come from
            (a `RegionExtractor` or `DatasetBoxes()`); default the processor's region extractor.
        store (`FeatureStore`, *optional*): read and write embeddings, region features and token states there
            (keyed by model, data and settings); without one everything is computed afresh (training-time
            validation, whose model changes every epoch).
        max_pairs_per_step (`int`, *optional*, defaults to 4096): teacher only, pairs fused at once.
        first_stage (`torch.Tensor` of shape `[n_captions, n_images]`, *optional*): teacher only: a first stage's
            similarity (e.g. its base's embeddings); the teacher then re-scores only that stage's `rerank_top_k`
            images of each caption and captions of each image. R@K is exact for K <= `rerank_top_k`; the items
            outside a query's shortlist keep the first stage's order, below the shortlist (mAP and MRR count them
            there). Without it the teacher scores every pair.
        rerank_top_k (`int`, *optional*, defaults to 20): the shortlist's length with `first_stage`.

    Returns:
        `dict[str, float]`: the metrics of the requested tasks (see the module docstring for their names).
    """
    # Every input is checked before anything is computed, so a bad dataset fails in seconds, not after encoding.
    inputs = prepare_task_inputs(dataset, tasks, classnames, templates, label_column)
    pairs, classnames, labels, prompts = inputs.pairs, inputs.classnames, inputs.labels, inputs.templates

    if is_teacher(model):
        with eval_mode(model):
            return _evaluate_teacher(
                model,
                processor,
                dataset,
                tasks,
                pairs,
                classnames,
                prompts,
                labels,
                region_source,
                store,
                max_pairs_per_step,
                first_stage,
                rerank_top_k,
            )
    metrics: dict[str, float] = {}
    image_embeds = (
        store.image_embeddings(model, processor, dataset, batch_size)
        if store is not None
        else encoding.encode_images(model, processor, dataset, batch_size)
    )

    def encode_texts(texts: list[str]) -> torch.Tensor:
        if store is not None:
            return store.text_embeddings(model, processor, texts, 4 * batch_size)
        return encoding.encode_texts(model, processor, texts, 4 * batch_size)

    if pairs is not None:
        caption_embeds = encode_texts(pairs.captions)
        if "retrieval" in tasks:
            metrics.update(retrieval_metrics_from_embeddings(caption_embeds, image_embeds, pairs.caption_to_image))
        if "compositional" in tasks:
            negative_embeds = encode_texts(pairs.hard_negatives)
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
    region_source: RegionSource | None,
    store: FeatureStore | None,
    max_pairs_per_step: int,
    first_stage: torch.Tensor | None,
    rerank_top_k: int,
) -> dict[str, float]:
    # The teacher's own record of its regions (a detector's settings, or the dataset's boxes) unless told otherwise.
    source = region_source if region_source is not None else region_source_from_config(processor.region_config)
    if store is not None:
        region_features = store.region_features(teacher, processor, dataset, source)
    else:
        boxes = compute_region_boxes(dataset, source)
        region_features = encoding.region_features(teacher, processor, dataset, boxes)
    device = next(teacher.parameters()).device
    images = {key: region_features[key].to(device) for key in IMAGE_FEATURES}

    def teacher_text_features(texts: list[str]) -> Features:
        if store is not None:
            features = store.text_token_features(teacher, processor, texts)
        else:
            features = encoding.text_token_features(teacher, processor, texts)
        return {key: value.to(device) for key, value in features.items()}

    metrics: dict[str, float] = {}
    if pairs is not None:
        texts = teacher_text_features(pairs.captions)
        if "retrieval" in tasks and first_stage is not None:
            metrics.update(
                _reranked_retrieval(
                    teacher, images, texts, pairs.caption_to_image, first_stage, rerank_top_k, max_pairs_per_step
                )
            )
        elif "retrieval" in tasks:
            similarity = teacher.score_pairs(**images, **texts, max_pairs_per_step=max_pairs_per_step)
            metrics.update(retrieval_metrics(similarity.float().cpu(), pairs.caption_to_image))
        if "compositional" in tasks:
            negatives = teacher_text_features(pairs.hard_negatives)
            in_order = torch.arange(len(pairs.caption_to_image))
            true_scores = teacher_pair_scores(
                teacher, images, texts, pairs.caption_to_image, in_order, max_pairs_per_step
            )
            negative_scores = teacher_pair_scores(
                teacher, images, negatives, pairs.caption_to_image, in_order, max_pairs_per_step
            )
            metrics["compositional_accuracy"] = compositional_accuracy(true_scores, negative_scores)
    if "zeroshot" in tasks:
        prompts = [template.replace("{}", name) for name in classnames for template in templates]
        prompt_scores = teacher.score_pairs(
            **images, **teacher_text_features(prompts), max_pairs_per_step=max_pairs_per_step
        )
        # The teacher's text embedding depends on the image it reads with, so templates are averaged as scores.
        class_scores = prompt_scores.float().view(len(classnames), len(templates), -1).mean(dim=1)
        metrics.update(_topk_accuracy(class_scores.T.cpu(), labels))
    return metrics


def _reranked_retrieval(
    teacher: DCLIPTeacherModel,
    images: Features,
    texts: Features,
    caption_to_image: torch.Tensor,
    first_stage: torch.Tensor,
    top_k: int,
    pairs_per_step: int,
) -> dict[str, float]:
    """Retrieval metrics of the teacher re-ranking `first_stage`'s top-k in each direction (see `evaluate_model`)."""
    first_stage = first_stage.float().cpu()
    n_captions, n_images = len(caption_to_image), len(images["region_embeds"])
    if first_stage.shape != (n_captions, n_images):
        raise ValueError(
            f"first_stage has shape {tuple(first_stage.shape)}, expected [n_captions, n_images] = "
            f"[{n_captions}, {n_images}]"
        )
    if top_k < 1:
        raise ValueError(f"rerank_top_k must be at least 1, got {top_k}")
    metrics = {}
    for direction, scores in (("text_to_image", first_stage), ("image_to_text", first_stage.T)):
        k = min(top_k, scores.shape[1])
        shortlist = scores.topk(k, dim=1).indices
        queries = torch.arange(len(scores)).repeat_interleave(k)
        candidates = shortlist.reshape(-1)
        image_rows, text_rows = (candidates, queries) if direction == "text_to_image" else (queries, candidates)
        teacher_scores = teacher_pair_scores(teacher, images, texts, image_rows, text_rows, pairs_per_step).view(-1, k)
        # The rest keeps the first stage's order, moved below the lowest of the teacher's scores.
        reranked = scores - scores.max() + teacher_scores.min() - 1.0
        reranked.scatter_(1, shortlist, teacher_scores)
        found = retrieval_metrics(reranked if direction == "text_to_image" else reranked.T, caption_to_image)
        metrics.update({key: value for key, value in found.items() if key.startswith(direction)})
    return metrics


__all__ = [
    "TASKS",
    "CaptionPairs",
    "TaskInputs",
    "caption_pairs",
    "dataset_classnames",
    "evaluate_model",
    "is_teacher",
    "load_model_for_evaluation",
    "prepare_task_inputs",
    "supported_tasks",
]
