"""
The demo's image galleries: where their images come from, checking them, and a faiss index of their embeddings that
is computed once per gallery.

A gallery is a list of image files. Its default is the sample photos that installed Python packages ship
(scikit-image's data, scikit-learn's and matplotlib's sample images, ...); a user adds a folder or uploads files.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..processing_dclip import load_image
from ..search.index import SearchIndex

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000
MAX_GALLERY_IMAGES = 1000
THUMBNAIL_SIZE = 320
# (package, file inside it, name shown): real photographs only; test charts, masks and text pages are left out.
SAMPLE_PHOTOS = (
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
    ("skimage", "data/rocket.jpg", "rocket"),
    ("skimage", "data/motorcycle_left.png", "motorcycle"),
    ("skimage", "data/hubble_deep_field.jpg", "hubble_deep_field"),
    ("skimage", "data/camera.png", "camera"),
    ("skimage", "data/coins.png", "coins"),
    ("skimage", "data/moon.png", "moon"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
    ("ultralytics", "assets/bus.jpg", "bus"),
    ("ultralytics", "assets/zidane.jpg", "zidane"),
)


class GalleryInputError(ValueError):
    """An image or folder a user gave that the demo cannot use; the message is shown in the UI."""


@dataclass(frozen=True)
class GalleryItem:
    """One gallery image: the name shown for it and its file."""

    name: str
    path: Path


def _package_folder(package: str) -> Path | None:
    # find_spec locates the package without importing it (importing scikit-learn or ultralytics costs seconds).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos() -> list[GalleryItem]:
    """The sample photos shipped by the installed packages, in `SAMPLE_PHOTOS` order."""
    items = []
    for package, relative_path, name in SAMPLE_PHOTOS:
        folder = _package_folder(package)
        if folder is not None and (folder / relative_path).is_file():
            items.append(GalleryItem(name=name, path=folder / relative_path))
    return items


def open_image(path: str | Path, name: str | None = None) -> Image.Image:
    """
    An upright RGB image from a file the user gave, with the demo's limits, read by the package's one image loader
    (`modeling_dclip.processing_dclip.load_image`).

    Raises:
        `GalleryInputError` naming the file (by `name`, never by its path on the server): missing, not an image type
        the demo takes, larger than `MAX_IMAGE_BYTES` or `MAX_IMAGE_PIXELS`, or not a readable image.
    """
    path = Path(path)
    name = name or path.name
    if not path.is_file():
        raise GalleryInputError(f"{name}: no such file")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise GalleryInputError(f"{name}: not an image file (accepted: {', '.join(IMAGE_SUFFIXES)})")
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise GalleryInputError(f"{name}: {size / 2**20:.1f} MB is above the {MAX_IMAGE_BYTES / 2**20:.0f} MB limit")
    try:
        # A bare file name for errors: an upload's path on the server is nothing a visitor should see.
        return load_image({"path": None, "bytes": path.read_bytes()}, name=name, max_pixels=MAX_IMAGE_PIXELS)
    except (OSError, ValueError) as error:
        raise GalleryInputError(str(error)) from error


def folder_images(folder: str | Path) -> list[GalleryItem]:
    """The image files (by suffix) of a folder and its subfolders, in sorted order. The walk stops once it has found
    more than `MAX_GALLERY_IMAGES`, so that pointing at a huge tree costs no more than that."""
    folder = Path(str(folder).strip()).expanduser()
    if not folder.is_dir():
        raise GalleryInputError(f"{folder}: no such folder")
    paths: list[Path] = []
    for root, subfolders, files in os.walk(folder):
        subfolders.sort()
        paths += [Path(root) / name for name in sorted(files) if Path(name).suffix.lower() in IMAGE_SUFFIXES]
        if len(paths) > MAX_GALLERY_IMAGES:
            break
    if not paths:
        raise GalleryInputError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return [GalleryItem(name=path.relative_to(folder).with_suffix("").as_posix(), path=path) for path in paths]


def uploaded_images(paths: Iterable[str | Path]) -> list[GalleryItem]:
    """Gallery items for uploaded files (named after the file)."""
    return [GalleryItem(name=Path(path).stem, path=Path(path)) for path in paths]


@dataclass
class SearchHit:
    item: GalleryItem
    thumbnail: Path
    score: float


class GalleryIndex:
    """
    The embeddings of a gallery's images in the package's search index (`modeling_dclip.search.SearchIndex`: faiss
    inner product, i.e. cosine similarity of the L2-normalised embeddings), with a thumbnail of each image for display.
    """

    def __init__(self, items: list[GalleryItem], thumbnails: list[Path], embeddings: np.ndarray, problems: list[str]):
        self.items = items
        self.thumbnails = thumbnails
        self.problems = problems
        self.index = SearchIndex.from_embeddings(torch.from_numpy(np.asarray(embeddings)), [str(i.path) for i in items])

    @classmethod
    def build(
        cls,
        items: Sequence[GalleryItem],
        encode_images: Callable[[list[Image.Image]], np.ndarray],
        thumbnail_dir: Path,
        batch_size: int = 16,
    ) -> GalleryIndex:
        """
        Embed every readable image of `items`; unreadable ones are skipped and listed in `problems`.

        Args:
            items: the gallery, at most `MAX_GALLERY_IMAGES` are used.
            encode_images: images -> L2-normalised embeddings `[n, dim]`.
            thumbnail_dir: where the thumbnails are written.
        """
        problems = []
        if len(items) > MAX_GALLERY_IMAGES:
            problems.append(f"more than {MAX_GALLERY_IMAGES} images given; the first {MAX_GALLERY_IMAGES} are used")
            items = items[:MAX_GALLERY_IMAGES]
        kept, thumbnails, embeddings, batch = [], [], [], []
        thumbnail_dir.mkdir(parents=True, exist_ok=True)

        def flush() -> None:
            if batch:
                embeddings.append(encode_images(batch))
                batch.clear()

        for item in items:
            try:
                image = open_image(item.path, item.path.name)
            except GalleryInputError as error:
                problems.append(str(error))
                continue
            kept.append(item)
            thumbnails.append(_save_thumbnail(image, item.path, thumbnail_dir))
            batch.append(image)
            if len(batch) == batch_size:
                flush()
        flush()
        if not kept:
            raise GalleryInputError("no readable image in the gallery: " + "; ".join(problems))
        return cls(kept, thumbnails, np.concatenate(embeddings), problems)

    def __len__(self) -> int:
        return len(self.items)

    def search(self, query_embedding: np.ndarray, k: int) -> list[SearchHit]:
        """The `k` images closest to an L2-normalised `[dim]` query embedding, best first."""
        scores, indices = self.index.search(np.asarray(query_embedding)[None, :], k)
        return [
            SearchHit(self.items[index], self.thumbnails[index], float(score))
            for score, index in zip(scores[0], indices[0])
            if index >= 0
        ]


def _save_thumbnail(image: Image.Image, source: Path, thumbnail_dir: Path) -> Path:
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    path = thumbnail_dir / f"{key}.jpg"
    if not path.exists():
        thumbnail = image.copy()
        thumbnail.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        thumbnail.save(path, quality=90)
    return path


def gallery_key(items: Sequence[GalleryItem]) -> tuple:
    """Identity of a gallery's content: its files with their sizes and modification times."""
    key = []
    for item in items:
        try:
            stat = item.path.stat()
            key.append((item.name, str(item.path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            key.append((item.name, str(item.path), -1, -1))
    return tuple(key)


class GalleryCache:
    """Gallery indexes by content, so that each gallery is embedded once (the `capacity` most recent are kept)."""

    def __init__(
        self, encode_images: Callable[[list[Image.Image]], np.ndarray], thumbnail_dir: Path, capacity: int = 8
    ):
        self.encode_images = encode_images
        self.thumbnail_dir = thumbnail_dir
        self.capacity = capacity
        self._indexes: OrderedDict[tuple, GalleryIndex] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, items: Sequence[GalleryItem]) -> GalleryIndex:
        key = gallery_key(items)
        # One lock for building too: two sessions asking for the same new gallery embed it once.
        with self._lock:
            if key not in self._indexes:
                self._indexes[key] = GalleryIndex.build(items, self.encode_images, self.thumbnail_dir)
                while len(self._indexes) > self.capacity:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(key)
            return self._indexes[key]
