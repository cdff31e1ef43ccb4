"""Region boxes and frozen-backbone region embeddings for a whole dataset, computed once and cached on disk.

`add_region_boxes` runs a region source (the grid, a YOLO detector, or the dataset's own `boxes`) over every image
through `datasets.Dataset.map`, batched, and adds the columns `region_boxes` (`[R, 4]` normalised xyxy, row 0 the
whole image), `region_scores` (`[R]`) and `region_labels` (`[R]`, -1 where unknown). `region_embeddings` runs the
teacher's frozen base over those regions (`DCLIPTeacherModel.encode_regions`) and returns the tensors the teacher's
`fuse` / `score_pairs` read.

Both caches are keyed by content, so a second identical call reads the cache instead of computing:
- the boxes are an Arrow file `region-boxes-<key>.arrow` written by `map` itself (`cache_file_name`), where the key
  hashes the dataset's fingerprint and the source's settings (for YOLO also the weights file's bytes). Datasets held
  in memory (every loader here builds one) get no cache from `map` by default; naming the file makes them cached too;
- the embeddings are a safetensors file `region-embeddings-<key>.safetensors`, where the key hashes the fingerprint
  of the dataset with its region columns, the frozen base's weights and the image processor's settings.

A dataset's fingerprint is `datasets`' own: for an in-memory table it hashes the table's content (image paths, not
the files behind them; PNG bytes for the synthetic scenes), so the same spec loaded again reuses the cache, and a
dataset whose image files were replaced under the same paths must be given a fresh `cache_dir`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
import torch.nn.functional as F
from datasets.fingerprint import Hasher
from safetensors.torch import load_file, save_file

from ..regions import RegionExtractor, Regions, YoloRegionExtractor, regions_from_boxes

REGION_COLUMNS = ("region_boxes", "region_scores", "region_labels")
REGION_FEATURES = datasets.Features(
    {
        "region_boxes": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "region_scores": datasets.List(datasets.Value("float32")),
        "region_labels": datasets.List(datasets.Value("int64")),
    }
)
# Part of every cache key: bump it when what a cache file holds, or how it is computed, changes.
CACHE_FORMAT_VERSION = 1
_CACHE_SUBFOLDER = "dclip_region_cache"
_READ_CHUNK_BYTES = 1 << 20

Features = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DatasetBoxes:
    """The dataset's own annotated boxes as regions, after the whole image (no detector, no pixels read).

    Args:
        column: the column of `[N, 4]` normalised xyxy boxes (an empty list or None: the whole image only).
        labels_column: the column of `[N]` class ids kept as `region_labels`; ignored when the dataset lacks it.
        max_regions: keep at most this many regions including the whole image (the first boxes); `None` keeps all.
    """

    column: str = "boxes"
    labels_column: str | None = "labels"
    max_regions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "dataset", **asdict(self)}


RegionSource = RegionExtractor | DatasetBoxes


def default_cache_dir(dataset: datasets.Dataset) -> Path:
    """Where caches go when no `cache_dir` is given: beside the dataset's own Arrow files when it has some (as
    `datasets` caches `map` results), else under `datasets`' cache folder (`HF_DATASETS_CACHE`)."""
    if dataset.cache_files:
        return Path(dataset.cache_files[0]["filename"]).parent / _CACHE_SUBFOLDER
    return Path(datasets.config.HF_DATASETS_CACHE) / _CACHE_SUBFOLDER


def region_source_settings(source: RegionSource) -> dict[str, Any]:
    """The settings that decide a source's regions, with the weights file's digest for a local YOLO checkpoint
    (a detector retrained into the same path must not reuse the old boxes)."""
    settings = source.to_dict()
    if isinstance(source, YoloRegionExtractor) and Path(source.weights).is_file():
        settings["weights_sha256"] = _file_sha256(Path(source.weights))
    return settings


def add_region_boxes(
    dataset: datasets.Dataset,
    source: RegionSource,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    image_column: str = "image",
    load_from_cache_file: bool = True,
) -> datasets.Dataset:
    """
    `dataset` with the regions of every image from `source`, computed by a batched `Dataset.map` and cached.

    Args:
        dataset (`datasets.Dataset`): rows with an image column (PIL on access), or with the boxes column when
            `source` is `DatasetBoxes`.
        source (`RegionExtractor` or `DatasetBoxes`): a `GridRegionExtractor`, a `YoloRegionExtractor`, any other
            extractor of `modeling_dclip.regions`, or `DatasetBoxes()` for the dataset's own boxes.
        cache_dir (`str`, *optional*): folder of the cache file; default `default_cache_dir(dataset)`.
        batch_size (`int`, *optional*, defaults to 64): images decoded and given to the source at once (YOLO then
            runs them in chunks of its own `batch_size`).
        image_column (`str`, *optional*, defaults to `"image"`): the column holding the images.
        load_from_cache_file (`bool`, *optional*, defaults to `True`): `False` recomputes and rewrites the cache.

    Returns:
        `datasets.Dataset`: the rows of `dataset` (any previous region columns replaced) plus `region_boxes`
        `[R, 4]` (float32, normalised xyxy, row 0 `[0, 0, 1, 1]`), `region_scores` `[R]` (row 0 is 1.0) and
        `region_labels` `[R]` (row 0 and unknown classes are -1); R varies by image. The region columns are read
        from the cache file, whose path is in the returned dataset's `cache_files`.
    """
    if not isinstance(source, (RegionExtractor, DatasetBoxes)):
        raise TypeError(
            f"source must be a RegionExtractor (grid, YOLO, ...) or DatasetBoxes(), got {type(source).__name__}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(source, DatasetBoxes):
        input_columns = [source.column]
        if source.labels_column is not None and source.labels_column in dataset.column_names:
            input_columns.append(source.labels_column)
        function = _dataset_boxes_function(source, len(input_columns) == 2)
    else:
        input_columns = [image_column]
        function = _extractor_function(source)
    for column in input_columns:
        if column not in dataset.column_names:
            raise ValueError(f"dataset has no column {column!r} for {source!r}; its columns are {dataset.column_names}")

    key = Hasher.hash(
        [
            CACHE_FORMAT_VERSION,
            "region_boxes",
            dataset._fingerprint,
            region_source_settings(source),
            batch_size,
            input_columns,
        ]
    )
    cache_file = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset)
    cache_file.mkdir(parents=True, exist_ok=True)
    cache_file = cache_file / f"region-boxes-{key}.arrow"
    regions = dataset.map(
        function,
        batched=True,
        batch_size=batch_size,
        with_indices=True,
        input_columns=input_columns,
        remove_columns=dataset.column_names,
        features=REGION_FEATURES,
        cache_file_name=str(cache_file),
        load_from_cache_file=load_from_cache_file,
        new_fingerprint=key,
        desc=f"Regions ({source.to_dict()['type']})",
    )
    # Only the region columns go to the cache file, so an in-memory dataset's images are not written a second time.
    rows = dataset.remove_columns([column for column in REGION_COLUMNS if column in dataset.column_names])
    return datasets.concatenate_datasets([rows, regions], axis=1)


def _extractor_function(extractor: RegionExtractor):
    def regions_of_batch(images: list, indices: list[int]) -> dict[str, list]:
        try:
            found = extractor(images)
        except (TypeError, ValueError) as error:
            first, last = indices[0], indices[-1]
            raise ValueError(f"dataset rows {first}-{last} (images[k] is row {first} + k): {error}") from error
        return _as_columns(found)

    return regions_of_batch


def _dataset_boxes_function(source: DatasetBoxes, with_labels: bool):
    def regions_of_batch(*columns: list) -> dict[str, list]:
        *annotations, indices = columns
        boxes_per_row = annotations[0]
        labels_per_row = annotations[1] if with_labels else [None] * len(boxes_per_row)
        found = []
        for row, boxes, labels in zip(indices, boxes_per_row, labels_per_row):
            boxes = boxes or []
            try:
                found.append(regions_from_boxes(boxes, labels=labels or None, max_regions=source.max_regions))
            except ValueError as error:
                raise ValueError(f"dataset row {row}, column {source.column!r}: {error}") from error
        return _as_columns(found)

    return regions_of_batch


def _as_columns(found: Sequence[Regions]) -> dict[str, list]:
    return {
        "region_boxes": [regions.boxes.tolist() for regions in found],
        "region_scores": [regions.scores.tolist() for regions in found],
        "region_labels": [regions.labels.tolist() for regions in found],
    }


def regions_of_row(row: dict[str, Any]) -> Regions:
    """The `Regions` of one row of a dataset returned by `add_region_boxes`."""
    return Regions(row["region_boxes"], row["region_scores"], row["region_labels"])


def model_weights_digest(model: torch.nn.Module) -> str:
    """A digest of every tensor of `model`'s state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def region_embeddings(
    teacher,
    processor,
    dataset: datasets.Dataset,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    image_column: str = "image",
) -> Features:
    """
    The teacher's frozen-base view of every image's cached regions, computed once and read back from a
    safetensors cache afterwards.

    Args:
        teacher (`DCLIPTeacherModel`): its `encode_regions` embeds the crops (only its frozen base is used, so the
            cache stays valid while the fusion trains).
        processor (`DCLIPProcessor`): crops and preprocesses the regions (`pack_regions`).
        dataset (`datasets.Dataset`): the output of `add_region_boxes` (region columns and images).
        cache_dir (`str`, *optional*): folder of the cache file; default `default_cache_dir(dataset)`.
        batch_size (`int`, *optional*, defaults to 16): images whose regions are embedded at once.
        image_column (`str`, *optional*, defaults to `"image"`): the column holding the images.

    Returns:
        `dict` of tensors (float32 unless said), R the most regions of any image, padding zero:
        `region_embeds [N, R, projection_dim]` (L2-normalised), `region_boxes [N, R, 4]`, `region_scores [N, R]`,
        `region_mask [N, R]` (int64, 1 for real regions) and `image_embeds [N, projection_dim]` (region 0, the whole
        image).
    """
    missing = [column for column in (image_column, *REGION_COLUMNS) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"dataset has no column(s) {missing} (its columns are {dataset.column_names}); "
            "add the regions first with add_region_boxes(dataset, source)"
        )
    if len(dataset) == 0:
        raise ValueError("dataset is empty: no regions to embed")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    key = Hasher.hash(
        [
            CACHE_FORMAT_VERSION,
            "region_embeddings",
            dataset._fingerprint,
            model_weights_digest(teacher.base),
            processor.image_processor.to_dict(),
            image_column,
        ]
    )
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(dataset)
    cache_file = folder / f"region-embeddings-{key}.safetensors"
    if cache_file.is_file():
        return load_file(str(cache_file))

    parameter = next(teacher.parameters())
    columns = dataset.select_columns([image_column, *REGION_COLUMNS])
    parts: list[Features] = []
    for start in range(0, len(dataset), batch_size):
        batch = columns[start : start + batch_size]
        per_image = [
            Regions(boxes, scores, labels)
            for boxes, scores, labels in zip(batch["region_boxes"], batch["region_scores"], batch["region_labels"])
        ]
        inputs = processor.pack_regions(batch[image_column], per_image)
        embeds = teacher.encode_regions(
            inputs["region_pixel_values"].to(device=parameter.device, dtype=parameter.dtype),
            inputs["region_mask"].to(parameter.device),
        )
        parts.append(
            {
                "region_embeds": embeds.float().cpu(),
                "region_boxes": inputs["region_boxes"].float(),
                "region_scores": inputs["region_scores"].float(),
                "region_mask": inputs["region_mask"].long(),
            }
        )
    most = max(part["region_mask"].shape[1] for part in parts)
    features = {name: torch.cat([_pad_regions(part[name], most) for part in parts]).contiguous() for name in parts[0]}
    features["image_embeds"] = features["region_embeds"][:, 0].clone()

    folder.mkdir(parents=True, exist_ok=True)
    temporary = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
    metadata = {"dataset_fingerprint": dataset._fingerprint, "rows": str(len(dataset))}
    save_file(features, str(temporary), metadata=metadata)
    os.replace(temporary, cache_file)
    return features


def _pad_regions(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad dimension 1 (regions) of `[B, R, ...]` to `size`."""
    if tensor.shape[1] == size:
        return tensor
    return F.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, size - tensor.shape[1]])


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = [
    "REGION_COLUMNS",
    "DatasetBoxes",
    "RegionSource",
    "add_region_boxes",
    "default_cache_dir",
    "model_weights_digest",
    "region_embeddings",
    "region_source_settings",
    "regions_of_row",
]
