"""`DCLIPProcessor`: image processor + tokenizer + region extractor, for the DCLIP student and teacher."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

from .regions import (
    REGION_EXTRACTORS,
    GridRegionExtractor,
    RegionExtractor,
    Regions,
    crop_regions,
    region_extractor_from_dict,
    regions_from_boxes,
    to_rgb,
    weights_in_saved_folder,
)

ImageInput = Image.Image | np.ndarray | str | os.PathLike | dict


def _describe(name: str | None, source: str | None) -> str:
    if name and source:
        return f"{name} ({source})"
    return name or source or "image"


def load_image(image: ImageInput, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """
    THE image loader of the package: every image the processor, the evaluation and the demo read goes through it, so
    that a bad image is reported by its name, never by a bare PIL error.

    Args:
        image: a file path; a PIL image (opened lazily or not); an `HxW[xC]` uint8 array; or a `datasets` image
            left undecoded (`{"path": ..., "bytes": ...}`, from `datasets.Image(decode=False)`).
        name: what to call the image in errors (`images[3]`, a file name); defaults to its path when it has one.
        max_pixels: refuse images with more pixels than this (read from the header, before decoding).

    Returns:
        An upright 8-bit RGB PIL image, fully decoded.

    Raises:
        `FileNotFoundError` for a missing file; `ValueError` naming the image for anything else it cannot use:
        truncated or corrupt data (PIL's `image file is truncated`), empty images, images above `max_pixels` or
        PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`), modes that do not convert to RGB.
    """
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            return _decode(io.BytesIO(image["bytes"]), _describe(name, image.get("path")), max_pixels)
        if image.get("path") is None:
            raise ValueError(f"{_describe(name, None)}: an undecoded image with neither 'bytes' nor 'path'")
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        label = _describe(name, path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{label}: no such image file")
        return _decode(path, label, max_pixels)
    if isinstance(image, np.ndarray):
        label = _describe(name, None)
        if image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f"{label}: expected an HxW or HxWxC array, got shape {image.shape}")
        try:
            image = Image.fromarray(image)
        except TypeError as error:
            raise ValueError(f"{label}: cannot read an array of dtype {image.dtype} as an image: {error}") from error
        return _checked_rgb(image, label, max_pixels)
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"{_describe(name, None)}: expected a PIL image, a numpy array or a path, got {type(image).__name__}"
        )
    return _checked_rgb(image, _describe(name, getattr(image, "filename", None) or None), max_pixels)


def _decode(source: str | io.BytesIO, label: str, max_pixels: int | None) -> Image.Image:
    try:
        with Image.open(source) as opened:
            _check_size(opened, label, max_pixels)
            opened.load()
            image = opened.copy()
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{label}: refused by PIL's decompression-bomb guard ({error}). If the file is trusted, raise "
            "PIL.Image.MAX_IMAGE_PIXELS before processing it."
        ) from error
    except UnidentifiedImageError as error:
        raise ValueError(f"{label}: not a readable image (not in an image format PIL reads)") from error
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{label}: not a readable image (truncated or corrupt file?): {error}") from error
    return _checked_rgb(image, label, max_pixels)


def _check_size(image: Image.Image, label: str, max_pixels: int | None) -> None:
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{label}: empty image of size {width}x{height}")
    if max_pixels is not None and width * height > max_pixels:
        raise ValueError(f"{label}: {width}x{height} pixels is above the {max_pixels:,} pixel limit")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise ValueError(
            f"{label}: {width}x{height} pixels is above PIL's decompression-bomb limit (2 x {limit}); if the image "
            "is trusted, raise PIL.Image.MAX_IMAGE_PIXELS."
        )


def _checked_rgb(image: Image.Image, label: str, max_pixels: int | None) -> Image.Image:
    _check_size(image, label, max_pixels)
    try:
        image.load()  # a lazily opened image reads its file here: a truncated one fails now, with its name
    except (OSError, SyntaxError) as error:
        raise ValueError(f"{label}: not a readable image (truncated or corrupt file?): {error}") from error
    try:
        return to_rgb(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"{label}: cannot convert mode {image.mode} to RGB: {error}") from error


# RoBERTa-family position ids start after the padding index, so `pad_token_id + 1` positions are never tokens.
_PADDING_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "longformer")
_UNKNOWN_TEXT_LIMIT = 512


def text_position_limit(text_config: dict[str, Any]) -> int | None:
    """How many tokens a text tower (its config as a dict) has positions for; `None` when its config has no
    `max_position_embeddings` (a tower with relative positions)."""
    limit = text_config.get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        return None
    if text_config.get("model_type") in _PADDING_OFFSET_POSITIONS:
        limit -= int(text_config.get("pad_token_id") or 0) + 1
    return limit


class DCLIPProcessor(ProcessorMixin):
    r"""
    Prepares images, texts and, for the teacher, image regions.

    Args:
        image_processor: the vision tower's image processor (e.g. `CLIPImageProcessor`).
        tokenizer: the text tower's tokenizer.
        region_config (`dict`, *optional*):
            Settings of the region extractor (see `modeling_dclip.regions`), saved with the processor. Defaults to
            a 2x2 grid (`{"type": "grid", "scales": [2]}`), which needs no weights. A detector's local weights file
            is copied into the folder the processor is saved to, and referenced relative to it.
        text_position_limit (`int`, *optional*):
            How many tokens the text tower has positions for (its `max_position_embeddings`, less a RoBERTa-style
            padding offset). Captions are truncated to it whatever the tokenizer's `model_max_length` says. Set by
            `from_vision_text_pretrained`; `from_pretrained` reads it from the model's `config.json` beside the
            processor when the saved processor lacks it.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        region_config: dict[str, Any] | None = None,
        text_position_limit: int | None = None,
        **kwargs,
    ):
        self.region_config = dict(region_config) if region_config else GridRegionExtractor().to_dict()
        self.text_position_limit = text_position_limit
        self._region_extractor: RegionExtractor | None = None
        super().__init__(image_processor, tokenizer, **kwargs)

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_model_name_or_path: str,
        text_model_name_or_path: str,
        regions: RegionExtractor | dict[str, Any] | None = None,
        **hub_kwargs,
    ) -> DCLIPProcessor:
        """The processor matching `DCLIPModel.from_vision_text_pretrained` on the same towers (Hub ids, local
        folders, or `EMBEDDED_VISION` / `EMBEDDED_TEXT`), with an optional region extractor or its settings."""
        from transformers import AutoConfig

        from .towers import EMBEDDED_TEXT, embedded_text_path, load_image_processor, load_tokenizer

        region_config = regions.to_dict() if isinstance(regions, RegionExtractor) else regions
        text_source = embedded_text_path() if text_model_name_or_path == EMBEDDED_TEXT else text_model_name_or_path
        text_config = AutoConfig.from_pretrained(text_source, **hub_kwargs).to_dict()
        return cls(
            image_processor=load_image_processor(vision_model_name_or_path, **hub_kwargs),
            tokenizer=load_tokenizer(text_model_name_or_path, **hub_kwargs),
            region_config=region_config,
            text_position_limit=text_position_limit(text_config.get("text_config") or text_config),
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DCLIPProcessor:
        """`ProcessorMixin.from_pretrained`, then two references resolved against the same folder or Hub repo: the
        text tower's position limit (from `config.json`, when the processor did not save it) and a detector's
        weights saved beside the processor (`region_detector/...`), fetched to a local file."""
        from transformers.utils import cached_file

        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
            if key in kwargs
        }

        def fetch(filename: str) -> str | None:
            return cached_file(
                pretrained_model_name_or_path,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **hub_kwargs,
            )

        if processor.text_position_limit is None:
            config_file = fetch("config.json")
            if config_file is not None:
                with open(config_file, encoding="utf-8") as handle:
                    config = json.load(handle)
                student_config = config.get("base_config", config)  # a teacher's text tower is its base's
                processor.text_position_limit = text_position_limit(student_config.get("text_config") or {})
        in_folder = weights_in_saved_folder(processor.region_config)
        if in_folder is not None:
            local = fetch(in_folder)
            if local is None:
                raise FileNotFoundError(
                    f"{pretrained_model_name_or_path}: its processor's region detector weights {in_folder!r} are not "
                    "in that folder or repository"
                )
            processor.region_config = {**processor.region_config, "weights": local}
        return processor

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`; a region detector's local weights file is copied into
        `save_directory` first and saved as a reference relative to it, so that the folder works anywhere."""
        os.makedirs(save_directory, exist_ok=True)
        settings = self.region_config
        if settings.get("type") in REGION_EXTRACTORS:  # not, e.g., a dataset's own boxes: nothing to copy then
            self.region_config = region_extractor_from_dict(settings).portable_settings(save_directory)
        try:
            return super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.region_config = settings

    @property
    def region_extractor(self) -> RegionExtractor:
        """The region extractor described by `region_config`, built on first use (YOLO loads its weights then)."""
        if self._region_extractor is None:
            self._region_extractor = region_extractor_from_dict(self.region_config)
        return self._region_extractor

    @region_extractor.setter
    def region_extractor(self, extractor: RegionExtractor) -> None:
        self.region_config = extractor.to_dict()
        self._region_extractor = extractor

    @property
    def max_text_length(self) -> int:
        """Tokens kept per caption: the text tower's position limit when known, and never more than the tokenizer's
        `model_max_length` (some tokenizers report a practically infinite one: then 512 when the tower is unknown)."""
        tokenizer_limit = self.tokenizer.model_max_length
        if self.text_position_limit is not None:
            return min(tokenizer_limit, self.text_position_limit)
        return min(tokenizer_limit, _UNKNOWN_TEXT_LIMIT)

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | None = None,
        text: str | Sequence[str] | None = None,
        regions: bool = False,
        boxes: Sequence[np.ndarray | Sequence[Sequence[float]]] | None = None,
        return_tensors: str = "pt",
        padding: bool | str = True,
        max_length: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""
        Args:
            images: one image or a list (PIL images in any mode, `HxW[xC]` uint8 arrays, or file paths).
            text: one caption or a list. Captions longer than the text tower's limit are truncated; empty ones
                are an error.
            regions (`bool`, *optional*, defaults to `False`): also return the teacher's region inputs.
            boxes (*optional*): per image, `[N, 4]` normalised xyxy boxes to use as regions instead of running the
                region extractor (the whole image is always region 0).
            max_length (`int`, *optional*): token limit; defaults to `max_text_length`, and never exceeds the text
                tower's position limit.

        Returns:
            `BatchFeature` with `input_ids`, `attention_mask` `(n_texts, seq_len)` when texts are given;
            `pixel_values` `(n_images, 3, H, W)` when images are given; and with `regions=True`:
            `region_pixel_values` `(n_images, R, 3, H, W)`, `region_boxes` `(n_images, R, 4)` normalised xyxy,
            `region_scores` `(n_images, R)`, `region_mask` `(n_images, R)`, R the most regions of any image.
        """
        if images is None and text is None:
            raise ValueError("DCLIPProcessor needs images, text, or both.")
        if return_tensors != "pt":
            raise ValueError(
                f"DCLIPProcessor returns PyTorch tensors only (return_tensors='pt'), got {return_tensors!r}"
            )
        data: dict[str, torch.Tensor] = {}
        if text is not None:
            if max_length is None:
                max_length = self.max_text_length
            elif self.text_position_limit is not None:
                max_length = min(max_length, self.text_position_limit)
            data.update(self._encode_text(text, padding, max_length))
        if images is not None:
            image_list = self._load_images(images)
            data["pixel_values"] = self.image_processor(images=image_list, return_tensors="pt", **kwargs)[
                "pixel_values"
            ]
            if regions or boxes is not None:
                data.update(self._encode_regions(image_list, boxes, **kwargs))
        elif regions:
            raise ValueError("regions=True needs images.")
        return BatchFeature(data=data, tensor_type="pt")

    def _encode_text(self, text: str | Sequence[str], padding: bool | str, max_length: int) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("text is an empty list.")
        for index, caption in enumerate(texts):
            if not isinstance(caption, str):
                raise TypeError(f"text[{index}] is a {type(caption).__name__}, expected str")
            if not caption.strip():
                raise ValueError(f"text[{index}] is empty: an empty caption has no meaning to embed.")
        encoded = self.tokenizer(texts, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    @staticmethod
    def _load_images(images: ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike, dict)):
            images = [images]
        image_list = [load_image(image, name=f"images[{index}]") for index, image in enumerate(images)]
        if not image_list:
            raise ValueError("images is an empty list.")
        return image_list

    def extract_regions(self, images: Sequence[Image.Image]) -> list[Regions]:
        """Regions of each image with the configured extractor (row 0 the whole image)."""
        return self.region_extractor(images)

    def _encode_regions(
        self, images: list[Image.Image], boxes: Sequence[np.ndarray | Sequence[Sequence[float]]] | None, **kwargs
    ) -> dict[str, torch.Tensor]:
        if boxes is None:
            per_image = self.extract_regions(images)
        else:
            if len(boxes) != len(images):
                raise ValueError(f"boxes has {len(boxes)} entries for {len(images)} images")
            per_image = [regions_from_boxes(image_boxes) for image_boxes in boxes]
        return self.pack_regions(images, per_image, **kwargs)

    def pack_regions(self, images: Sequence[Image.Image], per_image: Sequence[Regions], **kwargs) -> dict:
        """Crop and preprocess the regions of each image, padded to the most regions of any image in the batch."""
        crops = [crop for image, found in zip(images, per_image) for crop in crop_regions(image, found)]
        pixels = self.image_processor(images=crops, return_tensors="pt", **kwargs)["pixel_values"]
        batch, most = len(images), max(len(found) for found in per_image)
        region_pixel_values = pixels.new_zeros(batch, most, *pixels.shape[1:])
        region_boxes = torch.zeros(batch, most, 4)
        region_scores = torch.zeros(batch, most)
        region_mask = torch.zeros(batch, most, dtype=torch.long)
        offset = 0
        for index, found in enumerate(per_image):
            count = len(found)
            region_pixel_values[index, :count] = pixels[offset : offset + count]
            region_boxes[index, :count] = torch.from_numpy(found.boxes)
            region_scores[index, :count] = torch.from_numpy(found.scores)
            region_mask[index, :count] = 1
            offset += count
        return {
            "region_pixel_values": region_pixel_values,
            "region_boxes": region_boxes,
            "region_scores": region_scores,
            "region_mask": region_mask,
        }

    def batch_decode(self, *args, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]


__all__ = ["DCLIPProcessor", "load_image", "text_position_limit"]
