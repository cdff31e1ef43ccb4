"""Writing models and training states so that an interruption never leaves a half-written one behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomically

COMPLETE_MARKER = "training_complete.json"
"""Written last into a finished model folder: its presence means every other file there is complete."""


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a model whose save finished."""
    return (Path(folder) / COMPLETE_MARKER).is_file()


def save_model_atomically(
    model, processor, output_dir: str | os.PathLike, summary: dict[str, Any] | None = None
) -> Path:
    """`save_pretrained` `model` (and `processor`) into `output_dir`, which may already hold other files (such as
    a model card): everything is written to a temporary folder first, each file is then renamed into
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
