"""Karpathy split files (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`)."""

from __future__ import annotations

import os
from pathlib import Path

import datasets

from .coco import read_coco_instances
from .schema import (
    ImageRecord,
    LoadReport,
    first_directory,
    karpathy_sentence,
    read_json,
    records_to_dataset,
    require,
    require_list,
    split_set,
)


def load_karpathy(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    split: str | None = None,
    restval_as_train: bool = True,
    instances: str | os.PathLike | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read a Karpathy split file (`dataset_flickr8k.json`, `dataset_flickr30k.json`, `dataset_coco.json`).

    Args:
        path: the JSON file, or a directory holding exactly one `dataset_*.json`.
        images: image root; an entry's file is `images/[filepath/]filename`. Default: the JSON's
            folder's `images/` subfolder when it exists, else the JSON's folder.
        split: keep these splits only (comma-separated, e.g. "test" or "train,val"); default all.
        restval_as_train: COCO's "restval" images (the val2014 images outside the 5k val/test
            splits) are labelled "train", as in Karpathy's own training setup.
        instances: a COCO `instances_*.json` giving each image's boxes, matched on `cocoid`.
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = _find_karpathy_file(Path(path).expanduser())
    document = read_json(path)
    entries = require_list(document, "images", str(path))
    image_root = (
        Path(images).expanduser()
        if images is not None
        else first_directory([path.parent / "images"], fallback=path.parent)
    )
    wanted = split_set(split)
    boxes_by_coco_id, box_label_names = read_coco_instances(instances) if instances is not None else ({}, None)

    records = []
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        entry_split = str(require(entry, "split", where))
        if restval_as_train and entry_split == "restval":
            entry_split = "train"
        if wanted is not None and entry_split not in wanted:
            continue
        relative = Path(entry.get("filepath", "")) / str(require(entry, "filename", where))
        coco_id = entry.get("cocoid")
        record = ImageRecord(
            image=str(image_root / relative),
            image_id=str(coco_id) if coco_id is not None else relative.with_suffix("").as_posix(),
            split=entry_split,
            captions=[
                karpathy_sentence(sentence, f"{where}.sentences[{i}]")
                for i, sentence in enumerate(require_list(entry, "sentences", where))
            ],
        )
        if box_label_names is not None:
            if coco_id is None:
                raise ValueError(f"{where}: has no 'cocoid', so boxes from {instances} cannot be matched to it")
            record.boxes, record.labels = boxes_by_coco_id.get(int(coco_id), ([], []))
        records.append(record)
    if wanted is not None and not records:
        raise ValueError(
            f"{path}: no image has split {sorted(wanted)}; splits present: "
            f"{sorted({str(e.get('split')) for e in entries})}"
        )
    return records_to_dataset(records, str(path), skip_missing, limit, box_label_names)


def _find_karpathy_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    candidates = sorted(path.glob("dataset_*.json"))
    if len(candidates) != 1:
        raise FileNotFoundError(
            f"{path}: expected exactly one Karpathy split file 'dataset_*.json', found "
            f"{[c.name for c in candidates] or 'none'}"
        )
    return candidates[0]
