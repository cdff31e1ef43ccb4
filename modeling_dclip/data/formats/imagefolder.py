"""Classification sets laid out as `<class>/<image>` or `<split>/<class>/<image>`, read by `datasets`' imagefolder."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow.compute as pc

from .schema import DEFAULT_SPLIT, LoadReport, arrow_column, path_id, split_set

_SPLIT_DIRECTORY_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")


def load_image_folder(
    path: str | os.PathLike, *, split: str | None = None, limit: int | None = None
) -> tuple[datasets.Dataset, LoadReport]:
    """Read a classification set laid out as `<class>/<image>` (or `<split>/<class>/<image>`).

    Uses `datasets.load_dataset("imagefolder")`; the split's files are passed as one glob so that
    `datasets` does not infer data-file patterns over every file (several times slower on 10k images).
    Rows get `label` (ClassLabel, class names from the folder names), `captions` = [class name],
    `image_id` = path relative to `path` without extension, and `split`.

    Args:
        path: the folder.
        split: with split subfolders (train/val/test/...), keep these (comma-separated; default
            all); without them, the split label of every row (default "train").
        limit: keep only the first `limit` images (folder order: class by class).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    subfolders = sorted(child.name for child in root.iterdir() if child.is_dir())
    if subfolders and all(name.lower() in _SPLIT_DIRECTORY_NAMES for name in subfolders):
        wanted = split_set(split)
        if wanted is not None and not wanted <= set(subfolders):
            raise ValueError(f"{root}: no split folder {sorted(wanted - set(subfolders))}; it has {subfolders}")
        data_files = {name: str(root / name / "**") for name in subfolders if wanted is None or name in wanted}
    elif subfolders:
        data_files = {split or DEFAULT_SPLIT: str(root / "**")}
    else:
        raise ValueError(f"{root}: expected one subfolder per class, found none")
    loaded = datasets.load_dataset("imagefolder", data_files=data_files)
    if "label" not in loaded[next(iter(data_files))].column_names:
        raise ValueError(f"{root}: no class labels could be read from its subfolders")
    parts = []
    for split_name in data_files:
        part = loaded[split_name]
        parts.append(part.add_column("split", [split_name] * len(part), feature=datasets.Value("string")))
    dataset = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    class_names = dataset.features["label"].names
    image_paths = pc.struct_field(arrow_column(dataset, "image"), "path").to_pylist()
    labels = arrow_column(dataset, "label").to_pylist()
    dataset = dataset.add_column(
        "captions", [[class_names[label]] for label in labels], feature=datasets.List(datasets.Value("string"))
    )
    dataset = dataset.add_column(
        "image_id",
        [path_id(os.path.relpath(image_path, root)) for image_path in image_paths],
        feature=datasets.Value("string"),
    )
    dataset = dataset.select_columns(["image", "captions", "image_id", "split", "label"])
    return dataset, LoadReport(source=str(root), num_images=len(dataset), num_captions=len(dataset))
