"""Speed of the synthetic scenes dataset: scene generation and `datasets.Dataset` building, measured apart.

    PYTHONPATH=. python benchmarks/synthetic_speed.py --num-images 1000 --repeats 5

Stages (each the median of `--repeats` runs, as images per second of wall-clock and of this process's CPU
time; CPU time is what a machine shared with other jobs still reports faithfully):
- generate: `generate_scene` for every image (drawing, boxes, captions, hard negatives);
- build (library): `scenes_to_dataset` on already generated scenes (PNG, zlib level 1 with the run-length
  strategy, then `Dataset.from_dict`);
- the alternatives it was chosen over: PNG level 1 with zlib's default strategy; PIL images handed to
  `Dataset.from_dict`, which `datasets` encodes as PNG at Pillow's default level; `Dataset.from_generator`
  writing the same rows to an on-disk cache;
- end to end: `make_synthetic_dataset`.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable

from datasets import Dataset

from modeling_dclip.data.synthetic import (
    SHAPES,
    SceneConfig,
    generate_scene,
    make_synthetic_dataset,
    scene_rng,
    scenes_to_dataset,
    synthetic_features,
)


def _rows(scenes, encode: Callable) -> dict[str, list]:
    return {
        "image": [encode(scene.image) for scene in scenes],
        "captions": [list(scene.captions) for scene in scenes],
        "image_id": [str(index) for index in range(len(scenes))],
        "split": ["train"] * len(scenes),
        "boxes": [[list(obj.box) for obj in scene.objects] for scene in scenes],
        "labels": [[SHAPES.index(obj.shape) for obj in scene.objects] for scene in scenes],
        "label": [scene.label for scene in scenes],
        "hard_negatives": [list(scene.hard_negatives) for scene in scenes],
        "colors": [[obj.color for obj in scene.objects] for scene in scenes],
        "sizes": [[obj.size for obj in scene.objects] for scene in scenes],
        "background": [scene.background for scene in scenes],
    }


PNG_OPTIONS = {
    "level 1, run-length strategy (library)": {"compress_level": 1, "compress_type": zlib.Z_RLE},
    "level 1, default strategy": {"compress_level": 1},
    "Pillow default": {},
}


def _png(image, **options) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return {"bytes": buffer.getvalue(), "path": None}


def _timed(function: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds of `repeats` calls, and the last result."""
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    config = SceneConfig(image_size=args.image_size)
    count = args.num_images

    # Warm the shape-mask cache and imports so that every stage is measured in steady state.
    make_synthetic_dataset(200, seed=99, config=config)
    load_before = os.getloadavg()[0]

    def generate():
        return [generate_scene(scene_rng(0, "train", index), config) for index in range(count)]

    def from_generator():
        with tempfile.TemporaryDirectory() as cache_dir:
            rows = _rows(scenes, lambda image: _png(image, compress_level=1, compress_type=zlib.Z_RLE))
            dataset = Dataset.from_generator(
                lambda: ({name: rows[name][i] for name in rows} for i in range(count)),
                features=synthetic_features(),
                cache_dir=cache_dir,
            )
            return len(dataset)

    results = {}
    results["generate"] = _timed(generate, args.repeats)
    scenes = results["generate"][2]
    image_ids = [str(index) for index in range(count)]
    results["build (library: PNG level 1 run-length, from_dict)"] = _timed(
        lambda: scenes_to_dataset(scenes, image_ids, "train"), args.repeats
    )
    results["build (PNG level 1 default strategy, from_dict)"] = _timed(
        lambda: Dataset.from_dict(
            _rows(scenes, lambda image: _png(image, compress_level=1)), features=synthetic_features()
        ),
        args.repeats,
    )
    results["build (PIL images encoded by datasets, from_dict)"] = _timed(
        lambda: Dataset.from_dict(_rows(scenes, lambda image: image), features=synthetic_features()), args.repeats
    )
    results["build (PNG level 1 run-length, from_generator to disk)"] = _timed(from_generator, args.repeats)
    results["end to end: make_synthetic_dataset"] = _timed(
        lambda: make_synthetic_dataset(count, seed=0, config=config), args.repeats
    )
    sample = scenes[:200]
    sizes = {
        name: sum(len(_png(scene.image, **options)["bytes"]) for scene in sample) / len(sample) / 1024
        for name, options in PNG_OPTIONS.items()
    }

    print(
        f"{count} images of {args.image_size} px, median of {args.repeats} runs; "
        f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
        "mean PNG size: " + ", ".join(f"{name} {kib:.1f} KiB" for name, kib in sizes.items())
    )
    print("| stage | wall s | images/s (wall) | CPU s | images/s (CPU) |")
    print("|---|---|---|---|---|")
    for name, (wall, cpu, _) in results.items():
        print(f"| {name} | {wall:.3f} | {count / wall:.0f} | {cpu:.3f} | {count / cpu:.0f} |")


if __name__ == "__main__":
    main()
