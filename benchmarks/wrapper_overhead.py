"""Throughput cost of the `DCLIPModel` wrapper over running its two towers directly.

Compares, on the same pre-made batches and in the same process, the embedded-default student
(`DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)`, through `get_image_features` /
`get_text_features`) with the plain implementation a user would write by hand:

- images: timm `efficientnet_lite0` (`forward_features`) + global average pool + the student's projection matrix;
- texts: transformers `BertModel` + attention-masked mean pooling + the student's projection matrix.

Both sides hold identical weights (copied from the student). Pixel tensors and token ids are made once by
`DCLIPProcessor` before timing, so preprocessing is excluded. The two implementations run interleaved, one batch
each per repeat, and the order alternates (AB, BA, AB, ...) so that neither always runs first on a warm cache or
while another process is busy. Reported: median throughput of each, the ratio wrapper / direct (both the ratio of
medians and the median of per-repeat ratios), and the largest absolute difference between their embeddings.

Because wall-clock throughput on a shared machine is noisy, two noise-free checks back the ratio: the ATen operators
each side dispatches (counted with `torch.profiler`; an equal list means the wrapper adds no tensor work), and the
wrapper's fixed Python cost per call, timed on a 1-item input where compute is small (median paired difference),
then expressed as a fraction of the full-batch time.

Run from the repository root:

    python benchmarks/wrapper_overhead.py --data-dir ../shared/data/flickr8k-1k
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch.profiler import ProfilerActivity, profile
from transformers import BertModel

from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor
from modeling_dclip.towers import embedded_text_path

TARGET_RATIO = 0.95
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k-1k"


def load_flickr_batch(data_dir: Path, num_images: int, num_texts: int) -> tuple[list[Image.Image], list[str]]:
    """The first `num_images` Flickr8k images and the first `num_texts` captions, in file order."""
    annotations_path = data_dir / "dataset_flickr8k_1k.json"
    if not annotations_path.is_file():
        raise FileNotFoundError(f"{annotations_path}: Flickr8k-1k annotations not found (pass --data-dir)")
    entries = json.loads(annotations_path.read_text())["images"]
    captions = [sentence["raw"] for entry in entries for sentence in entry["sentences"]]
    if len(entries) < num_images or len(captions) < num_texts:
        raise ValueError(
            f"{annotations_path}: has {len(entries)} images / {len(captions)} captions, "
            f"fewer than the {num_images} / {num_texts} asked for"
        )
    images = []
    for entry in entries[:num_images]:
        with Image.open(data_dir / "images" / entry["filename"]) as image:
            images.append(image.convert("RGB"))
    return images, captions[:num_texts]


class DirectImageEncoder(torch.nn.Module):
    """timm EfficientNet-Lite0 features, global average pool, projection: `[B, 3, H, W] -> [B, P]`."""

    def __init__(self, student: DCLIPModel):
        super().__init__()
        self.backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
        self.backbone.load_state_dict(student.vision_model.timm_model.state_dict())
        self.projection = student.visual_projection.weight.detach().clone()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.backbone.forward_features(pixel_values).mean(dim=(2, 3))
        return F.linear(pooled, self.projection)


class DirectTextEncoder(torch.nn.Module):
    """transformers `BertModel`, attention-masked mean pooling, projection: `[B, T] -> [B, P]`."""

    def __init__(self, student: DCLIPModel):
        super().__init__()
        # Loaded the ordinary way (`from_pretrained`, default attention implementation), then given the student's
        # weights, so that any difference in speed comes from the wrapper and not from the loading path.
        self.encoder = BertModel.from_pretrained(embedded_text_path())
        self.encoder.load_state_dict(student.text_model.state_dict())
        self.projection = student.text_projection.weight.detach().clone()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(states.dtype)
        pooled = (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-6)
        return F.linear(pooled, self.projection)


def seconds(run: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall_start, time.process_time() - cpu_start


def interleaved_timings(
    wrapper: Callable[[], torch.Tensor], direct: Callable[[], torch.Tensor], warmup: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per call of each implementation over `repeats` pairs, the order alternating."""
    for _ in range(warmup):
        wrapper()
        direct()
    timings = {"wall": {"wrapper": [], "direct": []}, "cpu": {"wrapper": [], "direct": []}}
    for repeat in range(repeats):
        order = [("wrapper", wrapper), ("direct", direct)]
        for name, run in order if repeat % 2 == 0 else reversed(order):
            wall, cpu = seconds(run)
            timings["wall"][name].append(wall)
            timings["cpu"][name].append(cpu)
    return timings


def summarise(timings: dict[str, dict[str, list[float]]], batch_size: int) -> dict:
    """Throughput (items per wall-clock second) of each side and their ratio; CPU seconds as a cross-check."""
    wrapper_rates = [batch_size / s for s in timings["wall"]["wrapper"]]
    direct_rates = [batch_size / s for s in timings["wall"]["direct"]]
    wrapper_median = statistics.median(wrapper_rates)
    direct_median = statistics.median(direct_rates)
    cpu = timings["cpu"]
    return {
        "batch_size": batch_size,
        "wall_seconds_per_batch": timings["wall"],
        "cpu_seconds_per_batch": cpu,
        "wrapper_per_s_median": wrapper_median,
        "direct_per_s_median": direct_median,
        "ratio_of_medians": wrapper_median / direct_median,
        "median_of_paired_ratios": statistics.median(w / d for w, d in zip(wrapper_rates, direct_rates)),
        "ratio_of_best": max(wrapper_rates) / max(direct_rates),
        "cpu_ratio_of_medians": statistics.median(cpu["direct"]) / statistics.median(cpu["wrapper"]),
    }


def aten_op_counts(run: Callable[[], torch.Tensor]) -> Counter:
    """How many times each ATen operator is dispatched by one call."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        run()
    return Counter({e.key: e.count for e in profiler.key_averages() if e.key.startswith("aten::")})


def op_count_differences(wrapper: Callable[[], torch.Tensor], direct: Callable[[], torch.Tensor]) -> dict:
    """Operators dispatched a different number of times by the two sides: `{op: [wrapper, direct]}`."""
    wrapper_counts, direct_counts = aten_op_counts(wrapper), aten_op_counts(direct)
    return {
        op: [wrapper_counts[op], direct_counts[op]]
        for op in sorted(wrapper_counts.keys() | direct_counts.keys())
        if wrapper_counts[op] != direct_counts[op]
    } | {"total_ops": [sum(wrapper_counts.values()), sum(direct_counts.values())]}


def fixed_overhead(
    wrapper: Callable[[], torch.Tensor], direct: Callable[[], torch.Tensor], repeats: int, full_batch_seconds: float
) -> dict:
    """The wrapper's per-call extra seconds on a small input (median of paired differences), and that extra as a
    fraction of one full batch."""
    # One thread: on a busy machine every multi-threaded operator waits for its second thread to be scheduled,
    # which swamps a small call; the wrapper's Python cost does not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = interleaved_timings(wrapper, direct, warmup=max(1, repeats // 10), repeats=repeats)["wall"]
    finally:
        torch.set_num_threads(threads)
    extra = statistics.median(w - d for w, d in zip(timings["wrapper"], timings["direct"]))
    return {
        "pairs": repeats,
        "wrapper_call_us_median": statistics.median(timings["wrapper"]) * 1e6,
        "direct_call_us_median": statistics.median(timings["direct"]) * 1e6,
        "extra_us_per_call": extra * 1e6,
        "extra_fraction_of_full_batch": extra / full_batch_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Flickr8k-1k folder")
    parser.add_argument("--num-images", type=int, default=32, help="images per batch")
    parser.add_argument("--num-texts", type=int, default=128, help="captions per batch")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pairs before measuring")
    parser.add_argument("--image-repeats", type=int, default=8, help="timed pairs of image batches")
    parser.add_argument("--text-repeats", type=int, default=10, help="timed pairs of text batches")
    parser.add_argument("--overhead-repeats", type=int, default=200, help="timed pairs of 1-item calls")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_suffix(".json"), help="raw numbers")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    images, captions = load_flickr_batch(args.data_dir, args.num_images, args.num_texts)
    processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor(text=captions, return_tensors="pt")
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    # One image cropped to 64x64 and one caption: the towers still run every module, but compute is small, so
    # the wrapper's fixed Python cost is a visible share of the call (timed on one thread, see `fixed_overhead`).
    small_pixels = pixel_values[:1, :, :64, :64].contiguous()
    small_ids, small_mask = input_ids[:1], attention_mask[:1]

    student = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT, projection_dim=256).eval()
    direct_images = DirectImageEncoder(student).eval()
    direct_texts = DirectTextEncoder(student).eval()

    def wrapper_images(pixels: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: student.get_image_features(pixel_values=pixels).pooler_output

    def direct_images_on(pixels: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: direct_images(pixels)

    def wrapper_texts(ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: student.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

    def direct_texts_on(ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
        return lambda: direct_texts(ids, mask)

    load_before = os.getloadavg()
    with torch.inference_mode():
        image_runs = wrapper_images(pixel_values), direct_images_on(pixel_values)
        text_runs = wrapper_texts(input_ids, attention_mask), direct_texts_on(input_ids, attention_mask)
        image_diff = (image_runs[0]() - image_runs[1]()).abs().max().item()
        text_diff = (text_runs[0]() - text_runs[1]()).abs().max().item()
        images_result = summarise(interleaved_timings(*image_runs, args.warmup, args.image_repeats), args.num_images)
        texts_result = summarise(interleaved_timings(*text_runs, args.warmup, args.text_repeats), args.num_texts)

        small_image_runs = wrapper_images(small_pixels), direct_images_on(small_pixels)
        small_text_runs = wrapper_texts(small_ids, small_mask), direct_texts_on(small_ids, small_mask)
        images_result["op_count_differences"] = op_count_differences(*small_image_runs)
        texts_result["op_count_differences"] = op_count_differences(*small_text_runs)
        images_result["fixed_overhead"] = fixed_overhead(
            *small_image_runs, args.overhead_repeats, args.num_images / images_result["wrapper_per_s_median"]
        )
        texts_result["fixed_overhead"] = fixed_overhead(
            *small_text_runs, args.overhead_repeats, args.num_texts / texts_result["wrapper_per_s_median"]
        )
    load_after = os.getloadavg()

    results = {
        "images": {**images_result, "max_abs_embedding_diff": image_diff},
        "texts": {
            **texts_result,
            "max_abs_embedding_diff": text_diff,
            "sequence_length": int(input_ids.shape[1]),
            "mean_real_tokens": attention_mask.sum(dim=1).float().mean().item(),
        },
        "target_ratio": TARGET_RATIO,
        "setup": {
            "pixel_values_shape": list(pixel_values.shape),
            "input_ids_shape": list(input_ids.shape),
            "small_inputs_shapes": [list(small_pixels.shape), list(small_ids.shape)],
            "threads": torch.get_num_threads(),
            "warmup_pairs": args.warmup,
            "wrapper_text_attention": student.text_model.config._attn_implementation,
            "direct_text_attention": direct_texts.encoder.config._attn_implementation,
            "preprocessing": "excluded (tensors made once by DCLIPProcessor before timing)",
            "mode": "eval() + torch.inference_mode()",
        },
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "timm": timm.__version__,
            "loadavg_1min_before_after": [load_before[0], load_after[0]],
        },
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    print(
        f"{'':8}{'wrapper/s':>11}{'direct/s':>10}{'ratio':>7}{'paired':>7}{'cpu':>7}{'max|diff|':>10}"
        f"{'extra us/call':>15}{'of batch':>10}"
    )
    for modality in ("images", "texts"):
        row = results[modality]
        overhead = row["fixed_overhead"]
        print(
            f"{modality:8}{row['wrapper_per_s_median']:11.2f}{row['direct_per_s_median']:10.2f}"
            f"{row['ratio_of_medians']:7.3f}{row['median_of_paired_ratios']:7.3f}{row['cpu_ratio_of_medians']:7.3f}"
            f"{row['max_abs_embedding_diff']:10.1e}{overhead['extra_us_per_call']:15.1f}"
            f"{overhead['extra_fraction_of_full_batch']:10.2e}"
        )
        print(f"{'':8}ATen ops differing (wrapper, direct): {row['op_count_differences']}")
    print(
        f"target ratio >= {TARGET_RATIO}; 1-min load average {load_before[0]:.1f} -> {load_after[0]:.1f}; "
        f"raw numbers in {args.output}"
    )


if __name__ == "__main__":
    main()
