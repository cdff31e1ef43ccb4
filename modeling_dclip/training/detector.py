"""Training the region detector: an ultralytics YOLO on a YOLO-format dataset (such as the synthetic scenes'
export from `modeling_dclip.data.synthetic.export_yolo`), offline, for `modeling_dclip.regions.YoloRegionExtractor`.

Offline means no download is ever attempted: the network is built from an architecture `.yaml` when no weights are
given, plots are off (they fetch a font), and AMP is off by default (ultralytics' AMP check downloads YOLO weights on
CUDA; `amp="bf16"` skips the check).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ARCHITECTURE = "yolov8n.yaml"


def _split_paths(root: Path, value: Any) -> list[Path]:
    entries = value if isinstance(value, list) else [value]
    return [Path(entry) if Path(entry).is_absolute() else root / entry for entry in entries]


def resolve_data_yaml(data_yaml: str | os.PathLike) -> dict[str, Any]:
    """Read and check an ultralytics detection data file, with its dataset root resolved to an absolute path.

    The file must be a YAML mapping with `train` and `val` (a folder or list file of images, or a list of those,
    relative to `path`) and class `names` (a list, or a mapping id -> name) or `nc`. A relative `path` is taken from
    the data file's folder, then from the working directory; no `path` means the data file's folder.

    Raises:
        FileNotFoundError: the data file, or a split it names, does not exist.
        ValueError: the file is not a YAML mapping, lacks a key, or a key has the wrong type.
    """
    file = Path(data_yaml).expanduser()
    if file.is_dir():
        raise ValueError(f"detector data file {file} is a folder; pass the data .yaml inside it")
    if not file.is_file():
        raise FileNotFoundError(
            f"detector data file {file} does not exist (export one with modeling_dclip.data.synthetic.export_yolo)"
        )
    if file.suffix not in (".yaml", ".yml"):
        raise ValueError(f"detector data file {file}: expected a .yaml file, got {file.suffix or 'no suffix'!r}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"detector data file {file} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"detector data file {file}: expected a mapping of keys (path, train, val, names), "
            f"got {type(data).__name__}"
        )
    missing = [key for key in ("train", "val") if not data.get(key)]
    if "names" not in data and "nc" not in data:
        missing.append("names")
    if missing:
        raise ValueError(f"detector data file {file}: missing key(s) {missing}")
    names = data.get("names")
    if names is not None and not (isinstance(names, (list, dict)) and names):
        raise ValueError(
            f"detector data file {file}: 'names' must be a non-empty list or mapping id -> name, got {names!r}"
        )
    if names is None and not (isinstance(data.get("nc"), int) and data["nc"] > 0):
        raise ValueError(f"detector data file {file}: 'nc' must be a positive integer, got {data.get('nc')!r}")

    declared = Path(str(data.get("path") or file.parent.resolve())).expanduser()
    candidates = [declared] if declared.is_absolute() else [file.parent / declared, Path.cwd() / declared]
    root = next((candidate.resolve() for candidate in candidates if candidate.is_dir()), None)
    if root is None:
        looked_in = [str(candidate) for candidate in candidates]
        raise FileNotFoundError(
            f"detector data file {file}: dataset 'path' {declared} not found (looked in {looked_in})"
        )
    for split in ("train", "val", "test"):
        if data.get(split):
            absent = [str(path) for path in _split_paths(root, data[split]) if not path.exists()]
            if absent:
                raise FileNotFoundError(f"detector data file {file}: {split!r} images not found at {absent}")
    return {**data, "path": str(root)}


@contextlib.contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    previous = os.environ.get("YOLO_OFFLINE")
    if enabled:
        os.environ["YOLO_OFFLINE"] = "1"
    try:
        yield
    finally:
        if enabled:
            if previous is None:
                os.environ.pop("YOLO_OFFLINE", None)
            else:
                os.environ["YOLO_OFFLINE"] = previous


def train_detector(
    data_yaml: str | os.PathLike,
    model: str | os.PathLike = DEFAULT_ARCHITECTURE,
    epochs: int = 50,
    imgsz: int = 640,
    batch: int = 16,
    output_dir: str | os.PathLike = "outputs/detector",
    device: str | None = None,
    workers: int = 2,
    amp: bool | str = False,
    seed: int = 0,
    offline: bool = True,
    **train_args: Any,
) -> Path:
    """Train an ultralytics YOLO detector and return the path of its best weights.

    Args:
        data_yaml: ultralytics detection data file (`path`, `train`, `val`, `names`), checked first.
        model: an architecture `.yaml` (`yolov8n.yaml`, trained from scratch) or a local `.pt` to fine-tune.
        epochs / imgsz / batch: ultralytics' training settings.
        output_dir: the run folder; weights land in `{output_dir}/weights/{best,last}.pt`; an existing run is
            written over.
        device: `"cpu"`, `"0"`, ...; `None` lets ultralytics choose.
        workers: data loader workers.
        amp: ultralytics' `amp`: False (default; no AMP check, so no download), True/"fp16" (runs its check,
            which downloads YOLO weights on CUDA) or "bf16".
        seed: training seed.
        offline: set `YOLO_OFFLINE=1` while training so ultralytics never tries the network.
        train_args: any other `YOLO.train` argument (`lr0`, `mosaic`, `patience`, ...).

    Returns:
        Path to `best.pt`, ready for `YoloRegionExtractor(weights=...)`.
    """
    data = resolve_data_yaml(data_yaml)
    model_path = Path(model).expanduser()
    if model_path.suffix == ".pt" and not model_path.is_file():
        raise FileNotFoundError(
            f"detector model {model_path} does not exist (nothing is downloaded); pass a local .pt, or an architecture "
            f"such as {DEFAULT_ARCHITECTURE!r} to train from scratch"
        )
    if model_path.suffix not in (".pt", ".yaml", ".yml"):
        raise ValueError(f"detector model {model!r}: expected an architecture .yaml or a weights .pt file")
    output_dir = Path(output_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    # The checked file, with its root made absolute, is what ultralytics reads: the run records exactly its data.
    resolved_yaml = output_dir / "data.yaml"
    resolved_yaml.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    with _offline(offline):
        try:
            from ultralytics import YOLO
        except ImportError as error:
            raise ImportError(
                f'training a detector needs ultralytics (AGPL-3.0): pip install "dclip[yolo]" ({error})'
            ) from error
        detector = YOLO(str(model_path) if model_path.is_file() else str(model))
        settings = {
            "data": str(resolved_yaml),
            "epochs": epochs,
            "imgsz": imgsz,
            "batch": batch,
            "workers": workers,
            "amp": amp,
            "seed": seed,
            "plots": False,
            "project": str(output_dir.parent),
            "name": output_dir.name,
            "exist_ok": True,
            "verbose": False,
            **train_args,
        }
        if device is not None:
            settings["device"] = device
        detector.train(**settings)
    best = Path(detector.trainer.best)
    if not best.is_file():
        raise RuntimeError(f"detector training finished without writing {best}")
    return best
