"""
Loading a saved model and its processor for inference (`dclip eval`, the demo): safetensors weights only, never a
prompt, and every failure named by the folder or Hub id it came from.

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
from pathlib import Path
from typing import Any

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


def load_model_and_processor(name_or_path: str | os.PathLike, **hub_kwargs: Any):
    """
    A saved model and its processor: a DCLIP student (`DCLIPModel`) or teacher (`DCLIPTeacherModel`) with a
    `DCLIPProcessor`, or any model whose `model_type` transformers knows, through `AutoModel` / `AutoProcessor`.

    Args:
        name_or_path: a local folder (config, safetensors weights, processor files) or a Hub id.
        hub_kwargs: `cache_dir`, `revision`, `token`, `local_files_only`, ... passed to `from_pretrained`.

    Returns:
        `(model, processor)`; the model is on the CPU, in eval mode.

    Raises:
        `FileNotFoundError` for a missing local folder or `config.json`; `ModelLoadError` (a `ValueError`) naming
        `name_or_path` for anything else: bad or pickle-only weights, an unknown `model_type`, a failed load.
    """
    from safetensors import SafetensorError
    from transformers import AutoModel, AutoProcessor
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .modeling_dclip import DCLIPModel, DCLIPTeacherModel
    from .processing_dclip import DCLIPProcessor

    unknown = sorted(set(hub_kwargs) - set(_HUB_KWARGS))
    if unknown:
        raise TypeError(f"load_model_and_processor: unexpected arguments {unknown}; accepted: {list(_HUB_KWARGS)}")
    name, folder = resolve_model_source(name_or_path)
    config = read_model_config(name, folder, **hub_kwargs)
    model_type = config.get("model_type")
    dclip_classes = {
        DCLIPModel.config_class.model_type: DCLIPModel,
        DCLIPTeacherModel.config_class.model_type: DCLIPTeacherModel,
    }
    if model_type not in dclip_classes and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"model {name!r}: config.json has model_type {model_type!r}, which neither DCLIP "
            f"({', '.join(sorted(dclip_classes))}) nor this transformers version knows; no remote code is run to "
            "find out. Fix the model_type, or upgrade transformers if it is a newer architecture."
        )
    if folder is not None:
        check_local_weights(folder)
    try:
        if model_type in dclip_classes:
            model = dclip_classes[model_type].from_pretrained(name, use_safetensors=True, **hub_kwargs)
            processor = DCLIPProcessor.from_pretrained(name, **hub_kwargs)
        else:
            model = AutoModel.from_pretrained(name, use_safetensors=True, trust_remote_code=False, **hub_kwargs)
            processor = AutoProcessor.from_pretrained(name, trust_remote_code=False, **hub_kwargs)
    except SafetensorError as error:
        raise ModelLoadError(
            f"model {name!r}: a weight file is truncated or not a safetensors file ({error})"
        ) from error
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"model {name!r}: could not be loaded ({type(error).__name__}: {error})") from error
    return model.eval(), processor


__all__ = [
    "ModelLoadError",
    "check_local_weights",
    "load_model_and_processor",
    "read_model_config",
    "resolve_model_source",
]
