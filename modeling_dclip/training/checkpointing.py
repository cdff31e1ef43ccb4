"""Writing models and training states so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "training_complete.json"
"""Written last into a finished model folder: its presence means every other file there is complete."""


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a model whose save finished."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def save_model_atomically(
    model, processor, output_dir: str | os.PathLike, summary: dict[str, Any] | None = None
) -> Path:
    """`save_pretrained` `model` (and `processor`) into `output_dir`, which may already hold other files (such as
    the `training/` folder): everything is written to a temporary folder first, each file is then renamed into
    place, and the completion marker (with `summary`) comes last."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    staging = output_dir / ".saving"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    if processor is not None:
        processor.save_pretrained(staging)
    for path in sorted(staging.rglob("*")):
        if path.is_file():
            target = output_dir / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)
    write_json_atomically(output_dir / COMPLETE_MARKER, summary or {})
    return output_dir


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(temporary, path)


def checkpoint_folders(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """Finished `step_<N>` checkpoint folders, oldest first (temporary `.tmp` folders are ignored)."""
    folder = Path(checkpoints_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_resume_checkpoint(resume_from_checkpoint: str | None, checkpoints_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest under `checkpoints_dir` (None if there is none yet,
    so that `--resume_from_checkpoint latest` also starts a fresh run); any other value must be a folder."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        folders = checkpoint_folders(checkpoints_dir)
        return folders[-1] if folders else None
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is not a checkpoint folder")
    return path
