"""
A searchable gallery: the student's image embeddings in a faiss index, saved as a folder.

An index folder holds:

- `embeddings.safetensors`: `embeddings [N, D]` float16, L2-normalised, row `i` the gallery item with id `i`;
- `index.faiss`: a faiss inner-product index over them (cosine similarity): exact (`IndexFlatIP`) up to
  `EXACT_LIMIT` images, IVF-PQ above that or when asked (trained on a random sample of the gallery);
- `items.parquet`: the id -> `path` / `captions` table (written and read through `datasets`);
- `index.json`: what made it (model, settings, the images that could not be read) - written last, so a folder with
  an `index.json` is complete;
- `chunks/`: the embeddings of `build_index`, computed in chunks that are kept, so that a killed build resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import faiss
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..atomic import atomic_path, save_safetensors_atomically, write_json_atomically

INDEX_FORMAT_VERSION = 1
# Above this many images, an exact search costs more than ~10 ms per query on a CPU: IVF-PQ is the default.
EXACT_LIMIT = 100_000
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EMBEDDINGS_FILE, FAISS_FILE, ITEMS_FILE, INFO_FILE, CHUNKS_FOLDER = (
    "embeddings.safetensors",
    "index.faiss",
    "items.parquet",
    "index.json",
    "chunks",
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
        names (`list[str]`): each image's name in messages and in the index's `path` column (its file path, or
            `SPEC#row` for an image stored as bytes).
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
            [str(path) for path in paths], [{"path": str(path), "bytes": None} for path in paths], [[] for _ in paths]
        )
    from ..data.spec import load_dataset_spec

    dataset = load_dataset_spec(os.fspath(images))
    if "image" not in dataset.column_names:
        raise ValueError(f"{images}: the dataset has no 'image' column (its columns are {dataset.column_names})")
    sources = dataset.cast_column("image", datasets.Image(decode=False))["image"]
    captions = dataset["captions"] if "captions" in dataset.column_names else [[] for _ in sources]
    names = [source.get("path") or f"{images}#{row}" for row, source in enumerate(sources)]
    return GalleryItems(names, [dict(source) for source in sources], [list(c) for c in captions])


def open_gallery_image(source: dict[str, Any], name: str) -> Image.Image:
    """
    One gallery image, fully decoded, as RGB.

    Raises:
        `ValueError` naming the image when it is missing or not a readable image.
    """
    import io

    try:
        data = source.get("bytes")
        with Image.open(io.BytesIO(data) if data is not None else source["path"]) as image:
            image.load()
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise ValueError(f"{name}: no such file") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{name}: not a readable image ({type(error).__name__}: {error})") from error


def _exact_or_ivfpq(num_vectors: int, ivf_pq: bool | None) -> bool:
    return num_vectors > EXACT_LIMIT if ivf_pq is None else ivf_pq


def ivfpq_settings(num_vectors: int, dim: int) -> dict[str, int]:
    """
    IVF-PQ settings for `num_vectors` vectors of width `dim`: `nlist` ~ 4 sqrt(N) lists (at least 39 training
    points each), `m` sub-quantisers of 4 dimensions (or fewer when `dim` is not divisible), `nbits` 8 bits per code
    (fewer for tiny galleries, which could not train 256 centroids), `nprobe` lists visited per query, and
    `train_size` the sample the quantisers are trained on.
    """
    nlist = max(1, min(int(4 * math.sqrt(num_vectors)), num_vectors // 39))
    m = next(m for m in (dim // 4, dim // 2, dim // 8, dim // 16, 1) if m >= 1 and dim % m == 0)
    nbits = max(1, min(8, int(math.log2(max(2, num_vectors // 4)))))
    train_size = min(num_vectors, max(nlist * 64, 256 * 64))
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
        return len(self.items)

    def search(self, queries: torch.Tensor | np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """
        The `k` nearest gallery items of each L2-normalised query.

        Args:
            queries: `[Q, D]` (or `[D]`) query embeddings in the gallery's space.

        Returns:
            `(scores, ids)`, both `[Q, min(k, N)]`, best first; `scores` are inner products (cosine similarity
            for the exact index, its PQ approximation for IVF-PQ).
        """
        vectors = torch.as_tensor(queries).float().reshape(-1, self.embeddings.shape[1]).numpy()
        k = max(1, min(int(k), len(self)))
        scores, ids = self.index.search(np.ascontiguousarray(vectors), k)
        return scores, ids

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


def _gallery_key(model_digest: str, processor_settings: dict, items: GalleryItems, chunk_size: int) -> str:
    """Identity of a gallery embedding: the model's weights, the preprocessing, every image (path, size and
    modification time, or its bytes' digest) and the chunk size."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(
        json.dumps([INDEX_FORMAT_VERSION, model_digest, processor_settings, chunk_size], default=str).encode()
    )
    for name, source in zip(items.names, items.sources):
        if source.get("bytes") is not None:
            identity = hashlib.blake2b(source["bytes"], digest_size=12).hexdigest()
        else:
            try:
                stat = os.stat(source["path"])
                identity = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                identity = "missing"
        digest.update(f"{name}|{identity}\n".encode())
    return digest.hexdigest()


def embed_gallery(
    encode: Callable[[list[dict[str, Any]]], torch.Tensor],
    items: GalleryItems,
    chunk_dir: str | os.PathLike,
    chunk_size: int = 512,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """
    Embed every readable image of `items`, one chunk of `chunk_size` images at a time; each finished chunk is kept
    in `chunk_dir` (a safetensors file), so that a run killed midway and started again embeds only what is left.

    Args:
        encode: image sources (`{"path", "bytes"}`, all readable) -> L2-normalised embeddings `[n, D]`.
        chunk_dir: this gallery's chunk folder (its name must identify the model and the images).
        progress: a progress bar (`None`: only on a terminal).

    Returns:
        `(embeddings [n_readable, D] float32, rows [n_readable] int64 (positions in items), problems)`, where
        `problems` names each image that could not be read, and why.
    """
    chunk_dir = Path(chunk_dir)
    parts, problems = [], []
    bar = tqdm(
        total=len(items), desc="Embedding images", unit="img", disable=None if progress is None else not progress
    )
    for number, start in enumerate(range(0, len(items), chunk_size)):
        stop = min(start + chunk_size, len(items))
        chunk_file = chunk_dir / f"chunk-{number:06d}.safetensors"
        if chunk_file.is_file():
            chunk = load_file(str(chunk_file))
        else:
            readable = []
            for row in range(start, stop):
                try:
                    open_gallery_image(items.sources[row], items.names[row])
                    readable.append(row)
                except ValueError:
                    pass  # named below, from the chunk's `rows`, whether computed now or read back
            embeds = encode([items.sources[row] for row in readable]) if readable else torch.zeros(0, 0)
            chunk = {"embeddings": embeds.float().contiguous(), "rows": torch.tensor(readable, dtype=torch.long)}
            save_safetensors_atomically(chunk_file, chunk)
        kept = set(chunk["rows"].tolist())
        for row in range(start, stop):
            if row not in kept:
                try:
                    open_gallery_image(items.sources[row], items.names[row])
                    problems.append(f"{items.names[row]}: could not be read when its chunk was embedded")
                except ValueError as error:
                    problems.append(str(error))
        if len(chunk["rows"]):
            parts.append(chunk)
        bar.update(stop - start)
    bar.close()
    if not parts:
        raise ValueError("no readable image in the gallery: " + "; ".join(problems[:10]))
    return torch.cat([part["embeddings"] for part in parts]), torch.cat([part["rows"] for part in parts]), problems


def build_index(
    model,
    processor,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    batch_size: int = 64,
    chunk_size: int = 512,
    ivf_pq: bool | None = None,
    info: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> SearchIndex:
    """
    Embed the gallery `images` (a folder or a dataset spec, see `gallery_items`) with a dual encoder, index it and
    save the index folder `output`. Resumable: finished chunks of embeddings are kept in `output/chunks/`.

    Args:
        model, processor: a dual encoder (`DCLIPModel`, `CLIPModel`, ...) and its processor.
        ivf_pq: see `build_faiss_index`.
        info: extra entries for `index.json` (e.g. the model's name).

    Returns:
        The saved `SearchIndex`; its `info["skipped"]` names the images that could not be read.
    """
    from ..data.region_cache import model_weights_digest
    from ..evaluation.model_eval import encode_images

    gallery = gallery_items(images)
    key = _gallery_key(model_weights_digest(model), processor.image_processor.to_dict(), gallery, chunk_size)

    def encode(sources: list[dict[str, Any]]) -> torch.Tensor:
        table = datasets.Dataset.from_dict({"image": sources}, features=datasets.Features({"image": datasets.Image()}))
        return encode_images(model, processor, table, batch_size=batch_size)

    embeddings, rows, problems = embed_gallery(
        encode, gallery, Path(output) / CHUNKS_FOLDER / key, chunk_size, progress
    )
    kept = rows.tolist()
    index = SearchIndex.from_embeddings(
        embeddings,
        [gallery.names[row] for row in kept],
        [gallery.captions[row] for row in kept],
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
    "embed_gallery",
    "gallery_items",
    "ivfpq_settings",
    "load_index",
    "open_gallery_image",
]
