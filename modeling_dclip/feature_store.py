"""The feature store: every expensive, reusable tensor the package computes, keyed by what determines it.

Image embeddings, tower features, region boxes, region embeddings, text token states and teacher targets are each
stored once under a key that hashes (kind, model fingerprint, data fingerprint, settings). A result is reused only
for the inputs that produced it: another model, other images (even under the same file names), other captions or
other region settings give another key. Every stage of `dclip run`, `dclip eval`, `dclip regions`, `dclip index`
and the demo read and write through one `FeatureStore`.

Layout: `{root}/{kind}/{key}.safetensors` (the key's inputs in the file's metadata). Writes are atomic; a
`{key}.lock` file (`fcntl.flock`) makes two processes that want the same entry compute it once: the second waits
and reads. Long computations (detection over thousands of photos, a gallery's embeddings) are chunked
([`FeatureStore.chunked`]): each finished chunk is its own file, so a process killed midway continues where it
stopped when run again, several processes split the chunks between them, and memory stays flat.

The store's root defaults to `$DCLIP_FEATURE_STORE`, else `~/.cache/dclip/features`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from . import encoding
from .atomic import save_safetensors_atomically
from .regions import RegionExtractor, Regions, YoloRegionExtractor, region_extractor_from_dict, regions_from_boxes

FORMAT_VERSION = 1
Features = dict[str, torch.Tensor]
_READ_CHUNK_BYTES = 1 << 20


def default_root() -> Path:
    """`$DCLIP_FEATURE_STORE`, else `~/.cache/dclip/features`."""
    configured = os.environ.get("DCLIP_FEATURE_STORE")
    return Path(configured) if configured else Path.home() / ".cache" / "dclip" / "features"


def digest(*parts: Any) -> str:
    """A 32-hex-digit digest of JSON-serialisable `parts` (keys sorted, other values through `str`)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """A digest of a file's bytes."""
    hasher = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as file:
        while block := file.read(_READ_CHUNK_BYTES):
            hasher.update(block)
    return hasher.hexdigest()


# --- fingerprints ---------------------------------------------------------------------------------------------------


def model_fingerprint(model: torch.nn.Module | str | os.PathLike) -> str:
    """A digest of a model's weights and class: of its state dict (names, dtypes, shapes, bytes) for a module, of
    `config.json` and every `*.safetensors` file for a saved folder."""
    hasher = hashlib.blake2b(digest_size=16)
    if isinstance(model, (str, os.PathLike)):
        folder = Path(model)
        files = sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
        missing = [str(path) for path in files if not path.is_file()]
        if missing or len(files) == 1:
            raise FileNotFoundError(f"{folder}: not a saved model folder (missing {missing or '*.safetensors'})")
        for path in files:
            hasher.update(f"{path.name}:{file_digest(path)};".encode())
        return "folder-" + hasher.hexdigest()
    hasher.update(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _cell_digest(value: Any, hasher) -> None:
    if isinstance(value, dict):  # an undecoded datasets.Image cell
        if value.get("bytes") is not None:
            hasher.update(value["bytes"])
        else:
            _cell_digest(value.get("path"), hasher)
    elif isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        # A missing file is hashed by its name here; reading it later raises the error that names it.
        hasher.update(file_digest(path).encode() if os.path.isfile(path) else f"missing:{path}".encode())
    elif isinstance(value, Image.Image):
        hasher.update(f"{value.mode}:{value.size}".encode())
        hasher.update(value.tobytes())
    else:
        hasher.update(memoryview(value).tobytes() if hasattr(value, "__array__") else repr(value).encode())


def image_digests(images: encoding.Images, image_column: str = "image") -> list[str]:
    """A digest of each image's content, in order: file bytes (not names, so a file fixed or replaced under the same
    path is a new image), embedded bytes, or pixels."""
    digests = []

    def add(cell: Any) -> None:
        hasher = hashlib.blake2b(digest_size=16)
        _cell_digest(cell, hasher)
        digests.append(hasher.hexdigest())

    if isinstance(images, datasets.Dataset):
        column = encoding.undecoded(images, image_column)
        for start in range(0, len(column), 256):
            for cell in column[start : start + 256][image_column]:
                add(cell)
    else:
        for image in images:
            add(image)
    return digests


def images_fingerprint(images: encoding.Images, image_column: str = "image") -> str:
    """A digest of the images' content, in order (see [`image_digests`])."""
    return digest(image_digests(images, image_column))


def texts_fingerprint(texts: Sequence[str]) -> str:
    """A digest of a list of texts, in order."""
    return digest(list(texts))


def processor_settings(processor) -> dict[str, Any]:
    """What of a processor decides the tensors it makes: the image processor's settings and the tokenizer's
    identity (class, vocabulary size, length limit)."""
    settings: dict[str, Any] = {}
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        settings["image_processor"] = image_processor.to_dict()
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        settings["tokenizer"] = {
            "class": type(tokenizer).__name__,
            "vocab_size": len(tokenizer),
            "max_length": getattr(processor, "max_text_length", tokenizer.model_max_length),
            "vocab": digest(sorted(tokenizer.get_vocab().items())),
        }
    return settings


# --- region sources -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetBoxes:
    """A dataset's own annotated boxes as regions, after the whole image (no detector, no pixels read).

    Args:
        column: the column of `[N, 4]` normalised xyxy boxes (empty or None: the whole image only).
        labels_column: the column of `[N]` class ids kept as region labels, when the dataset has it.
        max_regions: keep at most this many regions including the whole image; `None` keeps all.
    """

    column: str = "boxes"
    labels_column: str | None = "labels"
    max_regions: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "dataset", **asdict(self)}


RegionSource = RegionExtractor | DatasetBoxes


def region_source_from_config(config: dict[str, Any]) -> RegionSource:
    """The region source a `region_config` describes (`{"type": "dataset", ...}` or any extractor's settings)."""
    settings = dict(config)
    if settings.get("type") == "dataset":
        settings.pop("type")
        return DatasetBoxes(**settings)
    return region_extractor_from_dict(settings)


def region_source_settings(source: RegionSource) -> dict[str, Any]:
    """The settings that decide a source's regions. A local detector is named by its file's bytes, not its path: a
    detector retrained into the same path must not reuse the old boxes, and the same file reached by another path
    (relative, absolute, copied into a saved processor) must. How the detector is run (its batch size, its device)
    does not decide which boxes it finds, so `dclip regions --batch-size 1` and a teacher config's default share
    their boxes."""
    settings = source.to_dict()
    if isinstance(source, YoloRegionExtractor):
        for how_it_runs in ("batch_size", "device"):
            settings.pop(how_it_runs)
        if Path(str(source.weights)).is_file():
            settings["weights"] = Path(str(source.weights)).name
            settings["weights_digest"] = file_digest(source.weights)
    return settings


def _boxes_of_rows(dataset: datasets.Dataset, source: DatasetBoxes, rows: Sequence[int]) -> list[Regions]:
    if source.column not in dataset.column_names:
        raise ValueError(
            f"dataset has no {source.column!r} column for {source}; its columns are {dataset.column_names}"
        )
    with_labels = source.labels_column is not None and source.labels_column in dataset.column_names
    columns = [source.column] + ([source.labels_column] if with_labels else [])
    table = dataset.select_columns(columns)[list(rows)]
    labels = table[source.labels_column] if with_labels else [None] * len(rows)
    found = []
    for row, boxes, row_labels in zip(rows, table[source.column], labels):
        try:
            found.append(regions_from_boxes(boxes or [], labels=row_labels or None, max_regions=source.max_regions))
        except ValueError as error:
            raise ValueError(f"dataset row {row}, column {source.column!r}: {error}") from error
    return found


def compute_region_boxes(
    images: encoding.Images, source: RegionSource, batch_size: int = 16, rows: Sequence[int] | None = None
) -> Features:
    """The regions of `images[rows]` (default: every image) from `source` (an extractor, or `DatasetBoxes` of a
    dataset), packed by [`encoding.regions_to_tensors`]: `region_boxes [N, R, 4]`, `region_scores`, `region_labels`,
    `region_mask`."""
    rows = list(range(len(images))) if rows is None else list(rows)
    if isinstance(source, DatasetBoxes):
        return encoding.regions_to_tensors(_boxes_of_rows(images, source, rows))
    found: list[Regions] = []
    for first in range(0, len(rows), batch_size):
        batch_rows = rows[first : first + batch_size]
        batch = encoding.load_images_at(images, batch_rows)
        try:
            found.extend(source(batch))
        except (TypeError, ValueError) as error:
            raise ValueError(f"images {batch_rows[0]}-{batch_rows[-1]}: {error}") from error
    return encoding.regions_to_tensors(found)


# --- the store ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive `flock` on `path` (created if needed); yields False if `blocking=False` and another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(path: Path) -> Features:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path}: feature store entry is truncated or not a safetensors file ({error})") from error


class FeatureStore:
    """Content-keyed tensors on disk; see the module docstring.

    Args:
        root: the store's folder (default [`default_root`]).
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.root)!r})"

    @staticmethod
    def key(kind: str, parts: dict[str, Any]) -> str:
        """The entry key of `kind` computed from `parts` (everything that determines the result)."""
        return digest(FORMAT_VERSION, kind, parts)

    def path(self, kind: str, parts: dict[str, Any]) -> Path:
        """Where the entry of `kind` for `parts` lives (whether or not it exists yet)."""
        return self.root / kind / f"{self.key(kind, parts)}.safetensors"

    def _save(self, path: Path, kind: str, parts: dict[str, Any], features: Features) -> None:
        metadata = {"kind": kind, "parts": json.dumps(parts, sort_keys=True, default=str)}
        save_safetensors_atomically(path, features, metadata=metadata)

    def load_or_compute(self, kind: str, parts: dict[str, Any], compute: Callable[[], Features]) -> Features:
        """The entry of `kind` for `parts`: read when present, else `compute()`d and written (once, whatever the
        number of processes asking for it)."""
        path = self.path(kind, parts)
        if path.is_file():
            return _load(path)
        with _locked(path.with_suffix(".lock")):
            if path.is_file():  # another process computed it while we waited
                return _load(path)
            features = {name: tensor.contiguous() for name, tensor in compute().items()}
            self._save(path, kind, parts, features)
        return features

    def chunked(
        self,
        kind: str,
        parts: dict[str, Any],
        num_items: int,
        compute_chunk: Callable[[int, int], Features],
        chunk_size: int = 256,
        desc: str | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> Features:
        """The entry of `kind` for `parts`, computed `chunk_size` items at a time by `compute_chunk(start, stop)`.

        Each finished chunk is kept on disk, so a run killed midway continues from the first missing chunk when
        called again. Processes calling this at once share the chunks (each starts at its own offset and skips a
        chunk another process holds), then every process reads the whole entry.

        Returns:
            the chunks' tensors concatenated along dimension 0 (other dimensions zero-padded, see
            [`encoding.concatenate`]).
        """
        if num_items < 1:
            raise ValueError(f"{kind}: nothing to compute (0 items)")
        path = self.path(kind, parts)
        if path.is_file():
            return _load(path)
        folder = path.with_suffix(".chunks")
        starts = list(range(0, num_items, chunk_size))
        shift = (len(starts) * process_index) // max(1, num_processes)
        order = starts[shift:] + starts[:shift]

        def chunk_path(start: int) -> Path:
            return folder / f"{start:012d}-{min(start + chunk_size, num_items):012d}.safetensors"

        done = sum(chunk_path(start).is_file() for start in starts)
        with tqdm(total=num_items, desc=desc or kind, unit="item", disable=None) as bar:
            bar.update(min(num_items, done * chunk_size))
            pending = []
            for start in order:
                target = chunk_path(start)
                if target.is_file():
                    continue
                with _locked(target.with_suffix(".lock"), blocking=False) as mine:
                    if not mine:
                        pending.append(start)  # another process is computing it
                        continue
                    if not target.is_file():
                        stop = min(start + chunk_size, num_items)
                        self._save(target, kind, {**parts, "chunk": [start, stop]}, compute_chunk(start, stop))
                        bar.update(stop - start)
            for start in pending:
                with _locked(chunk_path(start).with_suffix(".lock")):
                    pass  # wait for the other process to finish it
        with _locked(path.with_suffix(".lock")):
            if not path.is_file():
                missing = [str(chunk_path(start)) for start in starts if not chunk_path(start).is_file()]
                if missing:
                    raise RuntimeError(f"{kind}: chunks missing after computation (another process failed?): {missing}")
                features = encoding.concatenate([_load(chunk_path(start)) for start in starts])
                self._save(path, kind, parts, features)
                shutil.rmtree(folder, ignore_errors=True)
                return features
        return _load(path)

    # --- what the package stores ----------------------------------------------------------------------------------

    def image_embeddings(
        self, model, processor, images: encoding.Images, batch_size: int = 64, chunk_size: int = 1024, **kwargs
    ) -> torch.Tensor:
        """[`encoding.encode_images`] of every image (L2-normalised `[N, D]`), chunked and resumable."""
        parts = {
            "model": model_fingerprint(model),
            "images": images_fingerprint(images),
            "processor": processor_settings(processor).get("image_processor"),
        }
        features = self.chunked(
            "image_embeddings",
            parts,
            len(images),
            lambda start, stop: {
                "image_embeds": encoding.encode_images(model, processor, images, batch_size, start=start, stop=stop)
            },
            chunk_size=chunk_size,
            desc="Image embeddings",
            **kwargs,
        )
        return features["image_embeds"]

    def text_embeddings(self, model, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[`encoding.encode_texts`] of `texts` (L2-normalised `[n, D]`)."""
        parts = {
            "model": model_fingerprint(model),
            "texts": texts_fingerprint(texts),
            "processor": processor_settings(processor).get("tokenizer"),
        }
        compute = lambda: {"text_embeds": encoding.encode_texts(model, processor, texts, batch_size)}  # noqa: E731
        return self.load_or_compute("text_embeddings", parts, compute)["text_embeds"]

    def image_tower_features(self, model, processor, images: encoding.Images, batch_size: int = 64) -> torch.Tensor:
        """[`encoding.image_tower_features`]: the image tower's pooled, unprojected outputs `[N, W]`."""
        parts = {
            "tower": model_fingerprint(model.vision_model),
            "pooling": model.config.vision_pooling,
            "images": images_fingerprint(images),
            "processor": processor_settings(processor).get("image_processor"),
        }
        compute = lambda: {"features": encoding.image_tower_features(model, processor, images, batch_size)}  # noqa: E731
        return self.load_or_compute("image_tower_features", parts, compute)["features"]

    def text_tower_features(self, model, processor, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """[`encoding.text_tower_features`]: the text tower's pooled, unprojected outputs `[n, W]`."""
        parts = {
            "tower": model_fingerprint(model.text_model),
            "pooling": model.config.text_pooling,
            "texts": texts_fingerprint(texts),
            "processor": processor_settings(processor).get("tokenizer"),
        }
        compute = lambda: {"features": encoding.text_tower_features(model, processor, texts, batch_size)}  # noqa: E731
        return self.load_or_compute("text_tower_features", parts, compute)["features"]

    def _boxes_parts(self, images: encoding.Images, source: RegionSource) -> dict[str, Any]:
        if isinstance(source, DatasetBoxes):
            if not isinstance(images, datasets.Dataset):
                raise TypeError("DatasetBoxes regions need a datasets.Dataset with a boxes column")
            columns = [c for c in (source.column, source.labels_column) if c and c in images.column_names]
            boxes = digest(images.select_columns(columns).to_dict()) if columns else None
            return {"source": region_source_settings(source), "boxes": boxes, "rows": len(images)}
        return {"source": region_source_settings(source), "images": images_fingerprint(images)}

    def region_boxes(
        self,
        images: encoding.Images,
        source: RegionSource,
        batch_size: int = 16,
        chunk_size: int = 256,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> Features:
        """The regions of every image from `source`: `region_boxes [N, R, 4]`, `region_scores [N, R]`,
        `region_labels [N, R]`, `region_mask [N, R]` (see [`encoding.regions_to_tensors`]).

        A detector's (or the grid's) regions are stored per image, by the image's content and the source's settings
        (for local weights, their bytes): any images already seen, in any split, order or later run, are read back,
        and only new ones are detected, `chunk_size` at a time, each chunk written as it finishes (a run killed
        midway continues where it stopped; processes calling this at once share the chunks). A dataset's own boxes
        (`DatasetBoxes`) are read from its columns, which costs nothing worth storing.
        """
        if isinstance(source, DatasetBoxes):
            return compute_region_boxes(images, source)
        settings = region_source_settings(source)
        folder = self.root / "region_boxes" / digest(FORMAT_VERSION, settings)
        digests = image_digests(images)
        first_row: dict[str, int] = {}
        for row, image_digest in enumerate(digests):
            first_row.setdefault(image_digest, row)
        stored = self._stored_rows(folder)
        missing = [image_digest for image_digest in first_row if image_digest not in stored]
        chunks = [missing[start : start + chunk_size] for start in range(0, len(missing), chunk_size)]
        shift = (len(chunks) * process_index) // max(1, num_processes)
        pending = []
        with tqdm(total=len(missing), desc=f"Regions ({settings['type']})", unit="img", disable=None) as bar:
            for chunk in chunks[shift:] + chunks[:shift]:
                target = folder / f"{digest(chunk)}.safetensors"
                with _locked(target.with_suffix(".lock"), blocking=False) as mine:
                    if not mine:
                        pending.append(target)  # another process is detecting it
                        continue
                    if not target.is_file():
                        boxes = compute_region_boxes(images, source, batch_size, [first_row[d] for d in chunk])
                        self._save(
                            target,
                            "region_boxes",
                            {"source": settings, "images": chunk, "process": process_index},
                            boxes,
                        )
                bar.update(len(chunk))
            for target in pending:
                with _locked(target.with_suffix(".lock")):
                    pass  # wait for the other process to finish it
        stored = self._stored_rows(folder)
        loaded: dict[Path, Features] = {}
        regions = []
        for image_digest in digests:
            path, row = stored[image_digest]
            if path not in loaded:
                loaded[path] = _load(path)
            regions.append(encoding.tensors_to_regions(loaded[path], row))
        return encoding.regions_to_tensors(regions)

    @staticmethod
    def _stored_rows(folder: Path) -> dict[str, tuple[Path, int]]:
        """Image digest -> (file, row) of every region chunk stored in `folder` (read from the files' metadata)."""
        rows: dict[str, tuple[Path, int]] = {}
        for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            with safe_open(str(path), "pt") as file:
                for row, image_digest in enumerate(json.loads(file.metadata()["parts"])["images"]):
                    rows.setdefault(image_digest, (path, row))
        return rows

    def region_features(
        self, teacher, processor, images: encoding.Images, source: RegionSource, batch_size: int = 16, **kwargs
    ) -> Features:
        """[`encoding.region_features`] of every image's regions from `source`: what the teacher reads of an image
        (`region_embeds`, `region_boxes`, `region_scores`, `region_mask`, `image_embeds`), chunked and resumable."""
        parts = {
            "base": model_fingerprint(teacher.base),
            "regions": self._boxes_parts(images, source),
            "processor": processor_settings(processor).get("image_processor"),
        }

        boxes: Features = {}  # detected (or read back) only when some chunk of region features is missing

        def compute(start: int, stop: int) -> Features:
            if not boxes:
                boxes.update(self.region_boxes(images, source, **kwargs))
            return encoding.region_features(teacher, processor, images, boxes, batch_size, start=start, stop=stop)

        return self.chunked("region_features", parts, len(images), compute, 256, "Region embeddings", **kwargs)

    def text_token_features(self, teacher, processor, texts: Sequence[str], batch_size: int = 128) -> Features:
        """[`encoding.text_token_features`] of `texts` through the teacher's frozen base."""
        parts = {
            "base": model_fingerprint(teacher.base),
            "texts": texts_fingerprint(texts),
            "processor": processor_settings(processor).get("tokenizer"),
        }
        compute = lambda: encoding.text_token_features(teacher, processor, texts, batch_size)  # noqa: E731
        return self.load_or_compute("text_token_features", parts, compute)

    def teacher_targets(
        self, teacher, processor, images: encoding.Images, captions: Sequence[str], caption_to_image: torch.Tensor
    ) -> Features:
        """The DCLIP teacher's enriched embeddings of every (image, caption) pair (`teacher_image_embeds`,
        `teacher_text_embeds` `[n_captions, D]`), over the regions the teacher itself was trained with: its
        processor's `region_config` names them, so a student cannot be distilled against other regions."""
        source = region_source_from_config(processor.region_config)
        parts = {
            "teacher": model_fingerprint(teacher),
            "regions": self._boxes_parts(images, source),
            "texts": texts_fingerprint(captions),
            "pairs": digest(caption_to_image.tolist()),
            "processor": processor_settings(processor),
        }

        def compute() -> Features:
            regions = self.region_features(teacher, processor, images, source)
            texts = self.text_token_features(teacher, processor, captions)
            return encoding.teacher_pair_embeddings(teacher, regions, texts, caption_to_image)

        return self.load_or_compute("teacher_targets", parts, compute)


__all__ = [
    "DatasetBoxes",
    "FeatureStore",
    "RegionSource",
    "compute_region_boxes",
    "default_root",
    "digest",
    "file_digest",
    "image_digests",
    "images_fingerprint",
    "model_fingerprint",
    "processor_settings",
    "region_source_from_config",
    "region_source_settings",
    "texts_fingerprint",
]
