"""`dclip info`: versions, optional backends, and where the embedded towers were found."""

from __future__ import annotations

import argparse
import importlib

# (distribution, import name, what it enables)
_OPTIONAL_BACKENDS = (
    ("ultralytics", "ultralytics", "YOLO regions, `dclip train-detector` (extra: yolo, AGPL-3.0)"),
    ("gradio", "gradio", "the Spaces demo (extra: demo)"),
    ("faiss-cpu", "faiss", "large-gallery search in the demo (extra: demo)"),
    ("tensorboard", "tensorboard", "training metrics (extra: dev)"),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="Show versions, optional backends and the embedded towers.")
    parser.set_defaults(func=run)


def _importable(module: str) -> str:
    try:
        importlib.import_module(module)
    except Exception as error:  # an optional backend may fail in many ways; report, never crash `info`
        return f"not available ({type(error).__name__}: {error})".splitlines()[0]
    return "available"


def run(args: argparse.Namespace) -> int:
    import torch

    from ..environment import distribution_version, recorded_environment
    from ..towers import embedded_text_path, embedded_vision_weights_path

    for key, value in recorded_environment().items():
        print(f"{key}: {value}")
    print(f"torch devices: cpu{', cuda x' + str(torch.cuda.device_count()) if torch.cuda.is_available() else ''}")
    print("optional backends:")
    for distribution, module, purpose in _OPTIONAL_BACKENDS:
        print(f"  {distribution} ({distribution_version(distribution)}): {_importable(module)} - {purpose}")
    print("embedded towers:")
    for label, locate in (
        ("vision EfficientNet-Lite0", embedded_vision_weights_path),
        ("text all-MiniLM-L6-v2", embedded_text_path),
    ):
        try:
            print(f"  {label}: {locate()}")
        except (ImportError, FileNotFoundError) as error:
            print(f"  {label}: MISSING ({error})")
    return 0
