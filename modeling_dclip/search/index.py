"""
A searchable gallery: the student's image embeddings in a faiss index, saved as a folder.

An index folder holds:

- `embeddings.safetensors`: `embeddings [N, D]` float16, L2-normalised, row `i` the gallery item with id `i`;
- `index.faiss`: a faiss inner-product index over them (cosine similarity): exact (`IndexFlatIP`) up to
  `EXACT_LIMIT` images, IVF-PQ above that or when asked (trained on a random sample of the gallery);
- `items.parquet`: the id -> `path` / `captions` table (written and read through `datasets`);
- `index.json`: what made it (model, settings, the images that could not be read) - written last, so a folder with
  an `index.json` is complete;

`build_index` embeds the gallery through the feature store (`FeatureStore.image_embeddings`): in chunks that are kept
on disk, so that a build killed midway continues where it stopped when run again.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import faiss
import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..atomic import atomic_path, save_safetensors_atomically, write_json_atomically
from ..encoding import load_images_at
from ..feature_store import FeatureStore

INDEX_FORMAT_VERSION = 1
# Above this many images, an exact search costs more than ~10 ms per query on a CPU: IVF-PQ is the default.
EXACT_LIMIT = 100_000
# IVF-PQ returns this many times k candidates, re-scored exactly against the stored embeddings.
RESCORE_FACTOR = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBEDDINGS_FILE, FAISS_FILE, ITEMS_FILE, INFO_FILE = (
    "embeddings.safetensors",
    "index.faiss",
    "items.parquet",
    "index.json",
)
ITEM_FEATURES = datasets.Features(
    {
        "id": datasets.Value("int64"),
        "path": datasets.Value("string"),
        "captions": datasets.List(datasets.Value("string")),
    }
)


@dataclass
class GalleryItems:
    """The images of a gallery before indexing.

    Attributes:
        names (`list[str]`): each image's name in messages and in the index's `path` column (its absolute file
            path, or `SPEC#row` for an image stored as bytes).
        sources (`list[dict]`): each image as `datasets.Image` takes it: `{"path": str | None, "bytes": bytes | None}`.
        captions (`list[list[str]]`): each image's captions (empty for a folder of images).
    """

    names: list[str]
    sources: list[dict[str, Any]]
    captions: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def gallery_items(images: str | os.PathLike) -> GalleryItems:
    """
    The gallery named by `images`: a folder (its image files by suffix, recursively, in sorted order) or a dataset
    spec (`modeling_dclip.data.spec`, e.g. `karpathy:DIR?split=test`; its `image` and `captions` columns).

    Raises:
        `FileNotFoundError` / `ValueError` naming `images` when it is neither, or holds no image.
    """
    location = Path(os.fspath(images)).expanduser()
    if location.is_dir() and not any(location.glob("dataset_*.json")):
        paths = sorted(path for path in location.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
        if not paths:
            raise ValueError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
        return GalleryItems(
            [os.path.abspath(path) for path in paths],
            [{"path": str(path), "bytes": None} for path in paths],
            [[] for _ in paths],
        )
    from ..data.spec import load_dataset_spec

    dataset = load_dataset_spec(os.fspath(images))
    if "image" not in dataset.column_names:
        raise ValueError(f"{images}: the dataset has no 'image' column (its columns are {dataset.column_names})")
    sources = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    captions = dataset["captions"] if "captions" in dataset.column_names else [[] for _ in sources]
    names = [
        os.path.abspath(source["path"]) if source.get("path") else f"{images}#{row}"
        for row, source in enumerate(sources)
    ]
    return GalleryItems(names, [dict(source) for source in sources], [list(c) for c in captions])


def check_gallery_images(items: GalleryItems, progress: bool | None = None) -> tuple[list[int], list[str]]:
    """
    Read every image of `items` once (`processing_dclip.load_image`'s checks).

    Returns:
        `(readable, problems)`: the positions of the readable images, and one message per other image naming it and
        saying why it cannot be used.
    """
    table = gallery_table(items)
    readable, problems = [], []
    for row in tqdm(
        range(len(items)), desc="Checking images", unit="img", disable=None if progress is None else not progress
    ):
        try:
            load_images_at(table, [row])
            readable.append(row)
        except (ValueError, FileNotFoundError) as error:
            problems.append(str(error))  # names the file (or the row, for an image stored as bytes)
    return readable, problems


def gallery_table(items: GalleryItems, rows: Sequence[int] | None = None) -> datasets.Dataset:
    """The images of `items` (or of its `rows`) as a `datasets.Dataset` with an undecoded `image` column."""
    sources = items.sources if rows is None else [items.sources[row] for row in rows]
    return datasets.Dataset.from_dict(
        {"image": sources}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )


def _exact_or_ivfpq(num_vectors: int, ivf_pq: bool | None) -> bool:
    return num_vectors > EXACT_LIMIT if ivf_pq is None else ivf_pq


def ivfpq_settings(num_vectors: int, dim: int) -> dict[str, int]:
    """
    IVF-PQ settings for `num_vectors` vectors of width `dim`: `nlist` ~ sqrt(N) inverted lists (at least 39 training
    points each), `m` sub-quantisers of 8 dimensions (fewer when `dim` is not divisible by 8), `nbits` 8 bits per
    code (fewer for tiny galleries, which could not train 256 centroids), `nprobe` lists visited per query, and
    `train_size` the random sample the coarse and product quantisers are trained on (50 points per centroid).
    """
    nlist = max(1, min(int(math.sqrt(num_vectors)), num_vectors // 39))
    m = next(m for m in (dim // 8, dim // 4, dim // 2, dim, 1) if m >= 1 and dim % m == 0)
    nbits = max(1, min(8, int(math.log2(max(2, num_vectors // 4)))))
    train_size = min(num_vectors, 50 * max(nlist, 2**nbits))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, 32), "train_size": train_size}


def build_faiss_index(
    embeddings: np.ndarray | torch.Tensor, ivf_pq: bool | None = None, seed: int = 0
) -> tuple[faiss.Index, dict[str, Any]]:
    """
    A faiss inner-product index over L2-normalised `embeddings [N, D]`.

    Args:
        ivf_pq: `True` for IVF-PQ, `False` for exact search, `None` for IVF-PQ above `EXACT_LIMIT` vectors.
        seed: seed of the training sample.

    Returns:
        `(index, settings)`: `settings` has `type` ("flat" or "ivfpq") and, for IVF-PQ, `ivfpq_settings`.
    """
    vectors = np.ascontiguousarray(torch.as_tensor(embeddings).float().numpy())
    count, dim = vectors.shape
    if count == 0:
        raise ValueError("no embeddings to index")
    if not _exact_or_ivfpq(count, ivf_pq):
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index, {"type": "flat"}
    settings = ivfpq_settings(count, dim)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(
        quantizer, dim, settings["nlist"], settings["m"], settings["nbits"], faiss.METRIC_INNER_PRODUCT
    )
    sample = np.random.default_rng(seed).choice(count, size=settings["train_size"], replace=False)
    index.train(vectors[np.sort(sample)])
    index.add(vectors)
    index.nprobe = settings["nprobe"]
    return index, {"type": "ivfpq", **settings}


@dataclass
class SearchIndex:
    """
    A gallery's embeddings, their faiss index and its id -> path / captions table.

    Attributes:
        embeddings (`torch.Tensor` of shape `[N, D]`): float16, L2-normalised; row `i` is item `i`.
        index (`faiss.Index`): inner-product index over `embeddings`.
        items (`datasets.Dataset`): columns `id`, `path`, `captions`, row `i` is item `i`.
        info (`dict`): what made the index (`model`, `index` settings, `skipped` images, ...).
    """

    embeddings: torch.Tensor
    index: faiss.Index
    items: datasets.Dataset
    info: dict[str, Any]

    @classmethod
    def from_embeddings(
        cls,
        embeddings: torch.Tensor,
        paths: Sequence[str],
        captions: Sequence[Sequence[str]] | None = None,
        ivf_pq: bool | None = None,
        info: dict[str, Any] | None = None,
    ) -> SearchIndex:
        """Index L2-normalised `embeddings [N, D]` of the images `paths` (see `build_faiss_index`)."""
        if len(embeddings) != len(paths):
            raise ValueError(f"{len(embeddings)} embeddings for {len(paths)} paths")
        # What is indexed is what is stored: the float16 embeddings.
        embeddings = embeddings.to(torch.float16).contiguous()
        index, settings = build_faiss_index(embeddings, ivf_pq)
        items = datasets.Dataset.from_dict(
            {
                "id": list(range(len(paths))),
                "path": list(paths),
                "captions": [list(c) for c in captions] if captions is not None else [[] for _ in paths],
            },
            features=ITEM_FEATURES,
        )
        info = {**(info or {}), "format_version": INDEX_FORMAT_VERSION, "count": len(paths), "index": settings}
        info["dim"] = int(embeddings.shape[1])
        return cls(embeddings, index, items, info)

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """
        The `k` nearest gallery items of each L2-normalised query.

        Args:
            queries: `[Q, D]` (or `[D]`) query embeddings in the gallery's space.

        Returns:
            `(scores, ids)`, both `[Q, min(k, N)]`, best first; `scores` are the exact inner products (cosine
            similarity). An IVF-PQ index proposes `RESCORE_FACTOR * k` candidates, re-scored against the stored
            embeddings; an id of -1 means fewer than `k` candidates were found.
        """
        vectors = torch.as_tensor(queries).float().reshape(-1, self.embeddings.shape[1])
        k = max(1, min(int(k), len(self)))
        if self.info["index"]["type"] == "flat":
            return self.index.search(np.ascontiguousarray(vectors.numpy()), k)
        # IVF-PQ proposes candidates; their exact scores come from the stored embeddings.
        _, candidates = self.index.search(np.ascontiguousarray(vectors.numpy()), min(len(self), RESCORE_FACTOR * k))
        candidates = torch.from_numpy(candidates)
        found = candidates >= 0
        exact = torch.einsum("qd,qcd->qc", vectors, self.embeddings[candidates.clamp(min=0)].float())
        exact = exact.masked_fill(~found, float("-inf"))
        scores, order = exact.topk(k, dim=1)
        ids = candidates.gather(1, order).masked_fill(scores == float("-inf"), -1)
        return scores.numpy(), ids.numpy()

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index folder (see the module docstring); `index.json` last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_safetensors_atomically(folder / EMBEDDINGS_FILE, {"embeddings": self.embeddings})
        with atomic_path(folder / ITEMS_FILE) as temporary:
            self.items.to_parquet(str(temporary))
        with atomic_path(folder / FAISS_FILE) as temporary:
            faiss.write_index(self.index, str(temporary))
        write_json_atomically(folder / INFO_FILE, self.info)
        return folder


def load_index(folder: str | os.PathLike) -> SearchIndex:
    """
    Read an index folder written by `SearchIndex.save` / `build_index`.

    Raises:
        `FileNotFoundError` naming the folder when it is not a complete index.
    """
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        raise FileNotFoundError(f"{folder}: not a finished index (no {INFO_FILE}); build it with `dclip index`")
    info = json.loads((folder / INFO_FILE).read_text())
    embeddings = load_file(str(folder / EMBEDDINGS_FILE))["embeddings"]
    items = datasets.Dataset.from_parquet(str(folder / ITEMS_FILE), keep_in_memory=True)
    index = faiss.read_index(str(folder / FAISS_FILE))
    if info["index"]["type"] == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = info["index"]["nprobe"]
    return SearchIndex(embeddings, index, items, info)


def build_index(
    model,
    processor,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 1024,
    ivf_pq: bool | None = None,
    store: FeatureStore | None = None,
    info: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> SearchIndex:
    """
    Embed the gallery `images` (a folder or a dataset spec, see `gallery_items`) with a dual encoder, index it and
    save the index folder `output`.

    Images that cannot be read are skipped and named in `info["skipped"]`. The embeddings go through the feature
    store (`FeatureStore.image_embeddings`, default `FeatureStore()`) in chunks of `chunk_size` images that are kept,
    so that a build killed midway resumes where it stopped.

    Args:
        model, processor: a dual encoder (`DCLIPModel`, `CLIPModel`, ...) and its processor.
        ivf_pq: see `build_faiss_index`.
        info: extra entries for `index.json` (e.g. the model's name).

    Returns:
        The saved `SearchIndex`.
    """
    gallery = gallery_items(images)
    readable, problems = check_gallery_images(gallery, progress)
    if not readable:
        raise ValueError(f"{images}: no readable image: " + "; ".join(problems[:10]))
    store = store if store is not None else FeatureStore()
    embeddings = store.image_embeddings(
        model, processor, gallery_table(gallery, readable), batch_size=batch_size, chunk_size=chunk_size
    )
    index = SearchIndex.from_embeddings(
        embeddings,
        [gallery.names[row] for row in readable],
        [gallery.captions[row] for row in readable],
        ivf_pq=ivf_pq,
        info={**(info or {}), "images": os.fspath(images), "skipped": problems},
    )
    index.save(output)
    return index


__all__ = [
    "EXACT_LIMIT",
    "GalleryItems",
    "SearchIndex",
    "build_faiss_index",
    "build_index",
    "check_gallery_images",
    "gallery_table",
    "gallery_items",
    "ivfpq_settings",
    "load_index",
]
