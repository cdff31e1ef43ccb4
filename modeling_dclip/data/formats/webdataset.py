"""Webdataset tar shards as img2dataset writes them: per key an image (`.jpg`, `.jpeg`, `.png` or `.webp`) and a
caption (`.txt`, else the `caption` field of `.json`), read through `datasets.load_dataset("webdataset")`.

Shards are named by a brace pattern (`/data/cc3m/{00000..00331}.tar`, also `{a,b}` lists), a glob
(`/data/cc3m/*.tar`), one `.tar` file, or a folder (every `*.tar` in it, sorted). Loaded whole, the shards are
converted once into `datasets`' Arrow cache (memory-mapped; the encoded images stay bytes, never decoded) and every
row is checked up front; streamed (`streaming=True`), nothing is converted: rows are read shard by shard as a
training loop iterates, and each is checked when it is reached. Either way an image that cannot be read or a key
without a caption is an error naming the shard and the key, or with `skip_missing` a row dropped with a warning.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from .schema import (
    DEFAULT_SPLIT,
    Candidate,
    LoadReport,
    arrow_column,
    canonical_features,
    quote,
    screen,
    with_canonical_columns,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_CAPTION_JSON_FIELD = "caption"
# What `datasets`' webdataset builder keeps of each key: other members (img2dataset's .json metadata aside) are
# ignored, and a member a key lacks is None.
_RAW_FEATURES = datasets.Features(
    {
        "__key__": datasets.Value("string"),
        "__url__": datasets.Value("string"),
        **{extension: datasets.Image(decode=False) for extension in IMAGE_EXTENSIONS},
        "txt": datasets.Value("string"),
        "json": datasets.Json(),
    }
)
_BRACES = re.compile(r"\{([^{}]*)\}")


def load_webdataset(
    location: str | os.PathLike,
    *,
    split: str | None = None,
    streaming: bool = False,
    skip_missing: bool = False,
    limit: int | None = None,
) -> tuple[datasets.Dataset | datasets.IterableDataset, LoadReport]:
    """Read webdataset tar shards into the canonical schema (`image` bytes, `captions`, `image_id` = key, `split`).

    Args:
        location: the shards (see the module docstring).
        split: split label of every row; default "train".
        streaming: return a `datasets.IterableDataset` over the shards instead of converting them (its
            `n_shards` is the number of tar files, so `datasets.distributed.split_dataset_by_node` gives each
            process its own shards); rows are checked as they are read, and the report's counts stay 0.
        skip_missing: drop keys whose image cannot be read or that have no caption, with a warning, instead of
            raising.
        limit: keep only the first `limit` usable keys.

    Raises:
        FileNotFoundError: a shard does not exist, or the pattern matches none.
        ValueError: a shard is not a tar archive, or (without `skip_missing`) a key's image cannot be read or it
            has no caption; the message names the shard and the key.
    """
    shards = expand_shards(str(location))
    missing = [str(shard) for shard in shards if not shard.is_file()]
    if missing:
        raise FileNotFoundError(f"{location}: {len(missing)} of {len(shards)} shard(s) not found: {quote(missing)}")
    for shard in shards:
        if not tarfile.is_tarfile(shard):
            raise ValueError(f"{location}: shard {shard} is not a tar archive")
    source = str(location)
    split = split or DEFAULT_SPLIT
    data_files = {"train": [str(shard) for shard in shards]}
    if streaming:
        raw = datasets.load_dataset(
            "webdataset", data_files=data_files, features=_RAW_FEATURES, split="train", streaming=True
        )
        return _stream(raw, source, split, skip_missing, limit), LoadReport(source=source)
    raw = datasets.load_dataset("webdataset", data_files=data_files, features=_RAW_FEATURES, split="train")
    return _convert(raw, source, split, skip_missing, limit)


def expand_shards(location: str) -> list[Path]:
    """The shard files `location` names: brace ranges / lists, a glob, one file, or a folder of `*.tar`."""
    path = Path(location).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path}: folder holds no .tar shards")
        return shards
    patterns = _expand_braces(str(path))
    if any(character in pattern for pattern in patterns for character in "*?["):
        shards = [Path(match) for pattern in patterns for match in sorted(glob.glob(pattern))]
        if not shards:
            raise FileNotFoundError(f"{location}: no file matches")
        return shards
    return [Path(pattern) for pattern in patterns]


def _expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> `a00bx, a00by, a01bx, ...`; zero-padding follows the range's first bound."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        if int(last) < int(first):
            raise ValueError(f"{pattern}: range {{{body}}} runs backwards")
        width = len(first) if first.startswith("0") else 0
        options = [str(number).zfill(width) for number in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + option + rest for option in options for rest in _expand_braces(tail)]


def _where(example_key: str, shard: str) -> str:
    return f"{shard}: key {example_key!r}"


def _image_problem(data: bytes | None) -> str | None:
    """Why these bytes are not a readable image (header checked, PNG checksums verified), or None."""
    if data is None:
        return f"no image member ({', '.join('.' + extension for extension in IMAGE_EXTENSIONS)})"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as error:  # PIL raises many types for bad bytes; the row is reported, never silently kept.
        return f"not a readable image ({type(error).__name__}: {error})"
    return None


def _captions(text: str | None, metadata: Any) -> list[str]:
    if text is None and isinstance(metadata, dict):
        text = metadata.get(_CAPTION_JSON_FIELD)
    return [text] if isinstance(text, str) else []


def _convert(
    raw: datasets.Dataset, source: str, split: str, skip_missing: bool, limit: int | None
) -> tuple[datasets.Dataset, LoadReport]:
    """Check every row of the converted shards and map them onto the canonical schema, image bytes left in Arrow."""
    image_columns = [column for column in IMAGE_EXTENSIONS if pc.any(pc.is_valid(arrow_column(raw, column))).as_py()]
    if len(image_columns) > 1:  # Mixed formats (some .jpg, some .png): one column, at the cost of one copy.
        raw = raw.map(
            lambda *columns: {"image": [next((value for value in row if value), None) for row in zip(*columns)]},
            input_columns=image_columns,
            batched=True,
            desc="merging image columns",
        )
    image_column = image_columns[0] if len(image_columns) == 1 else "image" if image_columns else IMAGE_EXTENSIONS[0]
    keys = arrow_column(raw, "__key__").to_pylist()

    def candidates() -> Iterator[Candidate]:
        # Row by row through the Arrow chunks: nothing but the keys is turned into Python objects up front, and the
        # .json metadata is parsed only for keys without a .txt caption.
        rows = zip(
            _scalars(arrow_column(raw, "__url__")),
            _scalars(arrow_column(raw, "txt")),
            _scalars(arrow_column(raw, "json")),
            _scalars(pc.struct_field(arrow_column(raw, image_column), "bytes")),
        )
        for index, (key, (shard, text, metadata, image)) in enumerate(zip(keys, rows)):
            where = _where(key, shard.as_py())
            problem = _image_problem(image.as_py())
            text = text.as_py()
            parsed = json.loads(metadata.as_py()) if text is None and metadata.is_valid else None
            yield Candidate(
                index,
                key,
                _captions(text, parsed),
                unreadable=None if problem is None else f"{where} ({problem})",
                name=where,
            )

    report, kept_rows, kept_captions = screen(candidates(), source, skip_missing, limit)
    features = canonical_features()
    columns = {
        "captions": kept_captions,
        "image_id": [keys[index] for index in kept_rows],
        "split": [split] * len(kept_rows),
    }
    return with_canonical_columns(raw, image_column, kept_rows, columns, features), report


def _stream(
    raw: datasets.IterableDataset, source: str, split: str, skip_missing: bool, limit: int | None
) -> datasets.IterableDataset:
    """The canonical schema over streamed shards; each row is checked when it is read."""

    def usable(example: dict[str, Any]) -> bool:
        image = next((example[column] for column in IMAGE_EXTENSIONS if example[column] is not None), None)
        problem = _image_problem(image["bytes"] if image is not None else None)
        if problem is None and not _clean(_captions(example["txt"], example["json"])):
            problem = "no caption (.txt, or 'caption' in .json)"
        if problem is None:
            return True
        message = f"{source}: {_where(example['__key__'], example['__url__'])}: {problem}"
        if not skip_missing:
            raise ValueError(f"{message}; pass skip_missing=True (spec option skip_missing=true) to drop such rows")
        logger.warning("%s; dropped", message)
        return False

    def canonical(example: dict[str, Any]) -> dict[str, Any]:
        return {
            "image": next(example[column] for column in IMAGE_EXTENSIONS if example[column] is not None),
            "captions": _clean(_captions(example["txt"], example["json"])),
            "image_id": example["__key__"],
            "split": split,
        }

    stream = raw.filter(usable).map(canonical, remove_columns=list(_RAW_FEATURES)).cast(canonical_features())
    return stream.take(limit) if limit is not None else stream


def _scalars(column: pa.ChunkedArray) -> Iterator[pa.Scalar]:
    """A column's values one by one, chunk by chunk (indexing a ChunkedArray by row costs a search per row)."""
    for chunk in column.chunks:
        yield from chunk


def _clean(captions: list[str]) -> list[str]:
    return [caption.strip() for caption in captions if caption.strip()]
