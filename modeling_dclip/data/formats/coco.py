"""COCO `captions_*.json`, with boxes from `instances_*.json`."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import datasets

from .schema import (
    DEFAULT_SPLIT,
    ImageRecord,
    LoadReport,
    first_directory,
    read_json,
    records_to_dataset,
    require,
    require_list,
)


def load_coco_captions(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    instances: str | os.PathLike | None = None,
    split: str | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read COCO `captions_<set>.json` (`images` + `annotations` with `image_id` and `caption`).

    Args:
        path: the captions JSON.
        images: folder of the image files. Default: `<set>/` (e.g. `val2014/`) beside the JSON or
            beside its folder (the standard `annotations/` + `val2014/` layout), else `images/`.
        instances: `instances_<set>.json`; adds `boxes` (COCO xywh pixels -> normalised xyxy;
            crowd and empty boxes skipped) and `labels` (category ids mapped to contiguous ids in
            ascending id order; the names are those of the `labels` ClassLabel feature).
        split: split label of every row. Default: "train"/"val"/"test" read from the file name.
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = Path(path).expanduser()
    document = read_json(path)
    image_entries = require_list(document, "images", str(path))
    annotations = require_list(document, "annotations", str(path))
    set_name = path.stem.split("_", 1)[-1]
    if split is None:
        match = re.match(r"(train|val|test)", set_name)
        split = match.group(1) if match else DEFAULT_SPLIT
    image_root = (
        Path(images).expanduser()
        if images is not None
        else first_directory(
            [path.parent / set_name, path.parent.parent / set_name, path.parent / "images"], fallback=path.parent
        )
    )
    boxes_by_image, box_label_names = read_coco_instances(instances) if instances is not None else ({}, None)

    records_by_id: dict[int, ImageRecord] = {}
    for index, entry in enumerate(image_entries):
        where = f"{path}: images[{index}]"
        image_id = int(require(entry, "id", where))
        record = ImageRecord(
            image=str(image_root / str(require(entry, "file_name", where))),
            image_id=str(image_id),
            split=split,
            captions=[],
        )
        if box_label_names is not None:
            record.boxes, record.labels = boxes_by_image.get(image_id, ([], []))
        records_by_id[image_id] = record
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        image_id = int(require(annotation, "image_id", where))
        if image_id not in records_by_id:
            raise ValueError(f"{where}: image_id {image_id} is not among the file's images")
        records_by_id[image_id].captions.append(require(annotation, "caption", where))
    return records_to_dataset(list(records_by_id.values()), str(path), skip_missing, limit, box_label_names)


def read_coco_instances(
    path: str | os.PathLike,
) -> tuple[dict[int, tuple[list[list[float]], list[int]]], list[str]]:
    """Boxes per COCO image id from `instances_*.json`, and the label names.

    Returns:
        `{image_id: (boxes, labels)}` with boxes normalised xyxy and labels contiguous ids, and the
        category names in contiguous-id order.
    """
    path = Path(path).expanduser()
    document = read_json(path)
    categories = sorted(require_list(document, "categories", str(path)), key=lambda category: category["id"])
    contiguous_id = {category["id"]: index for index, category in enumerate(categories)}
    sizes = {}
    for index, entry in enumerate(require_list(document, "images", str(path))):
        where = f"{path}: images[{index}]"
        sizes[int(require(entry, "id", where))] = (
            float(require(entry, "width", where)),
            float(require(entry, "height", where)),
        )
    boxes_by_image: dict[int, tuple[list[list[float]], list[int]]] = {}
    for index, annotation in enumerate(require_list(document, "annotations", str(path))):
        where = f"{path}: annotations[{index}]"
        # Crowd boxes cover a group of objects, not one region; COCO detectors skip them too.
        if annotation.get("iscrowd", 0):
            continue
        image_id = int(require(annotation, "image_id", where))
        category_id = require(annotation, "category_id", where)
        if image_id not in sizes:
            raise ValueError(f"{where}: image_id {image_id} is not among the file's images")
        if category_id not in contiguous_id:
            raise ValueError(f"{where}: category_id {category_id} is not among the file's categories")
        box = _normalised_xyxy(require(annotation, "bbox", where), *sizes[image_id], where)
        if box is None:
            continue
        boxes, labels = boxes_by_image.setdefault(image_id, ([], []))
        boxes.append(box)
        labels.append(contiguous_id[category_id])
    return boxes_by_image, [str(category["name"]) for category in categories]


def _normalised_xyxy(bbox: Any, width: float, height: float, where: str) -> list[float] | None:
    """COCO `[x, y, w, h]` in pixels -> `[x1, y1, x2, y2]` in [0, 1]; None for an empty box."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"{where}: 'bbox' must be [x, y, width, height], got {bbox!r}")
    if width <= 0 or height <= 0:
        raise ValueError(f"{where}: its image has size {width}x{height}")
    x, y, box_width, box_height = (float(value) for value in bbox)
    x1, y1 = min(max(x / width, 0.0), 1.0), min(max(y / height, 0.0), 1.0)
    x2, y2 = min(max((x + box_width) / width, 0.0), 1.0), min(max((y + box_height) / height, 0.0), 1.0)
    if x2 <= x1 or y2 <= y1:
        return None
    return [x1, y1, x2, y2]
