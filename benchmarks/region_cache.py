"""Region cache: a first pass over a dataset against the cached second pass, and resident memory over a long run.

    PYTHONPATH=. python benchmarks/region_cache.py --num-images 3000 --image-size 128 --repeats 3 \
        --output benchmarks/region_cache.json

Measured (synthetic scenes, generated once before any timing; every first pass gets an empty cache folder):
- `add_region_boxes` with the 2x2 grid, an untrained YOLOv8n built offline from ultralytics' yaml (one class
  biased so that every image gets `max_regions - 1` detections, as a trained detector on busy images would), and
  the dataset's own boxes: first-pass time (median of `--repeats`), cached second-pass time (median of 5), ratio;
- resident memory (VmRSS) after every batch of the first grid and YOLO passes: at 10 % of the images, at the
  end, the peak, and the least-squares slope over the second half (MB per 1,000 images);
- a control that keeps every ultralytics `Results` object (as code that collects `model.predict(...)` output
  does), to show that the probe sees growth where there is some;
- a second process that rebuilds the same dataset and asks for the same YOLO regions: whether the cache answered;
- `region_embeddings` with a tiny random teacher (32 px CLIP towers) over the grid regions of the first
  `--embed-images` images: first pass against the cached read.
Times are wall-clock seconds, with this process's CPU seconds beside them (a shared machine inflates wall time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from modeling_dclip.data.region_cache import DatasetBoxes, add_region_boxes, region_embeddings
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.regions import GridRegionExtractor, YoloRegionExtractor, to_rgb

SECOND_PASS_REPEATS = 5
BIASED_CLASS = 7


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssProbe:
    """Records (images done, RSS in MB) after every batch an extractor handles; subclasses keep the extractor's
    type and settings, so the cache key is the plain extractor's."""

    def _extract(self, images):
        found = super()._extract(images)
        self.trace = getattr(self, "trace", [])
        done = (self.trace[-1][0] if self.trace else 0) + len(images)
        self.trace.append((done, rss_mb()))
        return found


class ProbedGrid(RssProbe, GridRegionExtractor):
    pass


class ProbedYolo(RssProbe, YoloRegionExtractor):
    pass


def summarise_trace(trace: list[tuple[int, float]]) -> dict[str, float]:
    images = np.array([done for done, _ in trace], dtype=np.float64)
    rss = np.array([value for _, value in trace])
    tenth = int(np.searchsorted(images, images[-1] * 0.1))
    half = len(images) // 2
    slope = np.polyfit(images[half:], rss[half:], 1)[0] * 1000 if len(images) - half >= 2 else float("nan")
    return {
        "images": int(images[-1]),
        "batches": len(trace),
        "rss_mb_first_batch": round(float(rss[0]), 1),
        "rss_mb_at_10_percent": round(float(rss[tenth]), 1),
        "rss_mb_end": round(float(rss[-1]), 1),
        "rss_mb_peak": round(float(rss.max()), 1),
        "growth_mb_10_percent_to_end": round(float(rss[-1] - rss[tenth]), 1),
        "slope_mb_per_1000_images_second_half": round(float(slope), 2),
    }


def timed(action) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = action()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def build_yolo(path: Path) -> Path:
    import ultralytics

    torch.manual_seed(0)
    model = ultralytics.YOLO("yolov8n.yaml")
    # The untrained head scores every class about 1e-4; one raised bias gives confident boxes everywhere.
    for class_branch in model.model.model[-1].cv3:
        class_branch[-1].bias.data[BIASED_CLASS] = 5.0
    model.save(path)
    return path


def measure_source(name, make_probed, make_plain, dataset, repeats: int, work: Path, batch_size: int) -> dict:
    first_walls, first_cpus, trace = [], [], None
    for repeat in range(repeats):
        cache_dir = work / f"{name}-{repeat}"
        source = make_probed()
        wall, cpu, _ = timed(
            lambda source=source, cache_dir=cache_dir: add_region_boxes(
                dataset, source, cache_dir=cache_dir, batch_size=batch_size
            )
        )
        first_walls.append(wall)
        first_cpus.append(cpu)
        if repeat == 0 and hasattr(source, "trace"):
            trace = source.trace
        print(f"{name}: first pass {repeat + 1}/{repeats}: {wall:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    second_walls, second_cpus = [], []
    for _ in range(SECOND_PASS_REPEATS):
        plain = make_plain()
        wall, cpu, cached = timed(
            lambda plain=plain, name=name: add_region_boxes(
                dataset, plain, cache_dir=work / f"{name}-0", batch_size=batch_size
            )
        )
        assert getattr(plain, "_model", None) is None, "the second pass ran the detector"
        second_walls.append(wall)
        second_cpus.append(cpu)
    result = {
        "first_pass_s": [round(value, 3) for value in first_walls],
        "first_pass_cpu_s": [round(value, 3) for value in first_cpus],
        "second_pass_s": [round(value, 4) for value in second_walls],
        "second_pass_cpu_s": [round(value, 4) for value in second_cpus],
        "first_pass_median_s": round(statistics.median(first_walls), 3),
        "second_pass_median_s": round(statistics.median(second_walls), 4),
        "second_over_first": round(statistics.median(second_walls) / statistics.median(first_walls), 5),
        "images_per_s_first_pass": round(len(dataset) / statistics.median(first_walls), 1),
        "regions_per_image_mean": round(float(np.mean([len(boxes) for boxes in cached["region_boxes"]])), 2),
    }
    if trace is not None:
        result["memory"] = summarise_trace(trace)
        result["memory_trace"] = [(done, round(value, 1)) for done, value in trace[:: max(1, len(trace) // 50)]]
    print(f"{name}: {json.dumps({k: v for k, v in result.items() if k != 'memory_trace'})}", flush=True)
    return result


def keep_results_control(dataset, weights: Path, batch_size: int) -> dict:
    """The growth the library avoids: keeping ultralytics' Results (each holds its decoded image and tensors)."""
    import ultralytics

    model = ultralytics.YOLO(str(weights))
    kept, trace = [], []
    images = dataset.select_columns(["image"])
    for start in range(0, len(images), batch_size):
        chunk = [to_rgb(image) for image in images[start : start + batch_size]["image"]]
        kept.extend(model.predict(chunk, imgsz=128, max_det=9, stream=True, verbose=False))
        trace.append((start + len(chunk), rss_mb()))
    return summarise_trace(trace)


CROSS_PROCESS = """
import json, sys, time
from modeling_dclip.data.region_cache import add_region_boxes
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.regions import YoloRegionExtractor
dataset = make_synthetic_dataset({n}, seed=0, split="train", image_size={size})
extractor = YoloRegionExtractor({weights!r}, **{settings!r})
start = time.perf_counter()
with_regions = add_region_boxes(dataset, extractor, cache_dir={cache_dir!r}, batch_size={batch})
print(json.dumps({{"seconds": time.perf_counter() - start, "detector_loaded": extractor._model is not None,
                  "rows": len(with_regions)}}))
"""


def tiny_teacher():
    from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig

    from modeling_dclip import EMBEDDED_TEXT, DCLIPConfig, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
    from modeling_dclip.towers import load_tokenizer

    torch.manual_seed(0)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = CLIPVisionConfig(**tower, image_size=32, patch_size=8)
    text = CLIPTextConfig(
        **tower, vocab_size=30522, max_position_embeddings=64, bos_token_id=101, eos_token_id=102, pad_token_id=0
    )
    base = DCLIPModel(
        DCLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), projection_dim=32, text_pooling="mean")
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = DCLIPProcessor(image_processor=image_processor, tokenizer=load_tokenizer(EMBEDDED_TEXT))
    return DCLIPTeacherModel.from_backbone(base), processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="map batch size")
    parser.add_argument("--embed-images", type=int, default=1000)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    os.environ["YOLO_OFFLINE"] = "1"
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="region-cache-bench-"))
    wall, _, dataset = timed(
        lambda: make_synthetic_dataset(args.num_images, seed=0, split="train", image_size=args.image_size)
    )
    print(f"generated {len(dataset)} scenes in {wall:.1f} s; RSS {rss_mb():.0f} MB", flush=True)
    weights = build_yolo(work / "untrained-yolov8n.pt")
    yolo_settings = dict(conf=0.25, max_regions=10, imgsz=args.image_size, batch_size=16)

    results = {
        "command": " ".join(["python", *sys.argv]),
        "settings": {**vars(args), "output": str(args.output), "yolo": yolo_settings, "grid": {"scales": [2]}},
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "rss_mb_after_generating_dataset": round(rss_mb(), 1),
    }
    results["grid"] = measure_source(
        "grid",
        lambda: ProbedGrid(scales=(2,)),
        lambda: GridRegionExtractor(scales=(2,)),
        dataset,
        args.repeats,
        work,
        args.batch_size,
    )
    results["dataset_boxes"] = measure_source(
        "dataset_boxes", DatasetBoxes, DatasetBoxes, dataset, args.repeats, work, args.batch_size
    )
    results["yolo"] = measure_source(
        "yolo",
        lambda: ProbedYolo(weights, **yolo_settings),
        lambda: YoloRegionExtractor(weights, **yolo_settings),
        dataset,
        args.repeats,
        work,
        args.batch_size,
    )
    results["yolo_keep_results_control"] = keep_results_control(dataset, weights, yolo_settings["batch_size"])
    print(f"control: {results['yolo_keep_results_control']}", flush=True)

    script = CROSS_PROCESS.format(
        n=args.num_images,
        size=args.image_size,
        weights=str(weights),
        settings=yolo_settings,
        cache_dir=str(work / "yolo-0"),
        batch=args.batch_size,
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    results["yolo_second_pass_new_process"] = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"new process: {results['yolo_second_pass_new_process']}", flush=True)

    teacher, processor = tiny_teacher()
    with_regions = add_region_boxes(
        dataset.select(range(args.embed_images)), GridRegionExtractor(scales=(2,)), cache_dir=work / "embed"
    )
    first_wall, first_cpu, features = timed(
        lambda: region_embeddings(teacher, processor, with_regions, cache_dir=work / "embed")
    )
    cached_walls = [
        timed(lambda: region_embeddings(teacher, processor, with_regions, cache_dir=work / "embed"))[0]
        for _ in range(SECOND_PASS_REPEATS)
    ]
    results["region_embeddings_tiny_teacher"] = {
        "images": args.embed_images,
        "shape": list(features["region_embeds"].shape),
        "first_pass_s": round(first_wall, 3),
        "first_pass_cpu_s": round(first_cpu, 3),
        "cached_s": [round(value, 4) for value in cached_walls],
        "cached_median_s": round(statistics.median(cached_walls), 4),
        "cached_over_first": round(statistics.median(cached_walls) / first_wall, 5),
    }
    print(f"embeddings: {results['region_embeddings_tiny_teacher']}", flush=True)
    results["load_average_1_5_15_min"] = {
        "start": [round(value, 2) for value in load_start],
        "end": [round(value, 2) for value in os.getloadavg()],
    }
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
