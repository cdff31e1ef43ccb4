"""
Uploading a saved DCLIP model folder to the Hugging Face Hub.

Only the model's files are uploaded: its card (`README.md` with metadata, see `dclip card`), `config.json`, the
safetensors weights, the code files that `trust_remote_code=True` imports, the processor and tokenizer files, and the
region detector's weights when the processor saved them beside it (`region_detector/`). Everything else in the folder
(a trainer's `training/` state, checkpoints, caches, records such as `training_complete.json`, other files) is listed
as left out, and uploaded only when `include` patterns ask for it.

The folder is checked first, because a model on the Hub without any of those files cannot be loaded or understood,
and a processor that points at a detector by a path of this machine fails everywhere else. The upload itself is one
huggingface_hub commit (`create_repo` + `create_commit` of exactly the listed files); the token comes from where
huggingface_hub looks for it (`HF_TOKEN`, `hf auth login`).
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, ModelCard, get_token
from huggingface_hub.utils import validate_repo_id

CARD_FILE = "README.md"
# Python caches and the temporary files of interrupted atomic writes are never uploaded, even when included.
IGNORE_PATTERNS = ["__pycache__", "__pycache__/*", "*/__pycache__/*", "*.pyc", ".*.tmp", "*/.*.tmp", ".git/*"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_VOCABULARIES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
# The files of a saved model and processor (transformers' names) that are not found through config.json.
MODEL_FILES = frozenset(
    {
        CARD_FILE,
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "processor_config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "chat_template.jinja",
        ".gitattributes",
        *_TOKENIZER_VOCABULARIES,
    }
)


class ModelFolderError(ValueError):
    """A model folder that is not ready to publish; `problems` lists every reason."""

    def __init__(self, folder: Path, problems: list[str]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"{folder} cannot be published:\n" + "\n".join(f"  - {problem}" for problem in problems))


@dataclass
class UploadPlan:
    """The files of a model folder that an upload sends, and those it leaves out, as `(relative path, size)`."""

    files: list[tuple[str, int]]
    excluded: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class PushResult:
    """What `push_model_folder` uploaded (or, with `dry_run`, would upload), and what it left out."""

    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, size in bytes)
    excluded: list[tuple[str, int]] = field(default_factory=list)
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
) -> set[str]:
    """The code files `trust_remote_code` imports (the `auto_map` modules and their relative imports)."""
    from transformers.dynamic_module_utils import get_relative_imports

    modules = _modules_of_auto_map(config.get("auto_map"))
    if not modules:
        problems.append("config.json has no auto_map: the model was saved without its code (trust_remote_code)")
        return set()
    found: set[str] = set()
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
        found.add(path.relative_to(folder).as_posix())
        pending.extend(get_relative_imports(str(path)))
    return found


def _check_processor(folder: Path, processor_config: dict[str, Any] | None, problems: list[str]) -> None:
    if processor_config is None and not (folder / "preprocessor_config.json").is_file():
        problems.append(
            "processor_config.json is missing: save the processor into the folder (processor.save_pretrained)"
        )
    if not (folder / "tokenizer_config.json").is_file():
        problems.append("tokenizer_config.json is missing: the processor's tokenizer was not saved")
    if not any((folder / name).is_file() for name in _TOKENIZER_VOCABULARIES):
        problems.append(f"no tokenizer vocabulary ({', '.join(_TOKENIZER_VOCABULARIES)})")


def _check_weights(folder: Path, problems: list[str]) -> set[str]:
    """The weight files: `model.safetensors`, or the index and every shard it lists."""
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path, problems) or {}
        shards = set(index.get("weight_map", {}).values())
        for shard in sorted(shards):
            if not (folder / shard).is_file():
                problems.append(f"{shard}: weight shard listed in model.safetensors.index.json is missing")
        return shards
    if not (folder / "model.safetensors").is_file():
        problems.append("model.safetensors is missing: no weights to publish")
    return set()


def _check_detector(folder: Path, processor_config: dict[str, Any] | None, problems: list[str]) -> set[str]:
    """The region detector's weights saved beside the processor; a reference that cannot work after an upload (a
    path of this machine, a missing file) is a problem."""
    regions = (processor_config or {}).get("region_config") or {}
    weights = regions.get("weights")
    if regions.get("type") != "yolo" or not isinstance(weights, str):
        return set()
    path = PurePosixPath(weights)
    if len(path.parts) == 1 and not Path(weights).is_absolute():
        return set()  # an ultralytics asset name (yolov8x.pt), which ultralytics fetches by name
    if path.is_absolute() or Path(weights).is_absolute() or weights.startswith("~") or ".." in path.parts:
        problems.append(
            f"processor_config.json: the region detector's weights are {weights!r}, a path on this machine that will "
            "not exist where the model is downloaded. Save the processor again to copy them into the folder: "
            f"DCLIPProcessor.from_pretrained(DIR).save_pretrained(DIR) with DIR={str(folder)!r}"
        )
        return set()
    if not (folder / weights).is_file():
        problems.append(f"{weights}: the region detector's weights named in processor_config.json are missing")
        return set()
    return {path.as_posix()}


def _matches(path: str, patterns: Sequence[str]) -> bool:
    """Whether `path` or one of its folders matches one of the fnmatch `patterns`."""
    candidates = [path, *(parent.as_posix() for parent in PurePosixPath(path).parents if parent.as_posix() != ".")]
    return any(fnmatch.fnmatch(candidate, pattern) for pattern in patterns for candidate in candidates)


def folder_files(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """Every file of `folder` (but caches and interrupted writes), as `(path relative to the folder, size)`."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return [(path, (folder / path).stat().st_size) for path in paths if not _matches(path, IGNORE_PATTERNS)]


def plan_upload(folder: str | os.PathLike, include: Sequence[str] = ()) -> UploadPlan:
    """
    Check that a saved DCLIP model folder is ready to publish, and choose the files an upload sends.

    Args:
        folder (`str`): the model folder.
        include (`list[str]`, *optional*): fnmatch patterns of other files to upload too (matched against the
            relative path and its folders: `training` takes the whole `training/` folder).

    Raises:
        `ModelFolderError` listing every problem: missing card (`README.md` with metadata), missing code files for
        `trust_remote_code` (every module of the `auto_map` and what it imports relatively), missing processor or
        tokenizer files, missing safetensors weights, a region detector referenced by a path of this machine, or
        pickle files among the files to upload (the detector's own weights excepted).

    Returns:
        [`UploadPlan`]: the model's files (and those `include` adds), and every other file, left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(folder, ["not a folder"])
    problems: list[str] = []
    _check_card(folder, problems)
    config = _read_json(folder / "config.json", problems)
    processor_config = _read_json(folder / "processor_config.json", problems)
    model_files = set(MODEL_FILES)
    if config is None:
        if not (folder / "config.json").exists():
            problems.append("config.json is missing: not a saved model folder (model.save_pretrained)")
    else:
        model_files |= _check_code_files(folder, config, processor_config, problems)
    _check_processor(folder, processor_config, problems)
    model_files |= _check_weights(folder, problems)
    detector = _check_detector(folder, processor_config, problems)
    model_files |= detector
    files, excluded = [], []
    for path, size in folder_files(folder):
        (files if path in model_files or _matches(path, include) else excluded).append((path, size))
    pickles = [path for path, _ in files if path.endswith(_PICKLE_SUFFIXES) and path not in detector]
    if pickles:
        problems.append(f"pickle files {pickles}: only safetensors weights are published; remove them")
    if problems:
        raise ModelFolderError(folder, problems)
    return UploadPlan(files=files, excluded=excluded)


def check_model_folder(folder: str | os.PathLike, include: Sequence[str] = ()) -> list[tuple[str, int]]:
    """The files an upload of `folder` sends, as `(path, size in bytes)`, after the checks of [`plan_upload`]."""
    return plan_upload(folder, include).files


def push_model_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    include: Sequence[str] = (),
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
        include (`list[str]`, *optional*): fnmatch patterns of files beyond the model's own to upload too.
        api (`HfApi`, *optional*): the client to use; defaults to `HfApi()` (token from the usual places).

    Returns:
        [`PushResult`] with the files and, unless `dry_run`, the commit.
    """
    validate_repo_id(repo_id)
    plan = plan_upload(folder, include)
    result = PushResult(repo_id=repo_id, files=plan.files, excluded=plan.excluded)
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
    result.commit = api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        revision=revision,
        operations=[
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=Path(folder) / path) for path, _ in plan.files
        ],
        commit_message=commit_message or f"Upload DCLIP {model_type} with dclip push",
    )
    return result


__all__ = [
    "CARD_FILE",
    "MODEL_FILES",
    "ModelFolderError",
    "PushResult",
    "UploadPlan",
    "check_model_folder",
    "folder_files",
    "plan_upload",
    "push_model_folder",
]
