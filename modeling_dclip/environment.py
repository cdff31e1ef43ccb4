"""The environment a result was computed in: Python, the package releases, and the CPU kernels and threads torch
computes with. Every stage record, `dclip run`'s and `dclip eval`'s results and the benchmarks record it, because the
same code and seed train other floating-point results in another environment (other releases or another CPU:
`benchmarks/real_photos/README.md` measured it): a figure can only be reproduced in the environment that made it."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path

# The distributions whose releases can change a result (or that `dclip info` reports).
RECORDED_DISTRIBUTIONS = (
    "dclip",
    "torch",
    "torchvision",
    "transformers",
    "tokenizers",
    "accelerate",
    "datasets",
    "huggingface_hub",
    "safetensors",
    "timm",
    "peft",
    "sentence-transformers",
    "numpy",
    "pillow",
    "onnxruntime",
    "ultralytics",
    "evaluate",
)


def distribution_version(distribution: str) -> str:
    """The installed release of `distribution`, or `"not installed"`."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")


def recorded_environment() -> dict[str, str | int | None]:
    """What a result depends on besides its code and inputs: the Python release, the platform and CPU model, the
    instruction set torch's CPU kernels dispatch to and its thread count (both change the order of floating-point
    sums), the CUDA device if any, and the release of each of `RECORDED_DISTRIBUTIONS`."""
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        **{distribution: distribution_version(distribution) for distribution in RECORDED_DISTRIBUTIONS},
    }
