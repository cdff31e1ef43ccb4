"""Export a dataset with boxes as an ultralytics YOLO detection dataset, for `dclip train-detector`.

Any canonical dataset with `boxes` (normalised xyxy) and `labels` (ClassLabel ids) exports: the synthetic scenes
(`synthetic:?n=500`), COCO captions with `instances=...`, a Karpathy COCO file with `instances=...`. From the
command line: `dclip export-yolo --data SPEC --output DIR`, then `dclip train-detector --data DIR/data.yaml`.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from datasets import ClassLabel, Dataset, DatasetDict
from datasets import Image as ImageFeature
from PIL import Image

from ..atomic import atomic_path

_SPLIT_ALIASES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
_IMAGE_SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "WEBP": ".webp", "TIFF": ".tif"}


def export_yolo(
    dataset: Dataset | DatasetDict,
    out_dir: str | Path,
    val_fraction: float = 0.2,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> Path:
    """Write a dataset with `boxes` (normalised xyxy) and `labels` as an ultralytics YOLO detection dataset.

    Layout: `images/{split}/{row:06d}.png|jpg`, `labels/{split}/{row:06d}.txt` (one `class cx cy w h` line
    per box, normalised), and `data.yaml` (`path`, `train`, `val`, optional `test`, `names`). The folder is
    written under a temporary name and renamed into place when complete (`modeling_dclip.atomic`).

    Args:
        dataset: a `DatasetDict` with a "train" split and a "val" (or "validation") split, and optionally "test";
            or a `Dataset` whose `split` column holds "train" and "val" (or "validation") rows, exported by that
            column; or any other `Dataset`, split at random into train / val by `val_fraction`.
        out_dir: destination; must not exist or be empty, so stale files never mix into the export.
        val_fraction: fraction of a randomly split `Dataset` held out for val (at least one row each side).
        seed: seed of the random train / val split.
        names: class names by id; defaults to the names of the `labels` ClassLabel feature.

    Returns:
        Path to `data.yaml`, ready for `dclip train-detector --data` or `YOLO(...).train(data=...)`. The file
        stems are row numbers in the (source) split, so every exported image traces back to its row. Every row's
        boxes and labels are checked before any file is written; a bad one raises `ValueError` naming split, row,
        image_id, field.
    """
    root = Path(out_dir).resolve()
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"export_yolo: out_dir {root} is not empty; choose a new or empty directory")
    splits, class_names = _export_splits(dataset, val_fraction, seed, names)
    label_files = {}
    for split, (part, rows) in splits.items():
        missing = {"image", "boxes", "labels"} - set(part.column_names)
        if missing:
            raise ValueError(f"export_yolo: split {split!r} lacks column(s) {sorted(missing)}")
        label_files[split] = _label_files(part, rows, split, len(class_names))

    with atomic_path(root) as temporary:
        for split, (part, rows) in splits.items():
            image_dir, label_dir = temporary / "images" / split, temporary / "labels" / split
            image_dir.mkdir(parents=True)
            label_dir.mkdir(parents=True)
            _write_images(part, rows, image_dir, split)
            for row, content in zip(rows, label_files[split]):
                (label_dir / f"{row:06d}.txt").write_text(content)
        spec = {"path": str(root), **{split: f"images/{split}" for split in splits}}
        spec["names"] = dict(enumerate(class_names))
        (temporary / "data.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "data.yaml"


def _export_splits(
    dataset: Dataset | DatasetDict, val_fraction: float, seed: int, names: Sequence[str] | None
) -> tuple[dict[str, tuple[Dataset, list[int]]], list[str]]:
    """`{yolo split: (dataset, its rows)}` and the class names."""
    splits: dict[str, tuple[Dataset, list[int]]] = {}
    if isinstance(dataset, DatasetDict):
        for split, aliases in _SPLIT_ALIASES.items():
            key = next((alias for alias in aliases if alias in dataset), None)
            if key is not None:
                splits[split] = (dataset[key], list(range(len(dataset[key]))))
        if "train" not in splits or "val" not in splits:
            raise ValueError(
                f"export_yolo: the DatasetDict needs 'train' and 'val' (or 'validation') splits, got {list(dataset)}"
            )
        return splits, _class_names(dataset[next(iter(dataset))], names)

    labels = dataset.with_format("arrow")["split"].to_pylist() if "split" in dataset.column_names else []
    for split, aliases in _SPLIT_ALIASES.items():
        rows = [row for row, label in enumerate(labels) if label in aliases]
        if rows:
            splits[split] = (dataset, rows)
    if "train" in splits and "val" in splits:
        return splits, _class_names(dataset, names)
    if not 0 < val_fraction < 1:
        raise ValueError(f"export_yolo: val_fraction must be in (0, 1), got {val_fraction}")
    if len(dataset) < 2:
        raise ValueError(f"export_yolo: a single Dataset needs at least 2 rows to split, got {len(dataset)}")
    order = np.random.default_rng(seed).permutation(len(dataset))
    num_val = min(max(1, round(val_fraction * len(dataset))), len(dataset) - 1)
    splits = {"train": (dataset, sorted(order[num_val:].tolist())), "val": (dataset, sorted(order[:num_val].tolist()))}
    return splits, _class_names(dataset, names)


def _class_names(dataset: Dataset, names: Sequence[str] | None) -> list[str]:
    if names is not None:
        return list(names)
    labels_feature = dataset.features.get("labels")
    inner = getattr(labels_feature, "feature", None)
    if isinstance(inner, ClassLabel):
        return list(inner.names)
    raise ValueError(
        "export_yolo needs class names: the dataset's 'labels' column is not a list of ClassLabel; pass names=[...]"
    )


def _label_lines(boxes: Sequence[Sequence[float]], labels: Sequence[int], num_classes: int, where: str) -> str:
    if len(boxes) != len(labels):
        raise ValueError(f"{where}: 'boxes' has {len(boxes)} entries but 'labels' has {len(labels)}")
    lines = []
    for k, (box, label) in enumerate(zip(boxes, labels)):
        if len(box) != 4:
            raise ValueError(f"{where}: field 'boxes'[{k}] = {box} is not [x1, y1, x2, y2]")
        x1, y1, x2, y2 = box
        if not (-1e-6 <= x1 < x2 <= 1 + 1e-6 and -1e-6 <= y1 < y2 <= 1 + 1e-6):
            raise ValueError(f"{where}: field 'boxes'[{k}] = {list(box)} is not a normalised xyxy box inside [0, 1]")
        if not 0 <= label < num_classes:
            raise ValueError(f"{where}: field 'labels'[{k}] = {label} is not a class id in [0, {num_classes})")
        x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in box)
        lines.append(f"{label} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}")
    return "".join(line + "\n" for line in lines)


def _label_files(dataset: Dataset, rows: Sequence[int], split: str, num_classes: int) -> list[str]:
    """Label-file contents for `rows`, all validated before anything is written."""
    annotations = dataset.select_columns([c for c in ("image_id", "boxes", "labels") if c in dataset.column_names])
    contents = []
    for row in rows:
        example = annotations[row]
        where = f"{split} row {row} (image_id={example.get('image_id', '?')})"
        for field_name in ("boxes", "labels"):
            if example[field_name] is None:
                raise ValueError(f"{where}: field {field_name!r} is missing")
        contents.append(_label_lines(example["boxes"], example["labels"], num_classes, where))
    return contents


def _write_images(dataset: Dataset, rows: Sequence[int], image_dir: Path, split: str) -> None:
    """Copy each row's encoded image (bytes or file) as is when ultralytics reads its format, else write a PNG."""
    raw = dataset.cast_column("image", ImageFeature(decode=False))
    for row in rows:
        encoded = raw[row]["image"]
        if encoded is None:
            raise ValueError(f"{split} row {row}: field 'image' is missing")
        if encoded.get("bytes") is not None:
            data = encoded["bytes"]
            with Image.open(io.BytesIO(data)) as probe:
                suffix = _IMAGE_SUFFIXES.get(probe.format or "")
                if suffix is None:
                    buffer = io.BytesIO()
                    probe.convert("RGB").save(buffer, format="PNG")
                    data, suffix = buffer.getvalue(), ".png"
            (image_dir / f"{row:06d}{suffix}").write_bytes(data)
        else:
            source = Path(encoded["path"])
            if not source.is_file():
                raise FileNotFoundError(f"{split} row {row}: image file {source} does not exist")
            with Image.open(source) as image:
                suffix = _IMAGE_SUFFIXES.get(image.format or "")
                if suffix is None:
                    image.convert("RGB").save(image_dir / f"{row:06d}.png")
            if suffix is not None:
                shutil.copyfile(source, image_dir / f"{row:06d}{suffix}")
