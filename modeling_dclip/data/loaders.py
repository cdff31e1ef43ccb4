"""Readers that turn standard image–caption formats into the canonical dataset schema.

Canonical schema (a `datasets.Dataset`, one row per image):

- `image`: `datasets.Image()`; rows store the file path and decode lazily on access, so loading
  never opens an image file;
- `captions`: `list[str]`, one or more non-empty captions;
- `image_id`: `str`, the dataset's own id when it has one (COCO id, Karpathy `cocoid`), otherwise
  the image path relative to the image root without its extension (Flickr: the file stem);
- `split`: `str` ("train", "val", "test", ...);
- optional `boxes` (`[x1, y1, x2, y2]` normalised to [0, 1]) with `labels` (a list of
  `ClassLabel` ids whose names are the detector classes), from COCO `instances_*.json`;
- optional `label` (`ClassLabel`), for classification sets; their `captions` hold the class name.

Every reader returns `(dataset, LoadReport)`. Two kinds of bad rows are screened out:

- *missing images* (no file at the resolved path, or a URL: nothing is downloaded here);
- *uncaptioned images* (no non-empty caption). Empty or whitespace-only captions are always dropped
  with a warning; an image left with none is a bad row.

By default a bad row is an error (`FileNotFoundError` for missing images, `ValueError` for
uncaptioned ones) giving the count and the first paths or ids. With `skip_missing=True` bad rows are
dropped, a warning is logged, and the returned `LoadReport` lists every dropped path and id.

Formats without their own split labels (Flickr30k CSV, TSV, tables without a split column,
image folders without split subfolders) label every row `split` when given, else "train", as
`datasets.load_dataset` does for local files.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "train"
# How many offending paths or ids an error or warning quotes.
_QUOTED = 5
_URL_PREFIXES = ("http://", "https://", "s3://", "gs://")
_IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "file_name", "filename", "filepath", "path", "img")
_CAPTION_COLUMN_CANDIDATES = ("captions", "caption", "text", "sentences", "sentence", "raw")
_IMAGE_ID_COLUMN_CANDIDATES = ("image_id", "img_id", "imgid", "cocoid", "id")
_SPLIT_DIRECTORY_NAMES = ("train", "training", "val", "valid", "validation", "dev", "test", "testing")


@dataclass
class LoadReport:
    """What a reader kept and what it dropped.

    Attributes:
        source: the file or dataset read.
        num_images: rows in the returned dataset.
        num_captions: captions in the returned dataset.
        missing_images: paths (or URLs) of images that were not found, in file order.
        uncaptioned_images: ids of images that had no non-empty caption.
        empty_captions_dropped: empty or whitespace-only captions removed from kept and dropped images.
    """

    source: str
    num_images: int = 0
    num_captions: int = 0
    missing_images: list[str] = field(default_factory=list)
    uncaptioned_images: list[str] = field(default_factory=list)
    empty_captions_dropped: int = 0

    @property
    def num_dropped(self) -> int:
        return len(self.missing_images) + len(self.uncaptioned_images)

    def summary(self) -> str:
        """One line: what was kept, then what was dropped, quoting the first few paths and ids."""
        parts = [f"{self.source}: {self.num_images} images, {self.num_captions} captions"]
        if self.missing_images:
            parts.append(f"{len(self.missing_images)} missing images dropped ({_quote(self.missing_images)})")
        if self.uncaptioned_images:
            parts.append(
                f"{len(self.uncaptioned_images)} uncaptioned images dropped ({_quote(self.uncaptioned_images)})"
            )
        if self.empty_captions_dropped:
            parts.append(f"{self.empty_captions_dropped} empty captions dropped")
        return "; ".join(parts)


def canonical_features(
    box_label_names: Sequence[str] | None = None, class_names: Sequence[str] | None = None
) -> datasets.Features:
    """Features of the canonical schema.

    Args:
        box_label_names: when given, adds `boxes` (normalised xyxy) and `labels` (ids into these names).
        class_names: when given, adds a classification `label` with these names.
    """
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "captions": datasets.List(datasets.Value("string")),
            "image_id": datasets.Value("string"),
            "split": datasets.Value("string"),
        }
    )
    if box_label_names is not None:
        features["boxes"] = datasets.List(datasets.List(datasets.Value("float32"), length=4))
        features["labels"] = datasets.List(datasets.ClassLabel(names=list(box_label_names)))
    if class_names is not None:
        features["label"] = datasets.ClassLabel(names=list(class_names))
    return features


# --------------------------------------------------------------------------------------------
# Karpathy split JSON
# --------------------------------------------------------------------------------------------


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
    document = _read_json(path)
    entries = _require_list(document, "images", str(path))
    image_root = Path(images).expanduser() if images is not None else _default_image_root(path.parent, ("images",))
    wanted = _split_set(split)
    boxes_by_coco_id, box_label_names = _read_coco_instances(instances) if instances is not None else ({}, None)

    records = []
    for index, entry in enumerate(entries):
        where = f"{path}: images[{index}]"
        entry_split = str(_require(entry, "split", where))
        if restval_as_train and entry_split == "restval":
            entry_split = "train"
        if wanted is not None and entry_split not in wanted:
            continue
        relative = Path(entry.get("filepath", "")) / str(_require(entry, "filename", where))
        coco_id = entry.get("cocoid")
        record = _ImageRecord(
            image=str(image_root / relative),
            image_id=str(coco_id) if coco_id is not None else relative.with_suffix("").as_posix(),
            split=entry_split,
            captions=[
                _karpathy_sentence(sentence, f"{where}.sentences[{i}]")
                for i, sentence in enumerate(_require_list(entry, "sentences", where))
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
    return _records_to_dataset(records, str(path), skip_missing, limit, box_label_names)


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


def _karpathy_sentence(sentence: Any, where: str) -> str:
    if not isinstance(sentence, dict):
        raise ValueError(f"{where}: expected an object with 'raw', got {type(sentence).__name__}")
    if "raw" in sentence:
        return sentence["raw"]
    return " ".join(_require_list(sentence, "tokens", where))


# --------------------------------------------------------------------------------------------
# COCO captions_*.json (+ instances_*.json)
# --------------------------------------------------------------------------------------------


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
    document = _read_json(path)
    image_entries = _require_list(document, "images", str(path))
    annotations = _require_list(document, "annotations", str(path))
    set_name = path.stem.split("_", 1)[-1]
    if split is None:
        match = re.match(r"(train|val|test)", set_name)
        split = match.group(1) if match else DEFAULT_SPLIT
    image_root = (
        Path(images).expanduser()
        if images is not None
        else _first_directory(
            [path.parent / set_name, path.parent.parent / set_name, path.parent / "images"], fallback=path.parent
        )
    )
    boxes_by_image, box_label_names = _read_coco_instances(instances) if instances is not None else ({}, None)

    records_by_id: dict[int, _ImageRecord] = {}
    for index, entry in enumerate(image_entries):
        where = f"{path}: images[{index}]"
        image_id = int(_require(entry, "id", where))
        record = _ImageRecord(
            image=str(image_root / str(_require(entry, "file_name", where))),
            image_id=str(image_id),
            split=split,
            captions=[],
        )
        if box_label_names is not None:
            record.boxes, record.labels = boxes_by_image.get(image_id, ([], []))
        records_by_id[image_id] = record
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        image_id = int(_require(annotation, "image_id", where))
        if image_id not in records_by_id:
            raise ValueError(f"{where}: image_id {image_id} is not among the file's images")
        records_by_id[image_id].captions.append(_require(annotation, "caption", where))
    return _records_to_dataset(list(records_by_id.values()), str(path), skip_missing, limit, box_label_names)


def _read_coco_instances(
    path: str | os.PathLike,
) -> tuple[dict[int, tuple[list[list[float]], list[int]]], list[str]]:
    """Boxes per COCO image id from `instances_*.json`, and the label names.

    Returns:
        `{image_id: (boxes, labels)}` with boxes normalised xyxy and labels contiguous ids, and the
        category names in contiguous-id order.
    """
    path = Path(path).expanduser()
    document = _read_json(path)
    categories = sorted(_require_list(document, "categories", str(path)), key=lambda category: category["id"])
    contiguous_id = {category["id"]: index for index, category in enumerate(categories)}
    sizes = {}
    for index, entry in enumerate(_require_list(document, "images", str(path))):
        where = f"{path}: images[{index}]"
        sizes[int(_require(entry, "id", where))] = (
            float(_require(entry, "width", where)),
            float(_require(entry, "height", where)),
        )
    boxes_by_image: dict[int, tuple[list[list[float]], list[int]]] = {}
    for index, annotation in enumerate(_require_list(document, "annotations", str(path))):
        where = f"{path}: annotations[{index}]"
        # Crowd boxes cover a group of objects, not one region; COCO detectors skip them too.
        if annotation.get("iscrowd", 0):
            continue
        image_id = int(_require(annotation, "image_id", where))
        category_id = _require(annotation, "category_id", where)
        if image_id not in sizes:
            raise ValueError(f"{where}: image_id {image_id} is not among the file's images")
        if category_id not in contiguous_id:
            raise ValueError(f"{where}: category_id {category_id} is not among the file's categories")
        box = _normalised_xyxy(_require(annotation, "bbox", where), *sizes[image_id], where)
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


# --------------------------------------------------------------------------------------------
# Flickr30k results.csv, Conceptual-Captions TSV, generic JSONL / CSV tables
# --------------------------------------------------------------------------------------------


def load_flickr30k_csv(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    split: str | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read Flickr30k captions as distributed on Kaggle.

    Two layouts: `results.csv` with header `image_name| comment_number| comment` ('|'-separated,
    padded with spaces; the one known row that lost its second '|' is repaired), and the newer
    comma CSV with header `image_name,comment_number,comment` or `image,caption` (quoted fields).

    Args:
        path: the CSV file.
        images: image folder. Default: `flickr30k_images/`, `Images/` or `images/` beside the CSV,
            else the CSV's folder.
        split: split label of every row (the file has none); default "train".
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = Path(path).expanduser()
    image_root = (
        Path(images).expanduser()
        if images is not None
        else _default_image_root(path.parent, ("flickr30k_images", "Images", "images"))
    )
    with path.open(newline="", encoding="utf-8") as file:
        header = file.readline()
        rows = _read_pipe_rows(file, path) if "|" in header else _read_comma_rows(header, file, path)
        records = _group_by_image(rows, image_root, split or DEFAULT_SPLIT)
    return _records_to_dataset(records, str(path), skip_missing, limit)


def _read_pipe_rows(lines: Iterable[str], path: Path) -> Iterable[tuple[str, str, str]]:
    for line_number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = [value.strip() for value in line.rstrip("\r\n").split("|", 2)]
        if len(fields) == 2:
            # Kaggle's results.csv has a row "<image>| 4 A dog runs ..." that lost a separator.
            repaired = re.match(r"(\d+)\s+(.*)", fields[1])
            if repaired is None:
                raise ValueError(f"{path}: line {line_number}: expected 'image_name| comment_number| comment'")
            fields = [fields[0], repaired.group(1), repaired.group(2)]
        if len(fields) != 3:
            raise ValueError(f"{path}: line {line_number}: expected 'image_name| comment_number| comment'")
        yield f"{path}: line {line_number}", fields[0], fields[2]


def _read_comma_rows(header: str, lines: Iterable[str], path: Path) -> Iterable[tuple[str, str, str]]:
    columns = [name.strip().lower() for name in next(csv.reader([header]))]
    image_index = _column_index(columns, ("image_name", "image"), path)
    caption_index = _column_index(columns, ("comment", "caption"), path)
    for line_number, fields in enumerate(csv.reader(lines), start=2):
        if not fields:
            continue
        if len(fields) != len(columns):
            raise ValueError(f"{path}: line {line_number}: {len(fields)} fields, header has {len(columns)}")
        yield f"{path}: line {line_number}", fields[image_index].strip(), fields[caption_index]


def _column_index(columns: list[str], candidates: Sequence[str], path: Path) -> int:
    for candidate in candidates:
        if candidate in columns:
            return columns.index(candidate)
    raise ValueError(f"{path}: header has none of the columns {list(candidates)}; it has {columns}")


def load_caption_tsv(
    path: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    split: str | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read a Conceptual-Captions-style TSV: `caption<TAB>image` per line, no header.

    Rows of the same image are grouped. Only local files can be read: a URL counts as a missing
    image (download the images first and write their local paths).

    Args:
        path: the TSV file.
        images: root that relative image paths are resolved against. Default: the TSV's folder.
        split: split label of every row; default "train".
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = Path(path).expanduser()
    image_root = Path(images).expanduser() if images is not None else path.parent

    def rows() -> Iterable[tuple[str, str, str]]:
        with path.open(encoding="utf-8") as file:
            for line_number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("\t")
                if len(fields) != 2:
                    raise ValueError(
                        f"{path}: line {line_number}: expected 'caption<TAB>image', got {len(fields)} fields"
                    )
                yield f"{path}: line {line_number}", fields[1].strip(), fields[0]

    records = _group_by_image(rows(), image_root, split or DEFAULT_SPLIT)
    return _records_to_dataset(records, str(path), skip_missing, limit)


def load_caption_table(
    path: str | os.PathLike,
    *,
    file_format: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    image_id_column: str | None = None,
    split_column: str | None = None,
    split: str | None = None,
    images: str | os.PathLike | None = None,
    delimiter: str | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read a JSON Lines or CSV table of image paths and captions.

    A row holds one caption (rows of the same image are grouped, in file order) or a list of
    captions (JSON Lines only).

    Args:
        path: the `.jsonl` or `.csv` / `.tsv` file.
        file_format: "jsonl" or "csv"; default from the file extension.
        image_column: column of image paths; default the first of image, image_path, file_name,
            filename, filepath, path, img that the table has.
        caption_column: column of captions; default the first of captions, caption, text,
            sentences, sentence, raw.
        image_id_column: column of image ids; default the image path without extension.
        split_column: column of per-row split labels; default "split" when the table has one.
        split: with a split column, keep these splits (comma-separated); without one, the split
            label of every row (default "train").
        images: root that relative image paths are resolved against. Default: the table's folder.
        delimiter: CSV field separator ("tab" or a character); default "," (tab for `.tsv`).
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = Path(path).expanduser()
    file_format = file_format or ("jsonl" if path.suffix.lower() in (".jsonl", ".json") else "csv")
    if file_format == "jsonl":
        rows = list(_read_jsonl(path))
    elif file_format == "csv":
        rows = list(_read_csv(path, delimiter))
    else:
        raise ValueError(f"{path}: file_format must be 'jsonl' or 'csv', got {file_format!r}")
    if not rows:
        raise ValueError(f"{path}: the table has no rows")
    columns = list(rows[0][1])
    image_column = _pick_column(image_column, _IMAGE_COLUMN_CANDIDATES, columns, "image_column", str(path))
    caption_column = _pick_column(caption_column, _CAPTION_COLUMN_CANDIDATES, columns, "caption_column", str(path))
    if split_column is None and "split" in columns:
        split_column = "split"
    wanted = _split_set(split) if split_column is not None else None
    image_root = Path(images).expanduser() if images is not None else path.parent

    records_by_image: dict[str, _ImageRecord] = {}
    for where, row in rows:
        image_value = str(_require(row, image_column, where)).strip()
        row_split = str(_require(row, split_column, where)) if split_column is not None else split or DEFAULT_SPLIT
        if wanted is not None and row_split not in wanted:
            continue
        record = records_by_image.get(image_value)
        if record is None:
            record = records_by_image[image_value] = _ImageRecord(
                image=_resolve_image(image_value, image_root),
                image_id=str(_require(row, image_id_column, where)) if image_id_column else _path_id(image_value),
                split=row_split,
                captions=[],
            )
        elif record.split != row_split:
            raise ValueError(
                f"{where}: image {image_value!r} is in split {row_split!r} here and {record.split!r} on an earlier row"
            )
        record.captions.extend(_caption_values(_require(row, caption_column, where), where))
    if wanted is not None and not records_by_image:
        raise ValueError(f"{path}: no row has {split_column} in {sorted(wanted)}")
    return _records_to_dataset(list(records_by_image.values()), str(path), skip_missing, limit)


def _read_jsonl(path: Path) -> Iterable[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            yield where, row


def _read_csv(path: Path, delimiter: str | None) -> Iterable[tuple[str, dict[str, Any]]]:
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    elif delimiter.lower() in ("tab", "\\t"):
        delimiter = "\t"
    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file, delimiter=delimiter)
        for row in reader:
            where = f"{path}: line {reader.line_num}"
            if None in row:
                raise ValueError(f"{where}: more fields than the header's {len(reader.fieldnames)}")
            yield where, row


def _caption_values(value: Any, where: str) -> list[str]:
    """A caption cell as a list: a string, a list of strings, or Karpathy-style `[{"raw": ...}]`."""
    if value is None or isinstance(value, str):
        return [value or ""]
    if isinstance(value, list):
        return [
            _karpathy_sentence(item, where) if isinstance(item, dict) else _caption_string(item, where)
            for item in value
        ]
    raise ValueError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__}")


def _caption_string(value: Any, where: str) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: a caption must be a string, got {type(value).__name__}")
    return value or ""


def _group_by_image(rows: Iterable[tuple[str, str, str]], image_root: Path, split: str) -> list[_ImageRecord]:
    """Group `(where, image, caption)` rows into one record per image, in order of first appearance."""
    records_by_image: dict[str, _ImageRecord] = {}
    for where, image_value, caption in rows:
        if not image_value:
            raise ValueError(f"{where}: the image field is empty")
        record = records_by_image.get(image_value)
        if record is None:
            record = records_by_image[image_value] = _ImageRecord(
                image=_resolve_image(image_value, image_root), image_id=_path_id(image_value), split=split, captions=[]
            )
        record.captions.append(caption)
    return list(records_by_image.values())


# --------------------------------------------------------------------------------------------
# Image-folder classification sets
# --------------------------------------------------------------------------------------------


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
        wanted = _split_set(split)
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
    image_paths = pc.struct_field(_arrow_column(dataset, "image"), "path").to_pylist()
    labels = _arrow_column(dataset, "label").to_pylist()
    dataset = dataset.add_column(
        "captions", [[class_names[label]] for label in labels], feature=datasets.List(datasets.Value("string"))
    )
    dataset = dataset.add_column(
        "image_id",
        [_path_id(os.path.relpath(image_path, root)) for image_path in image_paths],
        feature=datasets.Value("string"),
    )
    dataset = dataset.select_columns(["image", "captions", "image_id", "split", "label"])
    return dataset, LoadReport(source=str(root), num_images=len(dataset), num_captions=len(dataset))


# --------------------------------------------------------------------------------------------
# Hugging Face datasets (Hub ids, save_to_disk folders, local parquet / json / csv / arrow)
# --------------------------------------------------------------------------------------------

_BUILDER_BY_SUFFIX = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".csv": "csv", ".arrow": "arrow"}


def load_hub_dataset(
    path: str,
    *,
    split: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
    image_id_column: str | None = None,
    split_column: str | None = None,
    images: str | os.PathLike | None = None,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Read any dataset `datasets` can open and map its columns onto the canonical schema.

    `path` is a Hub id (`datasets.load_dataset(path, name, split=..., revision=...)`), a folder
    written by `save_to_disk` (`datasets.load_from_disk`), a local data file (.parquet, .json,
    .jsonl, .csv, .arrow) or any local folder `datasets.load_dataset` understands.

    Args:
        path: see above.
        split: without `split_column`, the split to load (any `datasets` split expression, e.g.
            "test" or "train[:100]"; default all splits, labelled by name); with it, keep rows whose
            split column is in these (comma-separated) values.
        name: dataset configuration name.
        revision: Hub revision.
        image_column: an `Image` column, or a string column of paths resolved against `images`;
            default the first of image, image_path, file_name, filename, filepath, path, img.
        caption_column: a column of strings, lists of strings or `[{"raw": ...}]`; default the first
            of captions, caption, text, sentences, sentence, raw.
        label_column: a `ClassLabel` column that makes this a classification set (kept as `label`,
            captions = [class name]); default "label" when no caption column is found.
        image_id_column: column of ids; default the first of image_id, img_id, imgid, cocoid, id,
            else the row number.
        split_column: column of per-row split labels (e.g. "split" in a single-split Flickr30k dump).
        images: root for relative paths in a string image column; default the current directory.
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    dataset, split_labels = _read_hf(path, split=None if split_column else split, name=name, revision=revision)
    source = path
    columns = dataset.column_names
    image_column = _pick_column(image_column, _IMAGE_COLUMN_CANDIDATES, columns, "image_column", source)
    if caption_column is None and label_column is None:
        caption_column = next((column for column in _CAPTION_COLUMN_CANDIDATES if column in columns), None)
        label_column = None if caption_column is not None else "label"
    if label_column is not None:
        if not isinstance(dataset.features.get(label_column), datasets.ClassLabel):
            raise ValueError(
                f"{source}: found no caption column (set caption_column=) and no ClassLabel column "
                f"{label_column!r} (set label_column=); columns: {columns}"
            )
        class_names = dataset.features[label_column].names
        captions = [[class_names[label]] for label in _arrow_column(dataset, label_column).to_pylist()]
    else:
        caption_column = _pick_column(caption_column, (), columns, "caption_column", source)
        captions = [
            _caption_values(value, f"{source}: row {index}, column {caption_column!r}")
            for index, value in enumerate(_arrow_column(dataset, caption_column).to_pylist())
        ]
    if split_column is not None:
        split_column = _pick_column(split_column, (), columns, "split_column", source)
        split_labels = [str(value) for value in _arrow_column(dataset, split_column).to_pylist()]
    if image_id_column is None:
        image_id_column = next((column for column in _IMAGE_ID_COLUMN_CANDIDATES if column in columns), None)
    if image_id_column is not None:
        _pick_column(image_id_column, (), columns, "image_id_column", source)
        image_ids = [str(value) for value in _arrow_column(dataset, image_id_column).to_pylist()]
    else:
        image_ids = [str(index) for index in range(len(dataset))]

    image_feature = dataset.features[image_column]
    image_column_data = _arrow_column(dataset, image_column)
    if isinstance(image_feature, datasets.Image):
        # Rows with embedded bytes cannot be missing; path-only rows must exist where stored.
        has_bytes = pc.is_valid(pc.struct_field(image_column_data, "bytes")).to_pylist()
        stored_paths = pc.struct_field(image_column_data, "path").to_pylist()
        resolved_paths = None
        files_to_check = [
            None if embedded else stored_path or f"{source}: row {index} (no image)"
            for index, (embedded, stored_path) in enumerate(zip(has_bytes, stored_paths))
        ]
    elif image_feature == datasets.Value("string"):
        image_root = Path(images).expanduser() if images is not None else Path.cwd()
        resolved_paths = [_resolve_image(str(value), image_root) for value in image_column_data.to_pylist()]
        files_to_check = resolved_paths
    else:
        raise ValueError(f"{source}: column {image_column!r} holds {image_feature}; expected an Image or a path string")

    wanted = _split_set(split) if split_column is not None else None
    candidate_rows = (
        range(len(dataset))
        if wanted is None
        else [index for index, label in enumerate(split_labels) if label in wanted]
    )
    if not candidate_rows:
        raise ValueError(f"{source}: no row has {split_column} in {sorted(wanted)}")
    report, kept_rows, kept_captions = _screen(
        ((index, files_to_check[index], image_ids[index], captions[index]) for index in candidate_rows),
        source,
        skip_missing,
        limit,
    )
    class_names = dataset.features[label_column].names if label_column is not None else None
    features = canonical_features(class_names=class_names)
    columns_out: dict[str, list] = {
        "captions": kept_captions,
        "image_id": [image_ids[index] for index in kept_rows],
        "split": [split_labels[index] for index in kept_rows],
    }
    if class_names is not None:
        columns_out["label"] = _arrow_column(dataset, label_column).take(kept_rows).to_pylist()
    if resolved_paths is not None:
        columns_out["image"] = [resolved_paths[index] for index in kept_rows]
        return datasets.Dataset.from_dict(columns_out, features=features).select_columns(list(features)), report
    # Embedded image bytes stay in Arrow: never round-trip them through Python objects.
    output = dataset.select_columns([image_column])
    if len(kept_rows) != len(dataset):
        output = output.select(kept_rows)
    if image_column != "image":
        output = output.rename_column(image_column, "image")
    output = output.cast_column("image", datasets.Image())
    for column, values in columns_out.items():
        output = output.add_column(column, values, feature=features[column])
    return output, report


def _read_hf(
    path: str, *, split: str | None, name: str | None, revision: str | None
) -> tuple[datasets.Dataset, list[str]]:
    """One dataset holding the selected splits, and each row's split name."""
    local = Path(path).expanduser()
    if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(local))
    elif local.is_file():
        builder = _BUILDER_BY_SUFFIX.get(local.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{local}: cannot read a {local.suffix!r} file; expected one of {sorted(_BUILDER_BY_SUFFIX)}"
            )
        loaded = datasets.load_dataset(builder, data_files={split or DEFAULT_SPLIT: str(local)})
    else:
        # A Hub id or a folder of data files; `datasets` also evaluates split slices ("train[:100]").
        loaded = datasets.load_dataset(path, name, split=split, revision=revision)
    if isinstance(loaded, datasets.Dataset):
        return loaded, [split or DEFAULT_SPLIT] * len(loaded)
    if split is not None:
        if split not in loaded:
            raise ValueError(f"{path}: no split {split!r}; it has {list(loaded)}")
        return loaded[split], [split] * len(loaded[split])
    split_labels = [split_name for split_name, part in loaded.items() for _ in range(len(part))]
    return datasets.concatenate_datasets(list(loaded.values())), split_labels


# --------------------------------------------------------------------------------------------
# Synthetic scenes
# --------------------------------------------------------------------------------------------


def load_synthetic(num_images: int, *, seed: int = 0, split: str = "test") -> tuple[datasets.Dataset, LoadReport]:
    """Generated scenes with known boxes (`modeling_dclip.data.synthetic.make_synthetic_dataset`)."""
    from .synthetic import make_synthetic_dataset

    dataset = make_synthetic_dataset(num_images, seed=seed, split=split)
    num_captions = sum(len(captions) for captions in _arrow_column(dataset, "captions").to_pylist())
    return dataset, LoadReport(
        source=f"synthetic(n={num_images}, seed={seed})", num_images=len(dataset), num_captions=num_captions
    )


# --------------------------------------------------------------------------------------------
# Shared screening and assembly
# --------------------------------------------------------------------------------------------


@dataclass
class _ImageRecord:
    image: str
    image_id: str
    split: str
    captions: list[Any]
    boxes: list[list[float]] | None = None
    labels: list[int] | None = None


def _records_to_dataset(
    records: list[_ImageRecord],
    source: str,
    skip_missing: bool,
    limit: int | None,
    box_label_names: list[str] | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    report, kept_rows, kept_captions = _screen(
        ((index, record.image, record.image_id, record.captions) for index, record in enumerate(records)),
        source,
        skip_missing,
        limit,
    )
    kept = [records[index] for index in kept_rows]
    columns: dict[str, list] = {
        "image": [record.image for record in kept],
        "captions": kept_captions,
        "image_id": [record.image_id for record in kept],
        "split": [record.split for record in kept],
    }
    if box_label_names is not None:
        columns["boxes"] = [record.boxes for record in kept]
        columns["labels"] = [record.labels for record in kept]
    return datasets.Dataset.from_dict(columns, features=canonical_features(box_label_names)), report


def _screen(
    rows: Iterable[tuple[int, str | None, str, list[Any]]], source: str, skip_missing: bool, limit: int | None
) -> tuple[LoadReport, list[int], list[list[str]]]:
    """Apply the missing-image and empty-caption policy to `(row, file or None, image_id, captions)`.

    Stops after `limit` usable rows, so a small `limit` checks only the files it needs.

    Returns:
        The report, the kept row numbers, and their cleaned captions.
    """
    report = LoadReport(source=source)
    kept_rows: list[int] = []
    kept_captions: list[list[str]] = []
    row_by_image_id: dict[str, int] = {}
    for row, image_file, image_id, captions in rows:
        if limit is not None and len(kept_rows) >= limit:
            break
        cleaned = [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]
        report.empty_captions_dropped += len(captions) - len(cleaned)
        if image_file is not None and not _is_local_file(image_file):
            report.missing_images.append(image_file)
        elif not cleaned:
            report.uncaptioned_images.append(image_id)
        elif image_id in row_by_image_id:
            raise ValueError(
                f"{source}: image_id {image_id!r} appears twice (rows {row_by_image_id[image_id]} and {row})"
            )
        else:
            row_by_image_id[image_id] = row
            kept_rows.append(row)
            kept_captions.append(cleaned)
    report.num_images = len(kept_rows)
    report.num_captions = sum(len(captions) for captions in kept_captions)

    hint = "pass skip_missing=True (spec option skip_missing=true) to drop them"
    if report.missing_images and not skip_missing:
        raise FileNotFoundError(
            f"{source}: {len(report.missing_images)} image file(s) not found, e.g. {_quote(report.missing_images)}. "
            f"Check the image folder (option images=...) or {hint}."
        )
    if report.uncaptioned_images and not skip_missing:
        raise ValueError(
            f"{source}: {len(report.uncaptioned_images)} image(s) have no non-empty caption: "
            f"{_quote(report.uncaptioned_images)}; {hint}."
        )
    if report.empty_captions_dropped:
        logger.warning("%s: dropped %d empty or whitespace-only captions", source, report.empty_captions_dropped)
    if report.num_dropped:
        logger.warning("%s", report.summary())
    if not kept_rows:
        raise ValueError(f"{source}: no usable images ({report.summary()})")
    return report, kept_rows, kept_captions


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _quote(values: Sequence[str]) -> str:
    shown = ", ".join(repr(value) for value in values[:_QUOTED])
    return shown + (f", ... ({len(values) - _QUOTED} more)" if len(values) > _QUOTED else "")


def _read_json(path: str | os.PathLike) -> Any:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open(encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error


def _require(mapping: Any, key: str, where: str) -> Any:
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected an object with field {key!r}, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing field {key!r}")
    return mapping[key]


def _require_list(mapping: Any, key: str, where: str) -> list:
    value = _require(mapping, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
    return value


def _pick_column(
    chosen: str | None, candidates: Sequence[str], columns: Sequence[str], option: str, source: str
) -> str:
    """The column named by `option`, or the first candidate present; a clear error otherwise."""
    if chosen is not None:
        if chosen not in columns:
            raise ValueError(f"{source}: {option}={chosen!r} is not a column; columns: {list(columns)}")
        return chosen
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(f"{source}: no {option.removesuffix('_column')} column among {list(columns)}; set {option}=")


def _split_set(split: str | None) -> set[str] | None:
    if split is None:
        return None
    return {part.strip() for part in split.split(",") if part.strip()}


def _default_image_root(folder: Path, subfolder_names: Sequence[str]) -> Path:
    return _first_directory([folder / name for name in subfolder_names], fallback=folder)


def _first_directory(candidates: Sequence[Path], *, fallback: Path) -> Path:
    return next((candidate for candidate in candidates if candidate.is_dir()), fallback)


def _resolve_image(value: str, image_root: Path) -> str:
    if value.startswith(_URL_PREFIXES):
        return value
    return str(image_root / Path(value).expanduser())


def _path_id(image_value: str) -> str:
    """Image path as written, without its extension: the id of images that carry none."""
    return str(Path(image_value).with_suffix("").as_posix())


def _arrow_column(dataset: datasets.Dataset, column: str) -> Any:
    """A column as a pyarrow ChunkedArray, honouring any row selection, without decoding images."""
    return dataset.with_format("arrow")[column]


def _is_local_file(image: str) -> bool:
    return not image.startswith(_URL_PREFIXES) and os.path.isfile(image)
