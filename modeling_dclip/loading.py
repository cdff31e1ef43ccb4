"""Loading a saved model and its processor by folder or Hub id: a DCLIP student or teacher, or any dual encoder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

from .modeling_dclip import DCLIPModel, DCLIPTeacherModel
from .processing_dclip import DCLIPProcessor


def load_model_and_processor(name_or_path: str | os.PathLike, device: str | torch.device | None = None):
    """
    A saved model and its processor, ready to use: a DCLIP student or teacher, or any dual encoder that
    `AutoModel` loads and that has `get_image_features` / `get_text_features` (a `CLIPModel` checkpoint).

    Args:
        name_or_path: a local folder (config, weights, processor files) or a Hub id.
        device: where to put the model; default the first CUDA device when there is one, else the CPU.

    Returns:
        `(model, processor)`, the model in eval mode.

    Raises:
        `FileNotFoundError` for a missing local folder, `ValueError` for a checkpoint that is not a dual encoder
        or cannot be loaded (the message names `name_or_path`).
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: not a saved model folder (no config.json in it)")
        name = str(path)
    elif _looks_like_a_path(name):
        raise FileNotFoundError(f"model {name!r}: no such folder")
    try:
        config = AutoConfig.from_pretrained(name)
        if config.model_type == DCLIPTeacherModel.config_class.model_type:
            model, processor = DCLIPTeacherModel.from_pretrained(name), DCLIPProcessor.from_pretrained(name)
        elif config.model_type == DCLIPModel.config_class.model_type:
            model, processor = DCLIPModel.from_pretrained(name), DCLIPProcessor.from_pretrained(name)
        else:
            model, processor = AutoModel.from_pretrained(name), AutoProcessor.from_pretrained(name)
    except OSError as error:
        raise ValueError(f"model {name!r}: could not be loaded ({error})") from error
    if not isinstance(model, DCLIPTeacherModel) and not all(
        callable(getattr(model, method, None)) for method in ("get_image_features", "get_text_features")
    ):
        raise ValueError(
            f"model {name!r} is a {type(model).__name__}, not a dual encoder (it has no get_image_features / "
            "get_text_features) nor a DCLIP teacher"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval(), processor


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else that does not exist is a mistyped local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def load_dual_encoder(name_or_path: str | os.PathLike, **hub_kwargs) -> tuple[DCLIPModel, DCLIPProcessor]:
    """A `DCLIPModel` and its processor from a saved `DCLIPModel` or a `CLIPModel` checkpoint (a Hub id such as
    `openai/clip-vit-base-patch16`, or a folder), the CLIP converted unchanged (`DCLIPModel.from_clip`: the same
    embeddings), with the checkpoint's own image processor and tokenizer."""
    name = os.fspath(name_or_path)
    if AutoConfig.from_pretrained(name, **hub_kwargs).model_type == "clip":
        model = DCLIPModel.from_clip(name, **hub_kwargs)
        return model, DCLIPProcessor.from_vision_text_pretrained(name, name, **hub_kwargs)
    return DCLIPModel.from_pretrained(name, **hub_kwargs), DCLIPProcessor.from_pretrained(name, **hub_kwargs)


__all__ = ["load_dual_encoder", "load_model_and_processor"]
