"""`DCLIPProcessor`: image processor + tokenizer + region extractor, for the DCLIP student and teacher."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

from .regions import (
    GridRegionExtractor,
    RegionExtractor,
    Regions,
    crop_regions,
    region_extractor_from_dict,
    regions_from_boxes,
    to_rgb,
)

ImageInput = Image.Image | np.ndarray | str | os.PathLike


def load_image(image: ImageInput, name: str = "image") -> Image.Image:
    """An upright 8-bit RGB PIL image from a PIL image, an `HxW[xC]` uint8 array or a file path.

    Raises a `ValueError` naming `name` (or the file) when the image cannot be used: unreadable, truncated or
    corrupt files, empty images, and images above PIL's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`).
    """
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such image file")
        try:
            with Image.open(name) as opened:
                opened.load()
                image = opened.copy()
        except Image.DecompressionBombError as error:
            raise ValueError(
                f"{name}: refused by PIL's decompression-bomb guard ({error}). If the file is trusted, raise "
                "PIL.Image.MAX_IMAGE_PIXELS before processing it."
            ) from error
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ValueError(f"{name}: not a readable image (truncated or corrupt file?): {error}") from error
    elif isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.size == 0:
            raise ValueError(f"{name}: expected an HxW or HxWxC array, got shape {image.shape}")
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, a numpy array or a path, got {type(image).__name__}")
    width, height = image.size
    if width == 0 or height == 0:
        raise ValueError(f"{name}: empty image of size {width}x{height}")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > 2 * limit:
        raise ValueError(
            f"{name}: {width}x{height} pixels is above PIL's decompression-bomb limit (2 x {limit}); if the image "
            "is trusted, raise PIL.Image.MAX_IMAGE_PIXELS."
        )
    try:
        return to_rgb(image)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name}: cannot convert mode {image.mode} to RGB: {error}") from error


class DCLIPProcessor(ProcessorMixin):
    r"""
    Prepares images, texts and, for the teacher, image regions.

    Args:
        image_processor: the vision tower's image processor (e.g. `CLIPImageProcessor`).
        tokenizer: the text tower's tokenizer.
        region_config (`dict`, *optional*):
            Settings of the region extractor (see `modeling_dclip.regions`), saved with the processor. Defaults to
            a 2x2 grid (`{"type": "grid", "scales": [2]}`), which needs no weights.
    """

    def __init__(self, image_processor=None, tokenizer=None, region_config: dict[str, Any] | None = None, **kwargs):
        self.region_config = dict(region_config) if region_config else GridRegionExtractor().to_dict()
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
        from .towers import load_image_processor, load_tokenizer

        region_config = regions.to_dict() if isinstance(regions, RegionExtractor) else regions
        return cls(
            image_processor=load_image_processor(vision_model_name_or_path, **hub_kwargs),
            tokenizer=load_tokenizer(text_model_name_or_path, **hub_kwargs),
            region_config=region_config,
        )

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
        # Some tokenizers report a practically infinite model_max_length when their tower's limit is unknown.
        return min(self.tokenizer.model_max_length, 512)

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
            max_length (`int`, *optional*): token limit; defaults to the tokenizer's (at most 512).

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
            data.update(self._encode_text(text, padding, max_length or self.max_text_length))
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
        if isinstance(images, (Image.Image, np.ndarray, str, os.PathLike)):
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


__all__ = ["DCLIPProcessor", "load_image"]
