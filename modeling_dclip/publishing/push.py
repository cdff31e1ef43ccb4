"""
Uploading a saved DCLIP model folder to the Hugging Face Hub.

The folder is checked first: it must carry its model card (`README.md` with metadata, see `dclip card`), the code
files that `trust_remote_code=True` imports, its processor, and safetensors weights, because a model on the Hub
without any of them cannot be loaded or understood. The upload itself is huggingface_hub's `create_repo` +
`upload_folder`; the token comes from where huggingface_hub looks for it (`HF_TOKEN`, `hf auth login`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitInfo, HfApi, ModelCard, get_token
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects, validate_repo_id

CARD_FILE = "README.md"
# Python caches and the temporary files of interrupted atomic writes never belong in a model repository.
IGNORE_PATTERNS = ["__pycache__", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".*.tmp", "*/.*.tmp"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")


class ModelFolderError(ValueError):
    """A model folder that is not ready to publish; `problems` lists every reason."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"{folder} cannot be published:\n" + "\n".join(f"  - {problem}" for problem in problems))


@dataclass
class PushResult:
    """What `push_model_folder` uploaded (or, with `dry_run`, would upload)."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes)
    commit: CommitInfo | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(f"{path.name}: not valid JSON ({error})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name}: expected a JSON object")
        return None
    return data


def _check_card(folder: Path, problems: list[str]) -> None:
    path = folder / CARD_FILE
    if not path.is_file():
        problems.append(f"{CARD_FILE} (the model card) is missing: write it with `dclip card --run RUN_DIR`")
        return
    try:
        card = ModelCard.load(path)
    except ValueError as error:
        problems.append(f"{CARD_FILE}: its metadata does not parse ({error})")
        return
    if not card.data.to_dict():
        problems.append(f"{CARD_FILE}: has no YAML metadata header: write it with `dclip card --run RUN_DIR`")


def _modules_of_auto_map(auto_map: Any) -> list[str]:
    """Module names in an `auto_map` (`"modeling_dclip.DCLIPModel"`, or tokenizer pairs of such names)."""
    references = []
    for value in (auto_map or {}).values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    return [reference.rsplit(".", 1)[0].split("--")[-1] for reference in references if isinstance(reference, str)]


def _check_code_files(
    folder: Path, config: dict[str, Any], processor_config: dict[str, Any] | None, problems: list[str]
) -> None:
    from transformers.dynamic_module_utils import get_relative_imports

    modules = _modules_of_auto_map(config.get("auto_map"))
    if not modules:
        problems.append("config.json has no auto_map: the model was saved without its code (trust_remote_code)")
        return
    modules += _modules_of_auto_map((processor_config or {}).get("auto_map"))
    seen: set[str] = set()
    pending = list(dict.fromkeys(modules))
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module.replace('.', '/')}.py"
        if not path.is_file():
            problems.append(f"{path.name}: code file missing (needed by trust_remote_code)")
            continue
        pending.extend(get_relative_imports(str(path)))


def _check_processor(folder: Path, processor_config: dict[str, Any] | None, problems: list[str]) -> None:
    if processor_config is None and not (folder / "preprocessor_config.json").is_file():
        problems.append(
            "processor_config.json is missing: save the processor into the folder (processor.save_pretrained)"
        )
    if not (folder / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json is missing: the processor's tokenizer was not saved")
    if not any((folder / name).is_file() for name in _TOKENIZER_VOCABULARIES):
        problems.append(f"no tokenizer vocabulary ({', '.join(_TOKENIZER_VOCABULARIES)})")


def _check_weights(folder: Path, files: Iterable[str], problems: list[str]) -> None:
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path, problems) or {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                problems.append(f"{shard}: weight shard listed in model.safetensors.index.json is missing")
    elif not (folder / "model.safetensors").is_file():
        problems.append("model.safetensors is missing: no weights to publish")
    pickles = [name for name in files if name.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        problems.append(f"pickle files {pickles}: only safetensors weights are published; remove them")


def folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """The files of `folder` that an upload sends, as `(path relative to the folder, size)`: everything but the
    patterns huggingface_hub and this module ignore."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    kept = filter_repo_objects(paths, ignore_patterns=IGNORE_PATTERNS + DEFAULT_IGNORE_PATTERNS)
    return [(path, (folder / path).stat().st_size) for path in kept]


def check_model_folder(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """
    Check that a saved DCLIP model folder is ready to publish.

    Raises:
        `ModelFolderError` listing every problem: missing card (`README.md` with metadata), missing code files for
        `trust_remote_code` (every module of the `auto_map` and what it imports relatively), missing processor or
        tokenizer files, missing safetensors weights, or pickle weight files.

    Returns:
        The files an upload sends, as `(path, size in bytes)`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(folder, ["not a folder"])
    files = folder_files(folder)
    problems: list[str] = []
    _check_card(folder, problems)
    config = _read_json(folder / "config.json", problems)
    processor_config = _read_json(folder / "processor_config.json", problems)
    if config is None:
        if not (folder / "config.json").exists():
            problems.append("config.json is missing: not a saved model folder (model.save_pretrained)")
    else:
        _check_code_files(folder, config, processor_config, problems)
    _check_processor(folder, processor_config, problems)
    _check_weights(folder, [name for name, _ in files], problems)
    if problems:
        raise ModelFolderError(folder, problems)
    return files


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    api: HfApi | None = None,
) -> PushResult:
    """
    Upload a checked model folder to a Hub model repository, creating the repository (and the branch `revision`)
    when they do not exist yet.

    Args:
        folder (`str`): a saved model folder with its card, code files and processor (see [`check_model_folder`]).
        repo_id (`str`): `ORG/NAME` (or `NAME` in the token owner's namespace).
        private (`bool`, *optional*): create the repository private (an existing repository keeps its visibility).
        revision (`str`, *optional*): branch to commit to; defaults to the repository's main branch.
        commit_message (`str`, *optional*): defaults to `"Upload DCLIP <model type> with dclip push"`.
        dry_run (`bool`, *optional*): check the folder and return what would be uploaded, without any network call.
        api (`HfApi`, *optional*): the client to use; defaults to `HfApi()` (token from the usual places).

    Returns:
        [`PushResult`] with the files and, unless `dry_run`, the commit.
    """
    validate_repo_id(repo_id)
    files = check_model_folder(folder)
    result = PushResult(repo_id=repo_id, files=files)
    if dry_run:
        return result
    api = api or HfApi()
    if api.token is None and get_token() is None:
        raise PermissionError(
            "No Hugging Face token found: run `hf auth login` or set the HF_TOKEN environment variable."
        )
    model_type = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("model_type", "model")
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    result.commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        commit_message=commit_message or f"Upload DCLIP {model_type} with dclip push",
        ignore_patterns=list(IGNORE_PATTERNS),
    )
    return result


__all__ = ["CARD_FILE", "ModelFolderError", "PushResult", "check_model_folder", "folder_files", "push_model_folder"]
