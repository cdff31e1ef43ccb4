"""Any dataset `datasets` opens (Hub ids, `save_to_disk` folders, local parquet / json / csv / arrow files), mapped
onto the canonical schema by column."""

from __future__ import annotations

import os
from pathlib import Path

import datasets
import pyarrow.compute as pc

from .schema import (
    CAPTION_COLUMN_CANDIDATES,
    DEFAULT_SPLIT,
    IMAGE_COLUMN_CANDIDATES,
    IMAGE_ID_COLUMN_CANDIDATES,
    Candidate,
    LoadReport,
    arrow_column,
    canonical_features,
    caption_values,
    missing_file,
    pick_column,
    resolve_image,
    screen,
    split_set,
    with_canonical_columns,
)

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
    .jsonl, .csv, .arrow) or any local folder `datasets.load_dataset` understands. One row is one image.

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
    image_column = pick_column(image_column, IMAGE_COLUMN_CANDIDATES, columns, "image_column", source)
    if caption_column is None and label_column is None:
        caption_column = next((column for column in CAPTION_COLUMN_CANDIDATES if column in columns), None)
        label_column = None if caption_column is not None else "label"
    if label_column is not None:
        if not isinstance(dataset.features.get(label_column), datasets.ClassLabel):
            raise ValueError(
                f"{source}: found no caption column (set caption_column=) and no ClassLabel column "
                f"{label_column!r} (set label_column=); columns: {columns}"
            )
        class_names = dataset.features[label_column].names
        captions = [[class_names[label]] for label in arrow_column(dataset, label_column).to_pylist()]
    else:
        caption_column = pick_column(caption_column, (), columns, "caption_column", source)
        captions = [
            caption_values(value, f"{source}: row {index}, column {caption_column!r}")
            for index, value in enumerate(arrow_column(dataset, caption_column).to_pylist())
        ]
    if split_column is not None:
        split_column = pick_column(split_column, (), columns, "split_column", source)
        split_labels = [str(value) for value in arrow_column(dataset, split_column).to_pylist()]
    if image_id_column is None:
        image_id_column = next((column for column in IMAGE_ID_COLUMN_CANDIDATES if column in columns), None)
    if image_id_column is not None:
        pick_column(image_id_column, (), columns, "image_id_column", source)
        image_ids = [str(value) for value in arrow_column(dataset, image_id_column).to_pylist()]
    else:
        image_ids = [str(index) for index in range(len(dataset))]

    image_feature = dataset.features[image_column]
    image_column_data = arrow_column(dataset, image_column)
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
        resolved_paths = [resolve_image(str(value), image_root) for value in image_column_data.to_pylist()]
        files_to_check = resolved_paths
    else:
        raise ValueError(f"{source}: column {image_column!r} holds {image_feature}; expected an Image or a path string")

    wanted = split_set(split) if split_column is not None else None
    candidate_rows = (
        range(len(dataset))
        if wanted is None
        else [index for index, label in enumerate(split_labels) if label in wanted]
    )
    if not candidate_rows:
        raise ValueError(f"{source}: no row has {split_column} in {sorted(wanted)}")
    report, kept_rows, kept_captions = screen(
        (
            Candidate(
                index,
                image_ids[index],
                captions[index],
                missing=None if files_to_check[index] is None else missing_file(files_to_check[index]),
            )
            for index in candidate_rows
        ),
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
        columns_out["label"] = arrow_column(dataset, label_column).take(kept_rows).to_pylist()
    if resolved_paths is not None:
        columns_out["image"] = [resolved_paths[index] for index in kept_rows]
        return datasets.Dataset.from_dict(columns_out, features=features).select_columns(list(features)), report
    # Embedded image bytes stay in Arrow: never round-trip them through Python objects.
    return with_canonical_columns(dataset, image_column, kept_rows, columns_out, features), report


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
