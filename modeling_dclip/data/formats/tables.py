"""Caption tables: JSON Lines and CSV / TSV files of image paths and captions, and Conceptual-Captions TSV files.

Every table is read through `datasets.load_dataset("json" | "csv", ...)` (Arrow-cached by `datasets`, re-read when
the file changes); this module only maps its columns onto the canonical schema (`schema.py`). Errors name the file
and the row (0-based, as `dataset[N]`) or field.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from .schema import (
    CAPTION_COLUMN_CANDIDATES,
    DEFAULT_SPLIT,
    IMAGE_COLUMN_CANDIDATES,
    LoadReport,
    TableRow,
    arrow_column,
    group_by_image,
    pick_column,
    records_to_dataset,
    split_set,
)

_FILE_FORMATS = ("jsonl", "csv")


def read_table(
    path: Path,
    file_format: str,
    *,
    delimiter: str = ",",
    column_names: Sequence[str] | None = None,
    quoting: int = csv.QUOTE_MINIMAL,
) -> datasets.Dataset:
    """One local JSON Lines or CSV file as a `Dataset`, every CSV cell read as text (ids keep leading zeros).

    Args:
        path: the file.
        file_format: "jsonl" or "csv".
        delimiter: CSV field separator.
        column_names: CSV column names for a file without a header row.
        quoting: CSV quoting (`csv.QUOTE_NONE` when quote characters are plain text).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file cannot be parsed (the message names the file and what the parser said).
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    options: dict[str, Any] = {}
    if file_format == "csv":
        if column_names is None:
            import pandas

            try:
                column_names_in_file = list(pandas.read_csv(path, sep=delimiter, nrows=0).columns)
            except (ValueError, pandas.errors.ParserError) as error:
                raise ValueError(f"{path}: cannot read a CSV header ({error})") from error
            names = column_names_in_file
        else:
            names = list(column_names)
            options["column_names"] = names
        options.update(
            sep=delimiter,
            quoting=quoting,
            keep_default_na=False,
            features=datasets.Features({name: datasets.Value("string") for name in names}),
        )
    builder = {"jsonl": "json", "csv": "csv"}[file_format]
    try:
        return datasets.load_dataset(builder, data_files={"train": str(path)}, split="train", **options)
    except datasets.exceptions.DatasetGenerationError as error:
        raise ValueError(f"{path}: cannot be read as {file_format.upper()} ({error.__cause__ or error})") from error


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
    if file_format not in _FILE_FORMATS:
        raise ValueError(f"{path}: file_format must be 'jsonl' or 'csv', got {file_format!r}")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    elif delimiter.lower() in ("tab", "\\t"):
        delimiter = "\t"
    table = read_table(path, file_format, delimiter=delimiter)
    if len(table) == 0:
        raise ValueError(f"{path}: the table has no rows")
    columns = table.column_names
    source = str(path)
    image_column = pick_column(image_column, IMAGE_COLUMN_CANDIDATES, columns, "image_column", source)
    caption_column = pick_column(caption_column, CAPTION_COLUMN_CANDIDATES, columns, "caption_column", source)
    if image_id_column is not None:
        pick_column(image_id_column, (), columns, "image_id_column", source)
    if split_column is None and "split" in columns:
        split_column = "split"
    elif split_column is not None:
        pick_column(split_column, (), columns, "split_column", source)
    wanted = split_set(split) if split_column is not None else None

    image_values = column_values(table, image_column)
    caption_cells = column_values(table, caption_column)
    image_ids = column_values(table, image_id_column) if image_id_column is not None else None
    splits = column_values(table, split_column) if split_column is not None else None
    rows = (
        TableRow(
            where=f"{path}: row {index}",
            image=None if image_values[index] is None else str(image_values[index]),
            caption=caption_cells[index],
            split=str(splits[index]) if splits is not None else split or DEFAULT_SPLIT,
            image_id=None if image_ids is None else str(image_ids[index]),
        )
        for index in range(len(table))
        if wanted is None or str(splits[index]) in wanted
    )
    records = group_by_image(rows, Path(images).expanduser() if images is not None else path.parent)
    if wanted is not None and not records:
        raise ValueError(f"{path}: no row has {split_column} in {sorted(wanted)}")
    return records_to_dataset(records, source, skip_missing, limit)


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
    image (download the images first and write their local paths). Quote characters are plain text.

    Args:
        path: the TSV file.
        images: root that relative image paths are resolved against. Default: the TSV's folder.
        split: split label of every row; default "train".
        skip_missing: drop missing or uncaptioned images instead of raising.
        limit: keep only the first `limit` usable images.
    """
    path = Path(path).expanduser()
    table = read_table(path, "csv", delimiter="\t", column_names=("caption", "image"), quoting=csv.QUOTE_NONE)
    image_values = column_values(table, "image")
    captions = column_values(table, "caption")
    for index, image_value in enumerate(image_values):
        if not image_value:
            raise ValueError(f"{path}: row {index}: expected 'caption<TAB>image', the image field is empty")
    rows = (
        TableRow(f"{path}: row {index}", image_value, caption, split or DEFAULT_SPLIT)
        for index, (image_value, caption) in enumerate(zip(image_values, captions))
    )
    records = group_by_image(rows, Path(images).expanduser() if images is not None else path.parent)
    return records_to_dataset(records, str(path), skip_missing, limit)


def column_values(table: datasets.Dataset, column: str) -> list[Any]:
    """A column's values as Python objects (JSON cells of mixed type decoded), without decoding images."""
    values = arrow_column(table, column).to_pylist()
    if isinstance(table.features[column], datasets.Json):
        values = [table.features[column].decode_example(value) if value is not None else None for value in values]
    return values
