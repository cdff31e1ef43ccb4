"""
Zero-shot image classification with a dual encoder, as in CLIP: each class is the renormalised mean of the
L2-normalised text embeddings of its prompts (class name x templates), and an image is given the classes whose
embeddings are closest to its own.

The model follows `CLIPModel`'s interface (`get_text_features` / `get_image_features` returning outputs whose
`pooler_output` is the projected embedding) and the processor `CLIPProcessor`'s (`processor(text=...)`,
`processor(images=...)`); `DCLIPModel` and `DCLIPProcessor` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset

from ..encoding import check_batch_size, encode_images, encode_texts
from .templates import get_templates


@torch.no_grad()
def build_zeroshot_classifier(
    model, processor, classnames: Sequence[str], templates: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """
    The zero-shot classifier of `classnames`: one unit vector per class, the renormalised mean of the
    L2-normalised text embeddings of each template with `{}` replaced by the class name (CLIP's prompt ensembling).

    Args:
        model: a dual encoder with `get_text_features(input_ids=, attention_mask=).pooler_output`.
        processor: its processor; `processor(text=[...], return_tensors="pt", padding=True)` tokenizes.
        classnames (`Sequence[str]`): one name per class, in label order.
        templates (`Sequence[str]`): prompt templates, each with one `{}` placeholder for the class name.
        batch_size (`int`, *optional*, defaults to 256): prompts encoded at once.

    Returns:
        `torch.Tensor` of shape `[n_classes, dim]` (float32, unit rows, on the model's device).
    """
    if isinstance(classnames, str) or len(classnames) == 0:
        raise ValueError(f"classnames must be a non-empty sequence of class names, got {classnames!r}")
    if isinstance(templates, str) or len(templates) == 0:
        raise ValueError(f"templates must be a non-empty sequence of templates, got {templates!r}")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' placeholder for the class name")
    check_batch_size(batch_size)

    prompts = [template.replace("{}", classname) for classname in classnames for template in templates]
    device = next(model.parameters()).device
    prompt_embeds = encode_texts(model, processor, prompts, batch_size).to(device)
    class_embeds = prompt_embeds.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(class_embeds, dim=-1)


@torch.no_grad()
def zeroshot_classification(
    model,
    processor,
    dataset: Dataset,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = 64,
    image_column: str = "image",
    label_column: str = "label",
) -> dict[str, float]:
    """
    Zero-shot top-1 and top-5 accuracy of a dual encoder on a labelled image dataset.

    Args:
        model: a dual encoder (see the module docstring).
        processor: its processor.
        dataset (`datasets.Dataset`): rows with an image (PIL on access, e.g. a `datasets.Image()` feature) and an
            integer label in `[0, n_classes)`.
        classnames (`Sequence[str]`, *optional*): one name per label; defaults to the names of the label column's
            `ClassLabel` feature.
        templates (`Sequence[str]`, *optional*): prompt templates with one `{}`; defaults to
            `get_templates("simple")` (`"a photo of a {}."`).
        batch_size (`int`, *optional*, defaults to 64): images (and prompts) encoded at once.
        image_column (`str`, *optional*, defaults to `"image"`): the column holding the images.
        label_column (`str`, *optional*, defaults to `"label"`): the column holding the labels.

    Returns:
        `dict` with `"top1"` and `"top5"` (fractions in [0, 1]; with fewer than 5 classes "top5" is top-n_classes,
        i.e. 1.0) and `"n"`, the number of images.
    """
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no column {column!r}; its columns are {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if classnames is None:
        label_feature = dataset.features[label_column]
        if not isinstance(label_feature, ClassLabel):
            raise ValueError(
                f"column {label_column!r} is not a ClassLabel feature ({label_feature}); pass classnames explicitly"
            )
        classnames = label_feature.names
    templates = get_templates("simple") if templates is None else templates
    check_batch_size(batch_size)

    classifier = build_zeroshot_classifier(model, processor, classnames, templates, batch_size)
    labels = torch.as_tensor(dataset.select_columns([label_column])[label_column], dtype=torch.long)
    invalid = (labels < 0) | (labels >= len(classnames))
    if bool(invalid.any()):
        row = int(torch.nonzero(invalid)[0])
        raise ValueError(
            f"dataset row {row}: {label_column!r} = {int(labels[row])} is not a class index "
            f"(there are {len(classnames)} classes)"
        )
    # Only the image column is read, so other columns (captions, boxes, ...) are never decoded.
    image_embeds = encode_images(model, processor, dataset.select_columns([image_column]), batch_size, image_column)
    predictions = (image_embeds @ classifier.cpu().T).topk(min(5, len(classnames)), dim=1).indices
    hits = predictions == labels[:, None]
    n_top1, n_top5 = int(hits[:, 0].sum()), int(hits.any(dim=1).sum())
    return {"top1": n_top1 / len(dataset), "top5": n_top5 / len(dataset), "n": len(dataset)}
