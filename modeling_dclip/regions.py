"""Image regions for the DCLIP teacher: a YOLO detector, a fixed grid, or boxes the caller already has.

Every extractor returns, per image, a `Regions` whose row 0 is the whole image, followed by up to
`max_regions - 1` boxes in normalised xyxy coordinates; `crop_regions` turns them into the crops the teacher's
frozen image tower encodes.

This module ships inside saved checkpoints for `trust_remote_code`, so it imports only the standard library, numpy,
PIL and torch. ultralytics (AGPL-3.0, the optional extra `dclip[yolo]`) is imported through `importlib` on first use:
transformers' remote-code import check reads `import` statements only, so a checkpoint does not demand it from users
who never run the detector.
"""

from __future__ import annotations

import abc
import importlib
import inspect
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

WHOLE_IMAGE_BOX = (0.0, 0.0, 1.0, 1.0)
# Where a saved processor keeps its detector's weights, relative to its folder.
DETECTOR_FOLDER = "region_detector"
WHOLE_IMAGE_LABEL = -1

_ALTERNATIVES = "GridRegionExtractor (fixed grid cells, no weights) or the dataset's own boxes via regions_from_boxes"
# Boxes a little outside [0, 1] are rounding noise from whoever normalised them; further out they are pixels.
_NORMALISED_TOLERANCE = 1e-3
# float32 boxes times a large image size land a hair past an integer; this keeps crops from growing a pixel.
_PIXEL_EPSILON = 1e-3


@dataclass
class Regions:
    """The regions of one image. Row 0 is always the whole image.

    Attributes:
        boxes (`np.ndarray` of shape `[R, 4]`, float32): normalised xyxy boxes in [0, 1]; row 0 is `[0, 0, 1, 1]`.
        scores (`np.ndarray` of shape `[R]`, float32): detection confidence; row 0 is 1.0.
        labels (`np.ndarray` of shape `[R]`, int64): class ids; row 0, and any region of unknown class, is -1.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.scores = np.asarray(self.scores, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4 or len(self.boxes) == 0:
            raise ValueError(f"Regions.boxes must have shape [R, 4] with R >= 1, got {self.boxes.shape}")
        if self.scores.shape != (len(self.boxes),) or self.labels.shape != (len(self.boxes),):
            raise ValueError(
                f"Regions.scores {self.scores.shape} and Regions.labels {self.labels.shape} must both have shape "
                f"[{len(self.boxes)}] to match Regions.boxes {self.boxes.shape}"
            )
        if tuple(self.boxes[0].tolist()) != WHOLE_IMAGE_BOX:
            raise ValueError(f"Regions.boxes row 0 must be the whole image {WHOLE_IMAGE_BOX}, got {self.boxes[0]}")

    def __len__(self) -> int:
        return len(self.boxes)


def _whole_image_first(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, max_regions: int | None) -> Regions:
    """Prepend the whole image to `[N, 4]` boxes, keeping the `max_regions - 1` most confident (stable order)."""
    order = np.argsort(-scores, kind="stable")
    if max_regions is not None:
        order = order[: max_regions - 1]
    return Regions(
        boxes=np.concatenate([np.asarray([WHOLE_IMAGE_BOX], dtype=np.float32), boxes[order]]),
        scores=np.concatenate([np.ones(1, dtype=np.float32), scores[order]]),
        labels=np.concatenate([np.full(1, WHOLE_IMAGE_LABEL, dtype=np.int64), labels[order]]),
    )


def _check_max_regions(max_regions: int | None) -> None:
    if max_regions is not None and (not isinstance(max_regions, int) or max_regions < 1):
        raise ValueError(
            f"max_regions must be None or an integer >= 1 (it counts the whole image), got {max_regions!r}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Return `image` as an 8-bit RGB image, upright as its EXIF orientation says.

    Unlike a bare `image.convert("RGB")`: 16-bit modes (`I;16*`) keep their high byte instead of clipping at 255
    (as ultralytics and OpenCV read them); 32-bit `I` and `F` images already in [0, 255] are kept, others are
    stretched from their min..max; transparency is composited onto white, as transformers' `convert_to_rgb` does.
    EXIF orientation is applied as ultralytics and transformers' `load_image` apply it, so that boxes, crops and the
    processor's pixels all refer to the same upright image. An RGB image with no orientation tag is returned as is.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16"):
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            values = (values - low) * (255.0 / (high - low) if high > low else 0.0)
        image = Image.fromarray(np.round(values).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def regions_from_boxes(
    boxes: Sequence[Sequence[float]] | np.ndarray,
    scores: Sequence[float] | np.ndarray | None = None,
    labels: Sequence[int] | np.ndarray | None = None,
    image_size: tuple[int, int] | None = None,
    max_regions: int | None = None,
) -> Regions:
    """Regions from boxes the caller already has (dataset annotations, a cache, another detector).

    Args:
        boxes: `[N, 4]` xyxy boxes, `N` may be 0. Normalised to [0, 1] unless `image_size` is given.
        scores: `[N]` confidences; default 1.0 each.
        labels: `[N]` class ids; default -1 (unknown) each.
        image_size: `(width, height)` in pixels when `boxes` are pixel coordinates.
        max_regions: keep at most this many regions including the whole image, the most confident first
            (ties keep their input order); `None` keeps all.

    Returns:
        `Regions` with `N + 1` rows (or `max_regions`), row 0 the whole image; boxes clipped to the image.
    """
    _check_max_regions(max_regions)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must have shape [N, 4] (xyxy), got {boxes.shape}")
    if not np.isfinite(boxes).all():
        row = int(np.flatnonzero(~np.isfinite(boxes).all(axis=1))[0])
        raise ValueError(f"boxes row {row} is not finite: {boxes[row].tolist()}")
    if image_size is not None:
        width, height = image_size
        if width <= 0 or height <= 0:
            raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
        boxes = boxes / np.asarray([width, height, width, height], dtype=np.float64)
    else:
        outside = ((boxes < -_NORMALISED_TOLERANCE) | (boxes > 1 + _NORMALISED_TOLERANCE)).any(axis=1)
        if outside.any():
            row = int(np.flatnonzero(outside)[0])
            raise ValueError(
                f"boxes row {row} {boxes[row].tolist()} is outside [0, 1]; pixel boxes need image_size=(width, height)"
            )
    inverted = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if inverted.any():
        row = int(np.flatnonzero(inverted)[0])
        raise ValueError(f"boxes row {row} {boxes[row].tolist()} is not xyxy (x2 < x1 or y2 < y1)")
    count = len(boxes)
    scores = np.ones(count, dtype=np.float32) if scores is None else np.asarray(scores, dtype=np.float32)
    labels = np.full(count, WHOLE_IMAGE_LABEL, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    if scores.shape != (count,) or labels.shape != (count,):
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have one entry per box ({count} boxes)")
    return _whole_image_first(np.clip(boxes, 0.0, 1.0).astype(np.float32), scores, labels, max_regions)


def _pixel_span(start: float, end: float, size: int) -> tuple[int, int]:
    """Pixel interval `[low, high)` covering normalised `[start, end]`, clamped to the image, at least 1 pixel."""
    low = min(max(math.floor(start * size + _PIXEL_EPSILON), 0), size - 1)
    high = min(max(math.ceil(end * size - _PIXEL_EPSILON), low + 1), size)
    return low, high


def crop_regions(image: Image.Image, regions: Regions) -> list[Image.Image]:
    """Crop every region out of `image`.

    Args:
        image: any PIL image; it is brought to RGB (and upright) with `to_rgb` first.
        regions: its regions, normalised xyxy.

    Returns:
        `len(regions)` RGB crops, the first being the whole image. A box that is empty once clamped to the image
        becomes a crop of at least 1x1 pixel, so a degenerate detection never stops a batch.
    """
    image = to_rgb(image)
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"cannot crop regions from an empty image of size {image.size}")
    crops = []
    for x1, y1, x2, y2 in regions.boxes.tolist():
        left, right = _pixel_span(x1, x2, width)
        top, bottom = _pixel_span(y1, y2, height)
        crops.append(image.crop((left, top, right, bottom)))
    return crops


class RegionExtractor(abc.ABC):
    """Finds regions in images. Subclasses set `type` and implement `_extract` and `to_dict`."""

    type: ClassVar[str]

    def __call__(self, images: Sequence[Image.Image]) -> list[Regions]:
        """Regions of each image, in order: one `Regions` (row 0 the whole image) per input image."""
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a PIL.Image.Image")
            if image.width == 0 or image.height == 0:
                raise ValueError(f"images[{index}] is empty (size {image.size})")
        return self._extract(list(images))

    @abc.abstractmethod
    def _extract(self, images: list[Image.Image]) -> list[Regions]: ...

    @abc.abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings, with `"type"`, that `region_extractor_from_dict` rebuilds this from."""

    def portable_settings(self, save_directory: str | os.PathLike) -> dict[str, Any]:
        """The settings to save into `save_directory` (a processor's folder), with any file they need copied there
        and referenced relative to it, so that the folder works on another machine. Default: `to_dict()`."""
        return self.to_dict()

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.to_dict().items() if key != "type")
        return f"{type(self).__name__}({settings})"


class GridRegionExtractor(RegionExtractor):
    """Fixed grid cells as regions: no detector, no weights, identical for every image.

    Args:
        scales: grid sizes; `(2,)` gives the whole image plus 2x2 cells, `(2, 3)` adds 3x3 cells (1 + 4 + 9 regions).
            Cells are listed scale by scale, row-major.
        max_regions: keep only the first `max_regions` regions including the whole image; `None` keeps all.
        score: the score given to every cell (the whole image always scores 1.0).
    """

    type = "grid"

    def __init__(self, scales: Sequence[int] = (2,), max_regions: int | None = None, score: float = 1.0) -> None:
        scales = tuple(scales)
        if not all(isinstance(scale, int) and scale >= 2 for scale in scales):
            raise ValueError(
                f"grid scales must be integers >= 2 (scale 1 is the whole image, always region 0), got {scales}"
            )
        _check_max_regions(max_regions)
        self.scales = scales
        self.max_regions = max_regions
        self.score = float(score)
        cells = [
            [column / scale, row / scale, (column + 1) / scale, (row + 1) / scale]
            for scale in scales
            for row in range(scale)
            for column in range(scale)
        ]
        self._template = regions_from_boxes(
            cells, scores=np.full(len(cells), self.score, dtype=np.float32), max_regions=max_regions
        )

    def _extract(self, images: list[Image.Image]) -> list[Regions]:
        template = self._template
        return [Regions(template.boxes.copy(), template.scores.copy(), template.labels.copy()) for _ in images]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "scales": list(self.scales), "max_regions": self.max_regions, "score": self.score}


def _import_ultralytics():
    # Importing ultralytics sets OMP_NUM_THREADS=1 in the process's environment when it is unset, so that every
    # process started after it (a training launch, a worker) would compute on one thread. The caller's is kept.
    threads = os.environ.get("OMP_NUM_THREADS")
    try:
        return importlib.import_module("ultralytics")
    except ImportError as error:
        raise ImportError(
            "YoloRegionExtractor needs ultralytics, an optional dependency (AGPL-3.0): "
            f'pip install "dclip[yolo]". Without it, use {_ALTERNATIVES}. (Importing ultralytics failed: {error})'
        ) from error
    finally:
        if threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = threads


class YoloRegionExtractor(RegionExtractor):
    """Regions from an ultralytics YOLO detector, the most confident detections first.

    The model is loaded on the first call and kept on this instance; it is neither pickled nor part of `to_dict`,
    so a processor holding this extractor stays cheap to save, copy and hash (e.g. by `datasets.map`).

    Args:
        weights: a local `.pt` file (e.g. a YOLO trained with ultralytics), or an ultralytics asset name such as
            `"yolov8x.pt"`, which ultralytics downloads when there is a network.
        conf: minimum detection confidence.
        iou: IoU threshold of non-maximum suppression.
        max_regions: regions per image including the whole image, so at most `max_regions - 1` detections.
        classes: keep only these class ids; `None` keeps all.
        imgsz: the detector's input size in pixels.
        batch_size: images per forward pass; inputs are fed in chunks of this size to bound memory.
        device: a torch device string (`"cpu"`, `"cuda:0"`); `None` lets ultralytics choose.
    """

    type = "yolo"

    def __init__(
        self,
        weights: str | Path,
        conf: float = 0.25,
        iou: float = 0.7,
        max_regions: int = 10,
        classes: Sequence[int] | None = None,
        imgsz: int = 640,
        batch_size: int = 16,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {conf}")
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"iou must be in [0, 1], got {iou}")
        if not isinstance(max_regions, int) or max_regions < 2:
            raise ValueError(
                f"max_regions must be an integer >= 2 (the whole image and 1+ detections), got {max_regions!r}"
            )
        if imgsz < 32 or batch_size < 1:
            raise ValueError(f"imgsz must be >= 32 and batch_size >= 1, got imgsz={imgsz}, batch_size={batch_size}")
        self.weights = str(weights)
        self.conf = float(conf)
        self.iou = float(iou)
        self.max_regions = max_regions
        self.classes = None if classes is None else [int(class_id) for class_id in classes]
        self.imgsz = int(imgsz)
        self.batch_size = int(batch_size)
        self.device = None if device is None else str(device)
        self._model = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def _missing_weights(self, reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"YOLO weights {self.weights!r} not found: {reason}. Pass a local .pt file (for instance a YOLO trained "
            f"with ultralytics on data with known boxes), or use {_ALTERNATIVES}."
        )

    def _load_model(self):
        ultralytics = _import_ultralytics()
        path = Path(self.weights).expanduser()
        if path.is_file():
            try:
                # task="detect": an exported model (.onnx) does not always say what it does.
                return ultralytics.YOLO(str(path), task="detect")
            except Exception as error:
                error.add_note(f"while loading the YOLO weights file {path}")
                raise
        if path.name != self.weights:
            raise self._missing_weights("no such file")
        # A bare asset name: ultralytics looks in its weights folder, then downloads. Offline, fail before it tries.
        ultralytics_utils = importlib.import_module("ultralytics.utils")
        in_weights_dir = (Path(ultralytics.settings["weights_dir"]) / path.name).is_file()
        if not in_weights_dir and not ultralytics_utils.is_online():
            raise self._missing_weights("no such local file, and no network to download it")
        try:
            return ultralytics.YOLO(self.weights)
        except Exception as error:
            raise self._missing_weights(f"no such local file, and ultralytics could not get it ({error})") from error

    def _extract(self, images: list[Image.Image]) -> list[Regions]:
        # ultralytics' `select_device` (run by `predict`) sets torch's CPU thread count for the whole process to its
        # own choice (cpu_count - 1, at most 8): everything computed after it would run on fewer threads here (one of
        # two cores) and sum in another order. The caller's count is put back.
        threads = torch.get_num_threads()
        try:
            return self._predict(images)
        finally:
            torch.set_num_threads(threads)

    def _predict(self, images: list[Image.Image]) -> list[Regions]:
        if self._model is None:
            self._model = self._load_model()
        predict_settings = {
            "conf": self.conf,
            "iou": self.iou,
            "max_det": self.max_regions - 1,
            "classes": self.classes,
            "imgsz": self.imgsz,
            "stream": True,
            "verbose": False,
            "save": False,
        }
        if self.device is not None:
            predict_settings["device"] = self.device
        regions = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = [to_rgb(image) for image in images[start : start + self.batch_size]]
                # ultralytics batches a list of PIL images as one batch, so the chunks are what bound memory.
                # Each Results holds the decoded image and device tensors: keep only small numpy arrays from it.
                for result in self._model.predict(chunk, **predict_settings):
                    regions.append(
                        regions_from_boxes(
                            result.boxes.xyxyn.cpu().numpy(),
                            scores=result.boxes.conf.cpu().numpy(),
                            labels=result.boxes.cls.cpu().numpy().astype(np.int64),
                            max_regions=self.max_regions,
                        )
                    )
        return regions

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "weights": self.weights,
            "conf": self.conf,
            "iou": self.iou,
            "max_regions": self.max_regions,
            "classes": self.classes,
            "imgsz": self.imgsz,
            "batch_size": self.batch_size,
            "device": self.device,
        }

    def portable_settings(self, save_directory: str | os.PathLike) -> dict[str, Any]:
        """
        Settings whose `weights` work wherever `save_directory` goes: a local weights file is copied to
        `save_directory/region_detector/<file name>` and referenced by that relative path (a processor loaded from
        the folder or its Hub repository resolves it, see `weights_in_saved_folder`); a bare ultralytics asset name
        (`"yolov8x.pt"`) stays as it is. A path to a file that does not exist here cannot be copied: it is kept,
        with a warning, and `dclip push` refuses the folder.
        """
        settings = self.to_dict()
        if weights_in_saved_folder(settings) is not None and (Path(save_directory) / self.weights).is_file():
            return settings  # already saved beside the processor (a folder saved over itself)
        source = Path(self.weights).expanduser()
        if source.is_file():
            target = Path(save_directory) / DETECTOR_FOLDER / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists() or not os.path.samefile(source, target):
                shutil.copyfile(source, target)
            settings["weights"] = f"{DETECTOR_FOLDER}/{source.name}"
        elif source.name != self.weights:
            warnings.warn(
                f"YOLO weights {self.weights!r} do not exist on this machine, so they cannot be copied into "
                f"{os.fspath(save_directory)}: the saved processor will only load where that path exists, and "
                "`dclip push` refuses the folder",
                stacklevel=2,
            )
        return settings


def weights_in_saved_folder(settings: dict[str, Any]) -> str | None:
    """The path, relative to a saved processor's folder, of the detector weights its `region_config` references
    (`region_detector/<file>`, as `portable_settings` writes it), or `None` when it references none there."""
    weights = settings.get("weights")
    if settings.get("type") != YoloRegionExtractor.type or not isinstance(weights, str):
        return None
    parts = Path(weights).parts
    if len(parts) == 2 and parts[0] == DETECTOR_FOLDER and not Path(weights).is_absolute():
        return Path(weights).as_posix()
    return None


REGION_EXTRACTORS: dict[str, type[RegionExtractor]] = {
    GridRegionExtractor.type: GridRegionExtractor,
    YoloRegionExtractor.type: YoloRegionExtractor,
}


def region_extractor_from_dict(config: dict[str, Any]) -> RegionExtractor:
    """Rebuild an extractor from `RegionExtractor.to_dict()` output (e.g. read back from a processor config)."""
    settings = dict(config)
    kind = settings.pop("type", None)
    if kind == "dataset":
        raise ValueError(
            f"region_config {config} takes regions from a dataset's annotated {settings.get('column', 'boxes')!r} "
            "column, not from an extractor: pass the boxes to the processor (`processor(images, boxes=...)`)"
        )
    if kind not in REGION_EXTRACTORS:
        raise ValueError(
            f"unknown region extractor type {kind!r} in {config}; known types: {sorted(REGION_EXTRACTORS)}"
        )
    extractor_class = REGION_EXTRACTORS[kind]
    accepted = set(inspect.signature(extractor_class.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - accepted)
    if unknown:
        raise ValueError(f"unknown settings {unknown} for region extractor type {kind!r}; accepted: {sorted(accepted)}")
    return extractor_class(**settings)
