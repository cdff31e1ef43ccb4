"""
Loading a saved model and its processor by folder or Hub id (`dclip eval`, the demo, the training stages): a DCLIP
student or teacher, any dual encoder transformers knows, or a CLIP checkpoint as a `DCLIPModel`; safetensors weights
only, never a prompt, and every failure named by the folder or Hub id it came from.

- The model's kind comes from its `config.json`: a DCLIP student or teacher loads with this package's classes (no
  remote code is run), any other `model_type` transformers knows loads through the Auto classes with
  `trust_remote_code=False`; an unknown `model_type` is an error naming it, never transformers' interactive
  `trust_remote_code` question.
- Weights are read with `use_safetensors=True`. Local weight files are checked before loading: a truncated or
  invalid `model.safetensors` (or shard) is an error naming the file, and a folder whose only weights are a pickle
  (`pytorch_model.bin`) is an error naming it and saying how to convert it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_WEIGHTS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names its folder or Hub id and the reason."""


def _looks_like_a_path(name: str) -> bool:
    """A Hub id is `name` or `org/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")


def resolve_model_source(name_or_path: str | os.PathLike) -> tuple[str, Path | None]:
    """`(name, folder)`: `folder` is the local folder (`None` for a Hub id).

    Raises:
        `FileNotFoundError` for a path that does not exist or a folder without `config.json`.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FileNotFoundError(f"model {name!r}: not a saved model folder (no config.json in it)")
        return str(path), path
    if _looks_like_a_path(name):
        raise FileNotFoundError(f"model {name!r}: no such folder")
    return name, None


def read_model_config(name: str, folder: Path | None, **hub_kwargs: Any) -> dict[str, Any]:
    """The `config.json` of a local folder or Hub repository, as a dict (no class is resolved, no code is run)."""
    if folder is not None:
        config_path = folder / "config.json"
    else:
        from transformers.utils import cached_file

        try:
            config_path = Path(cached_file(name, "config.json", **hub_kwargs))
        except OSError as error:
            raise ModelLoadError(f"model {name!r}: no config.json could be fetched ({error})") from error
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"model {name!r}: {config_path} is not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"model {name!r}: {config_path} is not a JSON object")
    return config


def check_local_weights(folder: Path) -> None:
    """
    Check the weight files of a local model folder before anything loads them.

    Raises:
        `ModelLoadError` naming the folder: no safetensors weights (naming the pickle file found instead, with the
        command that converts it), a missing shard, or a weight file that is truncated or not a safetensors file.
    """
    from safetensors import SafetensorError, safe_open

    index_path = folder / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
            raise ModelLoadError(
                f"model folder {folder}: {SAFETENSORS_INDEX} is not a valid index ({error})"
            ) from error
        files = sorted(set(weight_map.values()))
    elif (folder / SAFETENSORS_WEIGHTS).is_file():
        files = [SAFETENSORS_WEIGHTS]
    else:
        pickles = [name for name in PICKLE_WEIGHTS if (folder / name).is_file()]
        if pickles:
            raise ModelLoadError(
                f"model folder {folder}: its weights are the pickle file {folder / pickles[0]}, and only safetensors "
                "weights are loaded (unpickling a file can run any code). If you trust the file, convert it once: "
                'python -c "import sys; from transformers import AutoModel; '
                'AutoModel.from_pretrained(sys.argv[1], use_safetensors=False).save_pretrained(sys.argv[1])" '
                f"{folder}   (this writes {SAFETENSORS_WEIGHTS} beside it; then delete {pickles[0]})"
            )
        raise ModelLoadError(f"model folder {folder}: no weights ({SAFETENSORS_WEIGHTS} is missing)")
    for file_name in files:
        path = folder / file_name
        if not path.is_file():
            raise ModelLoadError(
                f"model folder {folder}: weight shard {file_name} listed in {SAFETENSORS_INDEX} is missing"
            )
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(
                f"model folder {folder}: {file_name} is truncated or not a safetensors file ({error})"
            ) from error


def _checked_source(name_or_path: str | os.PathLike, hub_kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """`(name, config dict)` of a model source whose `model_type` is known and whose local weights are sound."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling_dclip import DCLIPModel, DCLIPTeacherModel

    unknown = sorted(set(hub_kwargs) - set(_HUB_KWARGS))
    if unknown:
        raise TypeError(f"unexpected loading arguments {unknown}; accepted: {list(_HUB_KWARGS)}")
    name, folder = resolve_model_source(name_or_path)
    config = read_model_config(name, folder, **hub_kwargs)
    model_type = config.get("model_type")
    dclip_types = (DCLIPModel.config_class.model_type, DCLIPTeacherModel.config_class.model_type)
    if model_type not in dclip_types and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"model {name!r}: config.json has model_type {model_type!r}, which neither DCLIP "
            f"({', '.join(dclip_types)}) nor this transformers version knows; no remote code is run to find out. Fix "
            "the model_type, or upgrade transformers if it is a newer architecture."
        )
    if folder is not None:
        check_local_weights(folder)
    return name, config


@contextmanager
def _named_load_errors(name: str) -> Iterator[None]:
    """Turn the errors of `from_pretrained` into `ModelLoadError`s naming `name`."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise ModelLoadError(
            f"model {name!r}: a weight file is truncated or not a safetensors file ({error})"
        ) from error
    except (OSError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"model {name!r}: could not be loaded ({type(error).__name__}: {error})") from error


def load_model_and_processor(
    name_or_path: str | os.PathLike, device: str | torch.device | None = None, **hub_kwargs: Any
):
    """
    A saved model and its processor, ready to use: a DCLIP student (`DCLIPModel`) or teacher (`DCLIPTeacherModel`)
    with a `DCLIPProcessor`, or any dual encoder whose `model_type` transformers knows (a `CLIPModel` checkpoint),
    through `AutoModel` / `AutoProcessor` without remote code.

    Args:
        name_or_path: a local folder (config, safetensors weights, processor files) or a Hub id.
        device: where to put the model; default the first CUDA device when there is one, else the CPU.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, ... passed to `from_pretrained`.

    Returns:
        `(model, processor)`, the model in eval mode.

    Raises:
        `FileNotFoundError` for a missing local folder or `config.json`; `ModelLoadError` (a `ValueError`) naming
        `name_or_path` for bad or pickle-only weights, an unknown `model_type`, or a failed load; `ValueError` for a
        model that is neither a dual encoder (`get_image_features` / `get_text_features`) nor a DCLIP teacher.
    """
    from transformers import AutoModel, AutoProcessor

    from .modeling_dclip import DCLIPModel, DCLIPTeacherModel
    from .processing_dclip import DCLIPProcessor

    name, config = _checked_source(name_or_path, hub_kwargs)
    dclip_classes = {cls.config_class.model_type: cls for cls in (DCLIPModel, DCLIPTeacherModel)}
    with _named_load_errors(name):
        if config.get("model_type") in dclip_classes:
            model = dclip_classes[config["model_type"]].from_pretrained(name, use_safetensors=True, **hub_kwargs)
            processor = DCLIPProcessor.from_pretrained(name, **hub_kwargs)
        else:
            model = AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False, **hub_kwargs)
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=False, **hub_kwargs)
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


def load_dual_encoder(name_or_path: str | os.PathLike, **hub_kwargs: Any):
    """A `DCLIPModel` and its processor from a saved `DCLIPModel` or a `CLIPModel` checkpoint (a Hub id such as
    `openai/clip-vit-base-patch16`, or a folder), the CLIP converted unchanged (`DCLIPModel.from_clip`: the same
    embeddings), with the checkpoint's own image processor and tokenizer. Same checks as
    [`load_model_and_processor`]."""
    from .modeling_dclip import DCLIPModel
    from .processing_dclip import DCLIPProcessor

    name, config = _checked_source(name_or_path, hub_kwargs)
    with _named_load_errors(name):
        if config.get("model_type") == "clip":
            model = DCLIPModel.from_clip(name, use_safetensors=True, **hub_kwargs)
            return model, DCLIPProcessor.from_vision_text_pretrained(name, name, **hub_kwargs)
        return (
            DCLIPModel.from_pretrained(name, use_safetensors=True, **hub_kwargs),
            DCLIPProcessor.from_pretrained(name, **hub_kwargs),
        )


__all__ = [
    "ModelLoadError",
    "check_local_weights",
    "load_dual_encoder",
    "load_model_and_processor",
    "read_model_config",
    "resolve_model_source",
]
