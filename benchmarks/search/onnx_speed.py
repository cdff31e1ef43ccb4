"""ONNX (onnxruntime) against PyTorch on the CPU: the exported image and text encoders of a student, side by side.

One batch of images and one of captions are prepared once; then, for `--rounds` rounds after a warm-up round, each
encoder runs the same batch in PyTorch and in onnxruntime in turn (both with `--threads` threads). Reports the median
time per batch, the ratio ONNX / PyTorch (below 1: ONNX faster), and the largest difference of their embeddings.

    PYTHONPATH=. python benchmarks/search/onnx_speed.py --model STUDENT --images ../shared/data/flickr8k/images \\
        --output benchmarks/search/onnx_speed.json
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from modeling_dclip.atomic import write_json_atomically
from modeling_dclip.loading import load_model_and_processor
from modeling_dclip.onnx_export import ImageEncoder, OnnxEncoders, TextEncoder, export_onnx
from modeling_dclip.processing_dclip import load_image

CAPTIONS = [
    "a dog runs across the grass with a ball in its mouth",
    "two children play in the water at the beach",
    "a man in a red jacket climbs a rock wall",
    "a group of people stand outside a building",
]


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", required=True, help="a folder of photos (the first --image-batch are used)")
    parser.add_argument("--image-batch", type=int, default=16)
    parser.add_argument("--text-batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/search/onnx_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = load_model_and_processor(args.model, device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        export_onnx(model, processor, folder, source=args.model)
        export_s = time.perf_counter() - started
        onnx = OnnxEncoders(folder, threads=args.threads)
        photos = [load_image(path) for path in sorted(Path(args.images).glob("*.jpg"))[: args.image_batch]]
        pixels = processor(images=photos, return_tensors="pt")["pixel_values"].float()
        texts = (CAPTIONS * args.text_batch)[: args.text_batch]
        tokens = processor(text=texts, return_tensors="pt", padding=True)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        image_torch, text_torch = ImageEncoder(model).eval(), TextEncoder(model).eval()
        runs = {
            "image_pytorch": lambda: image_torch(pixels),
            "image_onnx": lambda: onnx.encode_images(pixels.numpy()),
            "text_pytorch": lambda: text_torch(ids, mask),
            "text_onnx": lambda: onnx.encode_texts(ids.numpy(), mask.numpy()),
        }
        times = {name: [] for name in runs}
        with torch.no_grad():
            for round_ in range(args.rounds + 1):
                for name, run in runs.items():
                    elapsed = timed(run)
                    if round_:  # round 0 warms up
                        times[name].append(elapsed)
            image_diff = float(np.abs(runs["image_onnx"]() - runs["image_pytorch"]().numpy()).max())
            text_diff = float(np.abs(runs["text_onnx"]() - runs["text_pytorch"]().numpy()).max())
    medians = {name: round(statistics.median(values), 2) for name, values in times.items()}
    results = {
        "command": "PYTHONPATH=. python " + shlex.join(sys.argv),
        "model": args.model,
        "image_batch": [args.image_batch, *pixels.shape[1:]],
        "text_batch": list(ids.shape),
        "threads": args.threads,
        "rounds": args.rounds,
        "median_ms": medians,
        "ratio_onnx_over_pytorch": {
            "image": round(medians["image_onnx"] / medians["image_pytorch"], 3),
            "text": round(medians["text_onnx"] / medians["text_pytorch"], 3),
        },
        "max_abs_diff": {"image": image_diff, "text": text_diff},
        "export_s": round(export_s, 1),
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "machine": f"{platform.machine()}, 2 CPU cores shared with other jobs",
    }
    write_json_atomically(args.output, results)
    print(results["median_ms"], results["ratio_onnx_over_pytorch"], results["max_abs_diff"])


if __name__ == "__main__":
    main()
