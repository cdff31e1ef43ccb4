"""A student epoch with cached teacher targets vs. the same epoch running the teacher every step (issue 4, item 5a).

Both modes train the same student (the embedded default, frozen as in `dclip run`'s default preset) with the DCLIP
hybrid loss on the same batches of synthetic scenes, in one process:

- cached (what `distill_student` does): the teacher's targets of every (image, caption) pair are computed once before
  training (`region_features` -> `text_features` -> `teacher_targets`, the frozen base reading every region crop once);
  a step then looks its batch's targets up;
- live: every step crops and preprocesses its images' regions, runs the frozen base over the crops and the captions'
  tokens, and fuses them with the teacher, then takes the same student step.

The student-side work (preprocessing, forward, backward, optimizer) is identical in both. Epochs alternate
(cached, live, live, cached, ...) so that neither mode always runs first or while the machine is busier. Reported:
median epoch time of each mode, their ratio, the one-off cost of building the cache, and after how many epochs the
cache has paid for itself. Regions are the scenes' own boxes, as in `dclip run`.

Run from the repository root (about two minutes on 2 CPU cores):

    python benchmarks/student_target_cache.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from modeling_dclip import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.data.synthetic import make_synthetic_dataset
from modeling_dclip.losses import DCLIP_HYBRID, LossRecipe
from modeling_dclip.training.align import set_image_size
from modeling_dclip.training.batching import PairBatches
from modeling_dclip.training.data import CaptionTable, pixel_values_of, tokenize
from modeling_dclip.training.distill import DistillStep
from modeling_dclip.training.features import region_features, teacher_targets, text_features
from modeling_dclip.training.freezing import freeze_by_patterns
from modeling_dclip.training.pipeline import PRESETS

HERE = Path(__file__).resolve().parent


def build(image_size: int) -> tuple[DCLIPModel, DCLIPTeacherModel, DCLIPProcessor]:
    """The embedded-default student and a teacher over a copy of it, shaped as `dclip run`'s default preset."""
    torch.manual_seed(0)
    student = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT, projection_dim=256)
    processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    set_image_size(processor, image_size)
    shape = {k: PRESETS["default"]["teacher"][k] for k in ("fusion_dim", "num_attention_heads", "intermediate_size")}
    teacher = DCLIPTeacherModel.from_backbone(student, **shape).eval()
    freeze_by_patterns(student, PRESETS["default"]["distill"]["freeze_patterns"])
    return student, teacher, processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="synthetic training scenes (one epoch = images / batch)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="epochs of each mode (alternating)")
    parser.add_argument("--output", default=str(HERE / "student_target_cache.json"))
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    dataset = make_synthetic_dataset(args.images, seed=0, split="train", image_size=args.image_size)
    table = CaptionTable.from_dataset(dataset)
    student, teacher, processor = build(args.image_size)
    batches = PairBatches(table.counts, args.batch_size, seed=0)
    recipe = LossRecipe(dict(DCLIP_HYBRID))

    start = time.perf_counter()
    regions = region_features(teacher, processor, dataset, use_dataset_boxes=True)
    texts = text_features(teacher, processor, table.captions)
    targets = teacher_targets(teacher, regions, texts, table.caption_to_image)
    cache_build_s = time.perf_counter() - start

    def student_batch(pairs: list[tuple[int, int]]) -> tuple[list[int], list[int], dict[str, torch.Tensor]]:
        rows, captions = [row for row, _ in pairs], [caption for _, caption in pairs]
        batch = tokenize(processor, [table.captions[c] for c in captions])
        batch["pixel_values"] = pixel_values_of(processor, dataset, rows)
        return rows, captions, batch

    def cached_targets(rows: list[int], captions: list[int]) -> dict[str, torch.Tensor]:
        return {name: tensor[captions] for name, tensor in targets.items()}

    @torch.no_grad()
    def live_targets(rows: list[int], captions: list[int]) -> dict[str, torch.Tensor]:
        images = dataset.select_columns(["image"])[rows]["image"]
        boxes = dataset.select_columns(["boxes"])[rows]["boxes"]
        inputs = processor(images=images, text=[table.captions[c] for c in captions], boxes=boxes, return_tensors="pt")
        output = teacher(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            region_pixel_values=inputs["region_pixel_values"],
            region_boxes=inputs["region_boxes"],
            region_scores=inputs["region_scores"],
            region_mask=inputs["region_mask"],
        )
        return {"teacher_image_embeds": output.image_embeds, "teacher_text_embeds": output.text_embeds}

    modes = {"cached": cached_targets, "live": live_targets}
    steps = {name: DistillStep(copy.deepcopy(student), recipe, logit_scale=20.0).train() for name in modes}
    optimizers = {
        name: torch.optim.AdamW([p for p in steps[name].parameters() if p.requires_grad], lr=5e-5) for name in modes
    }

    # Same targets either way: the cache holds exactly what the teacher computes live.
    rows, captions, _ = student_batch(batches.epoch(0)[0])
    live, stored = live_targets(rows, captions), cached_targets(rows, captions)
    max_target_difference = max((live[k] - stored[k]).abs().max().item() for k in live)

    def run_epoch(name: str, epoch: int) -> dict[str, float]:
        target_s, start = 0.0, time.perf_counter()
        for pairs in batches.epoch(epoch):
            rows, captions, batch = student_batch(pairs)
            tick = time.perf_counter()
            batch.update(modes[name](rows, captions))
            target_s += time.perf_counter() - tick
            loss = steps[name](batch)["loss"]
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return {"epoch_s": time.perf_counter() - start, "targets_s": target_s}

    order = [("cached", "live"), ("live", "cached")]
    epochs: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    for repeat in range(args.repeats):
        for name in order[repeat % 2]:
            epochs[name].append(run_epoch(name, repeat))

    median = {name: statistics.median(e["epoch_s"] for e in runs) for name, runs in epochs.items()}
    saved_per_epoch = median["live"] - median["cached"]
    result = {
        "images": args.images,
        "captions": len(table.captions),
        "batch_size": args.batch_size,
        "steps_per_epoch": batches.batches_per_epoch,
        "image_size": args.image_size,
        "regions_per_image_mean": regions["region_mask"].sum(1).float().mean().item(),
        "cache_build_s": cache_build_s,
        "epochs": epochs,
        "median_epoch_s": median,
        "ratio_live_over_cached": median["live"] / median["cached"],
        "break_even_epochs": cache_build_s / saved_per_epoch if saved_per_epoch > 0 else None,
        "max_abs_target_difference": max_target_difference,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "torch": torch.__version__,
        },
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result[k]
                for k in (
                    "median_epoch_s",
                    "ratio_live_over_cached",
                    "cache_build_s",
                    "break_even_epochs",
                    "max_abs_target_difference",
                )
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
