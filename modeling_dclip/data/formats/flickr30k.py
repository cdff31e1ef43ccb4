"""Flickr30k captions as distributed on Kaggle: the '|'-separated `results.csv`, or the newer comma CSV."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import datasets

from .schema import DEFAULT_SPLIT, LoadReport, TableRow, first_directory, group_by_image, records_to_dataset
from .tables import column_values, read_table

_PIPE_LAYOUT = "expected 'image_name| comment_number| comment'"


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
    comma CSV with header `image_name,comment_number,comment` or `image,caption` (quoted fields),
    read through `datasets` like any CSV table. The '|' layout is not CSV (captions hold unquoted '|'),
    so it is split line by line here.

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
        else first_directory(
            [path.parent / name for name in ("flickr30k_images", "Images", "images")], fallback=path.parent
        )
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with path.open(encoding="utf-8") as file:
        is_pipe_layout = "|" in file.readline()
    split = split or DEFAULT_SPLIT
    rows = _pipe_rows(path, split) if is_pipe_layout else _comma_rows(path, split)
    return records_to_dataset(group_by_image(rows, image_root), str(path), skip_missing, limit)


def _pipe_rows(path: Path, split: str) -> Iterable[TableRow]:
    with path.open(encoding="utf-8") as file:
        next(file)
        for line_number, line in enumerate(file, start=2):
            if not line.strip():
                continue
            where = f"{path}: line {line_number}"
            fields = [value.strip() for value in line.rstrip("\r\n").split("|", 2)]
            if len(fields) == 2:
                # Kaggle's results.csv has a row "<image>| 4 A dog runs ..." that lost a separator.
                repaired = re.match(r"(\d+)\s+(.*)", fields[1])
                if repaired is None:
                    raise ValueError(f"{where}: {_PIPE_LAYOUT}")
                fields = [fields[0], repaired.group(1), repaired.group(2)]
            if len(fields) != 3:
                raise ValueError(f"{where}: {_PIPE_LAYOUT}")
            yield TableRow(where, fields[0], fields[2], split)


def _comma_rows(path: Path, split: str) -> Iterable[TableRow]:
    table = read_table(path, "csv")
    columns = {name.strip().lower(): name for name in table.column_names}
    image_column = next((columns[name] for name in ("image_name", "image") if name in columns), None)
    caption_column = next((columns[name] for name in ("comment", "caption") if name in columns), None)
    if image_column is None or caption_column is None:
        raise ValueError(
            f"{path}: header needs an image column (image_name or image) and a caption column (comment or "
            f"caption); it has {table.column_names}"
        )
    for index, (image_value, caption) in enumerate(
        zip(column_values(table, image_column), column_values(table, caption_column))
    ):
        yield TableRow(f"{path}: row {index}", image_value, caption, split)
