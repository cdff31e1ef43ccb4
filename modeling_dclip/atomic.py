"""Atomic writes: every file or folder the package writes appears whole or not at all.

The one implementation everything calls: a result is written under a temporary name beside its destination
(`.{name}.{pid}.{random}.tmp`, so two processes never share one) and renamed into place once complete; on any
error the temporary is removed and whatever was at the destination before is left untouched.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TEMPORARY_SUFFIX = ".tmp"


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh temporary path beside `path`, unique to this process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMPORARY_SUFFIX}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write a file or folder at; it replaces `path` when the block succeeds.

    A folder at `path` is replaced whole (the old one is removed just before the rename). The temporary is removed
    when the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        yield temporary
        if temporary.is_dir():
            if path.is_dir():
                shutil.rmtree(path)
            os.replace(temporary, path)
        else:
            os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def write_bytes_atomically(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: str | os.PathLike, payload: Any) -> Path:
    """Write `payload` as indented, key-sorted JSON to `path` atomically (non-JSON values through `str`)."""
    return write_text_atomically(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def save_safetensors_atomically(
    path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> Path:
    """`safetensors.torch.save_file` to `path` atomically (tensors made contiguous first)."""
    from safetensors.torch import save_file

    with atomic_path(path) as temporary:
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(temporary), metadata=metadata)
    return Path(path)


__all__ = [
    "atomic_path",
    "save_safetensors_atomically",
    "temporary_name",
    "write_bytes_atomically",
    "write_json_atomically",
    "write_text_atomically",
]
