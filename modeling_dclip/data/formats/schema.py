"""The canonical dataset schema every reader produces, and the policy for bad rows that they all share.

Canonical schema (a `datasets.Dataset`, one row per image):

- `image`: `datasets.Image()`; rows store the file path (or the encoded bytes, for Hub datasets and webdataset
  shards) and decode lazily on access, so loading never decodes an image;
- `captions`: `list[str]`, one or more non-empty captions;
- `image_id`: `str`, the dataset's own id when it has one (COCO id, Karpathy `cocoid`, webdataset key), otherwise
  the image path relative to the image root without its extension (Flickr: the file stem);
- `split`: `str` ("train", "val", "test", ...);
- optional `boxes` (`[x1, y1, x2, y2]` normalised to [0, 1]) with `labels` (a list of `ClassLabel` ids whose names
  are the detector classes), from COCO `instances_*.json` or the synthetic scenes;
- optional `hard_negatives` (`list[str]`, synthetic scenes) and `label` (`ClassLabel`, classification sets, whose
  `captions` hold the class name).

Every reader returns `(dataset, LoadReport)`. Three kinds of bad rows are screened out:

- *missing images* (no file at the resolved path, or a URL: nothing is downloaded here);
- *unreadable images* (embedded bytes that are not an image, e.g. a corrupt webdataset member);
- *uncaptioned images* (no non-empty caption). Empty or whitespace-only captions are always dropped with a
  warning; an image left with none is a bad row.

By default a bad row is an error (`FileNotFoundError` for missing images, `ValueError` otherwise) giving the count
and the first paths, keys or ids. With `skip_missing=True` bad rows are dropped, a warning is logged, and the
returned `LoadReport` lists every dropped one.

Formats without their own split labels (Flickr30k CSV, TSV, tables without a split column, image folders without
split subfolders, webdataset shards) label every row `split` when given, else "train", as `datasets.load_dataset`
does for local files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import datasets

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "train"
# How many offending paths or ids an error or warning quotes.
_QUOTED = 5
URL_PREFIXES = ("http://", "https://", "s3://", "gs://")
IMAGE_COLUMN_CANDIDATES = ("image", "image_path", "file_name", "filename", "filepath", "path", "img")
CAPTION_COLUMN_CANDIDATES = ("captions", "caption", "text", "sentences", "sentence", "raw")
IMAGE_ID_COLUMN_CANDIDATES = ("image_id", "img_id", "imgid", "cocoid", "id")


@dataclass
class LoadReport:
    """What a reader kept and what it dropped.

    Attributes:
        source: the file or dataset read.
        num_images: rows in the returned dataset (0 for a streamed dataset, whose rows are checked as they come).
        num_captions: captions in the returned dataset.
        missing_images: paths (or URLs) of images that were not found, in file order.
        unreadable_images: images whose bytes are not an image (`shard: key ... (reason)`), in file order.
        uncaptioned_images: ids of images that had no non-empty caption.
        empty_captions_dropped: empty or whitespace-only captions removed from kept and dropped images.
    """

    source: str
    num_images: int = 0
    num_captions: int = 0
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    uncaptioned_images: list[str] = field(default_factory=list)
    empty_captions_dropped: int = 0

    @property
    def num_dropped(self) -> int:
        return len(self.missing_images) + len(self.unreadable_images) + len(self.uncaptioned_images)

    def summary(self) -> str:
        """One line: what was kept, then what was dropped, quoting the first few paths and ids."""
        parts = [f"{self.source}: {self.num_images} images, {self.num_captions} captions"]
        if self.missing_images:
            parts.append(f"{len(self.missing_images)} missing images dropped ({quote(self.missing_images)})")
        if self.unreadable_images:
            parts.append(f"{len(self.unreadable_images)} unreadable images dropped ({quote(self.unreadable_images)})")
        if self.uncaptioned_images:
            parts.append(
                f"{len(self.uncaptioned_images)} uncaptioned images dropped ({quote(self.uncaptioned_images)})"
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
# Screening and assembly
# --------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One image of a file-based format, before screening."""

    image: str
    image_id: str
    split: str
    captions: list[Any]
    boxes: list[list[float]] | None = None
    labels: list[int] | None = None


class Candidate(NamedTuple):
    """One row to screen.

    Attributes:
        row: its row number in the reader's own order.
        image_id: its id.
        captions: its raw captions (non-strings and blanks are dropped).
        missing: the path or URL when its image file is missing, else None.
        unreadable: a description (`shard: key ... (reason)`) when its image bytes are not an image, else None.
        name: how errors name an uncaptioned row; default its `image_id`.
    """

    row: int
    image_id: str
    captions: list[Any]
    missing: str | None = None
    unreadable: str | None = None
    name: str | None = None


def missing_file(image: str) -> str | None:
    """`image` when it is not a local file (a URL counts as missing), else None."""
    return None if not image.startswith(URL_PREFIXES) and os.path.isfile(image) else image


def records_to_dataset(
    records: list[ImageRecord],
    source: str,
    skip_missing: bool,
    limit: int | None,
    box_label_names: list[str] | None = None,
) -> tuple[datasets.Dataset, LoadReport]:
    """Screen `records` and build the canonical dataset of those kept (with `boxes`/`labels` when named)."""
    report, kept_rows, kept_captions = screen(
        (
            Candidate(index, record.image_id, record.captions, missing=missing_file(record.image))
            for index, record in enumerate(records)
        ),
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


def with_canonical_columns(
    dataset: datasets.Dataset,
    image_column: str,
    kept_rows: list[int],
    columns: dict[str, list],
    features: datasets.Features,
) -> datasets.Dataset:
    """`dataset`'s (embedded) image column as `image`, restricted to `kept_rows`, plus the canonical `columns`
    (one value per kept row).

    The image bytes stay in Arrow: never copied through Python objects, nor rewritten when rows are dropped (the
    columns are added for every row, then `select` keeps an index mapping over the memory-mapped table).
    """
    output = dataset.select_columns([image_column])
    if image_column != "image":
        output = output.rename_column(image_column, "image")
    output = output.cast_column("image", datasets.Image())
    for column, values in columns.items():
        if len(kept_rows) != len(dataset):
            every_row: list = [None] * len(dataset)
            for row, value in zip(kept_rows, values):
                every_row[row] = value
            values = every_row
        output = output.add_column(column, values, feature=features[column])
    return output.select(kept_rows) if len(kept_rows) != len(dataset) else output


def screen(
    candidates: Iterable[Candidate], source: str, skip_missing: bool, limit: int | None
) -> tuple[LoadReport, list[int], list[list[str]]]:
    """Apply the bad-row policy (see the module docstring) to `candidates`.

    Stops after `limit` usable rows; `candidates` may be a generator, so a small `limit` checks only the files it
    needs.

    Returns:
        The report, the kept row numbers, and their cleaned captions.
    """
    report = LoadReport(source=source)
    kept_rows: list[int] = []
    kept_captions: list[list[str]] = []
    row_by_image_id: dict[str, int] = {}
    for candidate in candidates:
        if limit is not None and len(kept_rows) >= limit:
            break
        captions = candidate.captions
        cleaned = [caption.strip() for caption in captions if isinstance(caption, str) and caption.strip()]
        report.empty_captions_dropped += len(captions) - len(cleaned)
        if candidate.missing is not None:
            report.missing_images.append(candidate.missing)
        elif candidate.unreadable is not None:
            report.unreadable_images.append(candidate.unreadable)
        elif not cleaned:
            report.uncaptioned_images.append(candidate.name or candidate.image_id)
        elif candidate.image_id in row_by_image_id:
            raise ValueError(
                f"{source}: image_id {candidate.image_id!r} appears twice "
                f"(rows {row_by_image_id[candidate.image_id]} and {candidate.row})"
            )
        else:
            row_by_image_id[candidate.image_id] = candidate.row
            kept_rows.append(candidate.row)
            kept_captions.append(cleaned)
    report.num_images = len(kept_rows)
    report.num_captions = sum(len(captions) for captions in kept_captions)

    hint = "pass skip_missing=True (spec option skip_missing=true) to drop them"
    if report.missing_images and not skip_missing:
        raise FileNotFoundError(
            f"{source}: {len(report.missing_images)} image file(s) not found, e.g. {quote(report.missing_images)}. "
            f"Check the image folder (option images=...) or {hint}."
        )
    if report.unreadable_images and not skip_missing:
        raise ValueError(
            f"{source}: {len(report.unreadable_images)} image(s) cannot be read: "
            f"{quote(report.unreadable_images)}; {hint}."
        )
    if report.uncaptioned_images and not skip_missing:
        raise ValueError(
            f"{source}: {len(report.uncaptioned_images)} image(s) have no non-empty caption: "
            f"{quote(report.uncaptioned_images)}; {hint}."
        )
    if report.empty_captions_dropped:
        logger.warning("%s: dropped %d empty or whitespace-only captions", source, report.empty_captions_dropped)
    if report.num_dropped:
        logger.warning("%s", report.summary())
    if not kept_rows:
        raise ValueError(f"{source}: no usable images ({report.summary()})")
    return report, kept_rows, kept_captions


class TableRow(NamedTuple):
    """One caption row of a table format: where it is (`file: row N`), its image as written, its caption cell, its
    split, and its image id when the table has an id column."""

    where: str
    image: str | None
    caption: Any
    split: str
    image_id: str | None = None


def group_by_image(rows: Iterable[TableRow], image_root: Path) -> list[ImageRecord]:
    """Group caption rows into one record per image, in order of first appearance.

    An image's id is its id column's value on its first row, else its path without extension; an image whose rows
    disagree on the split is an error naming the row.
    """
    records_by_image: dict[str, ImageRecord] = {}
    for row in rows:
        image_value = (row.image or "").strip()
        if not image_value:
            raise ValueError(f"{row.where}: the image field is empty")
        record = records_by_image.get(image_value)
        if record is None:
            record = records_by_image[image_value] = ImageRecord(
                image=resolve_image(image_value, image_root),
                image_id=row.image_id if row.image_id is not None else path_id(image_value),
                split=row.split,
                captions=[],
            )
        elif record.split != row.split:
            raise ValueError(
                f"{row.where}: image {image_value!r} is in split {row.split!r} here and {record.split!r} on an "
                "earlier row"
            )
        record.captions.extend(caption_values(row.caption, row.where))
    return list(records_by_image.values())


# --------------------------------------------------------------------------------------------
# Fields, captions, paths
# --------------------------------------------------------------------------------------------


def quote(values: Sequence[str]) -> str:
    """The first few `values`, quoted, and how many more there are."""
    shown = ", ".join(repr(value) for value in values[:_QUOTED])
    return shown + (f", ... ({len(values) - _QUOTED} more)" if len(values) > _QUOTED else "")


def read_json(path: str | os.PathLike) -> Any:
    """A whole JSON document; a clear error naming the file when it is absent or malformed."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open(encoding="utf-8") as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error


def require(mapping: Any, key: str, where: str) -> Any:
    """`mapping[key]`; a `ValueError` naming `where` and the field when it is absent."""
    if not isinstance(mapping, dict):
        raise ValueError(f"{where}: expected an object with field {key!r}, got {type(mapping).__name__}")
    if key not in mapping:
        raise ValueError(f"{where}: missing field {key!r}")
    return mapping[key]


def require_list(mapping: Any, key: str, where: str) -> list:
    """`mapping[key]`, which must be a list."""
    value = require(mapping, key, where)
    if not isinstance(value, list):
        raise ValueError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
    return value


def pick_column(chosen: str | None, candidates: Sequence[str], columns: Sequence[str], option: str, source: str) -> str:
    """The column named by `option`, or the first candidate present; a clear error otherwise."""
    if chosen is not None:
        if chosen not in columns:
            raise ValueError(f"{source}: {option}={chosen!r} is not a column; columns: {list(columns)}")
        return chosen
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(f"{source}: no {option.removesuffix('_column')} column among {list(columns)}; set {option}=")


def karpathy_sentence(sentence: Any, where: str) -> str:
    """A Karpathy `{"raw": ..., "tokens": [...]}` sentence as text (its tokens joined when it has no `raw`)."""
    if not isinstance(sentence, dict):
        raise ValueError(f"{where}: expected an object with 'raw', got {type(sentence).__name__}")
    if "raw" in sentence:
        return sentence["raw"]
    return " ".join(require_list(sentence, "tokens", where))


def caption_values(value: Any, where: str) -> list[str]:
    """A caption cell as a list: a string, a list of strings, or Karpathy-style `[{"raw": ...}]`."""
    if value is None or isinstance(value, str):
        return [value or ""]
    if isinstance(value, list):
        return [
            karpathy_sentence(item, where) if isinstance(item, dict) else _caption_string(item, where) for item in value
        ]
    raise ValueError(f"{where}: a caption must be a string or a list of strings, got {type(value).__name__}")


def _caption_string(value: Any, where: str) -> str:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{where}: a caption must be a string, got {type(value).__name__}")
    return value or ""


def split_set(split: str | None) -> set[str] | None:
    """`"train,val"` -> `{"train", "val"}`; None stays None (every split)."""
    if split is None:
        return None
    return {part.strip() for part in split.split(",") if part.strip()}


def first_directory(candidates: Sequence[Path], *, fallback: Path) -> Path:
    """The first of `candidates` that is a folder, else `fallback`."""
    return next((candidate for candidate in candidates if candidate.is_dir()), fallback)


def resolve_image(value: str, image_root: Path) -> str:
    """A relative image path resolved against `image_root`; URLs are kept as they are."""
    if value.startswith(URL_PREFIXES):
        return value
    return str(image_root / Path(value).expanduser())


def path_id(image_value: str) -> str:
    """Image path as written, without its extension: the id of images that carry none."""
    return str(Path(image_value).with_suffix("").as_posix())


def arrow_column(dataset: datasets.Dataset, column: str) -> Any:
    """A column as a pyarrow ChunkedArray, honouring any row selection, without decoding images."""
    return dataset.with_format("arrow")[column]
