"""One table for the training recipes: base, DCLIP, ConaCLIP, DCLIP + ConaCLIP, Knowledge-CLIP and the two-stage
compressed student, on the same data with the same budget, over several seeds (mean ± std).

    PYTHONPATH=. python benchmarks/recipes/run_comparison.py --output-dir /tmp/recipes --size small --seeds 0 1 2
    # real photos instead of the synthetic scenes, and CIFAR-10 zero-shot retention:
    PYTHONPATH=. python benchmarks/recipes/run_comparison.py --output-dir /tmp/recipes_flickr \\
        --data flickr8k-1k --cifar10 ../shared/data/cifar10-test --cifar10-images 1000

Per seed, `modeling_dclip.training.pipeline.run_pipeline` makes the data, the base, the DCLIP teacher and the DCLIP
student; every other recipe then trains `distill_student` from its config in `trainers/configs/` with the paths and
the preset's student budget (epochs, batch size, learning rate, warmup; best epoch on `val`) put in, so only the loss,
the targets and the config's freezing differ:

- ConaCLIP: the frozen base as teacher (`conaclip.yaml`); DCLIP + ConaCLIP: the DCLIP teacher (`dclip_conaclip.yaml`);
- Knowledge-CLIP: all-MiniLM-L6-v2 as text teacher (`knowledge_clip.yaml`);
- two-stage compression: the base is compressed (every other text layer, MobileNetV2 for EfficientNet-Lite0) and
  distilled from the base in stage 1, then fine-tuned contrastively in stage 2, each stage with the full budget.

Every model is evaluated on the held-out `test` split; parameters and encoding speed (images/s, texts/s over the
test set, batch 64, this process's threads) are measured per model. `results.json` and `results.md` go to the
output folder with the command and the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import torch

from modeling_dclip import DCLIPModel, DCLIPProcessor
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.evaluation import evaluate_model
from modeling_dclip.evaluation.model_eval import caption_pairs, encode_images, encode_texts
from modeling_dclip.recipes import parameter_counts
from modeling_dclip.training import DistillConfig, distill_student, load_stage_config
from modeling_dclip.training.checkpointing import is_complete, write_json_atomically
from modeling_dclip.training.evaluation import evaluate_dual_encoder
from modeling_dclip.training.pipeline import load_preset, run_pipeline

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "trainers" / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"distill": {"learning_rate": 1e-4}},
    # Meant for a shared 2-core CPU; its wall time has not been measured yet.
    "small": {
        "pretrain_images": 160, "train_images": 160, "val_images": 32, "test_images": 64,
        "align": {"num_epochs": 10, "batch_size": 32},
        "teacher": {"num_epochs": 5, "batch_size": 32},
        "distill": {"num_epochs": 3, "batch_size": 32, "learning_rate": 1e-4, "warmup_steps": 2},
    },
}  # fmt: skip
"""Overrides of the pipeline's `tiny` preset."""

BUDGET_FIELDS = ("num_epochs", "batch_size", "learning_rate", "warmup_steps")
"""The student budget every recipe gets from the preset, whatever its config says."""

MODELS = ("base", "DCLIP", "ConaCLIP", "DCLIP+ConaCLIP", "Knowledge-CLIP", "two-stage compressed")
METRICS = ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5")


def train_recipes(run: Path, preset, splits) -> dict[str, Path]:
    """Train every recipe other than DCLIP on this seed's base / teacher; returns model name -> folder."""
    budget = {name: value for name, value in preset.distill.items() if name in BUDGET_FIELDS}
    common = {"seed": preset.seed, "image_size": preset.image_size, "eval_split": "", **budget}
    base, teacher = str(run / "base"), str(run / "teacher")
    use_boxes = preset.use_dataset_boxes and "boxes" in splits["train"].column_names
    jobs = {
        "ConaCLIP": ("conaclip", {"base_model": base, "teacher_model": base}),
        "DCLIP+ConaCLIP": ("dclip_conaclip", {"base_model": base, "teacher_model": teacher, "use_dataset_boxes": use_boxes}),
        "Knowledge-CLIP": ("knowledge_clip", {"base_model": base}),
        "compression stage 1": ("compression_stage1", {"base_model": base, "teacher_model": base}),
        "two-stage compressed": ("compression_stage2", {"base_model": str(run / "recipes" / "compression_stage1")}),
    }
    folders = {"base": run / "base", "DCLIP": run / "student"}
    for name, (config_name, paths) in jobs.items():
        out = run / "recipes" / config_name
        if not is_complete(out):
            config = load_stage_config(
                DistillConfig, CONFIGS / f"{config_name}.yaml",
                **{**common, **paths, "output_dir": str(out), "work_dir": str(run / "work" / config_name)},
            )  # fmt: skip
            start = time.perf_counter()
            distill_student(config, splits["train"], splits["val"] if "val" in splits else None)
            print(f"[recipes] {run.name} {name}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        folders[name] = out
    del folders["compression stage 1"]
    return folders


def encode_speed(model, processor, test) -> dict[str, float]:
    """Images and texts encoded per second over the test split (after one warm-up batch)."""
    captions = caption_pairs(test).captions
    encode_images(model, processor, test.select(range(min(8, len(test)))))
    start = time.perf_counter()
    encode_images(model, processor, test)
    images_per_s = len(test) / (time.perf_counter() - start)
    start = time.perf_counter()
    encode_texts(model, processor, captions)
    return {"images_per_s": images_per_s, "texts_per_s": len(captions) / (time.perf_counter() - start)}


def measure(folder: Path, test, cifar10) -> dict[str, float]:
    model, processor = DCLIPModel.from_pretrained(folder).eval(), DCLIPProcessor.from_pretrained(folder)
    result = {name: value for name, value in evaluate_dual_encoder(model, processor, test).items() if name in METRICS}
    if cifar10 is not None:
        result["cifar10_zeroshot_top1"] = evaluate_model(model, processor, cifar10, ["zeroshot"], templates="cifar10")["zeroshot_top1"]
    return {**result, **encode_speed(model, processor, test), "parameters_M": parameter_counts(model)["total"] / 1e6}


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> measure -> {mean, std} over seeds (std 0 with one seed)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        runs = [per_seed[seed][model] for seed in per_seed]
        summary[model] = {
            key: {"mean": statistics.fmean(run[key] for run in runs),
                  "std": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0}
            for key in runs[0]
        }  # fmt: skip
    return summary


def markdown(results: dict[str, Any]) -> str:
    summary = results["summary"]
    keys = list(next(iter(summary.values())))
    lines = [
        "# Training recipes compared", "", f"Command: `{results['command']}`", "",
        f"Data: {results['data']}; seeds {results['seeds']}; load average before {results['load_before']}, after "
        f"{results['load_after']}; wall time {results['wall_s'] / 60:.1f} min.", "",
        "Retrieval and zero-shot in % (mean ± std over seeds); speeds on the test split, this machine, shared.", "",
        "| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
    ]  # fmt: skip
    for model, values in summary.items():
        cells = []
        for key in keys:
            scale = 100 if key in METRICS or key.startswith("cifar10") else 1
            cells.append(f"{scale * values[key]['mean']:.1f} ± {scale * values[key]['std']:.1f}")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--data", help="'flickr8k-1k' (../shared/data) or a dataset spec with train/test splits; "
                                       "default the synthetic scenes")  # fmt: skip
    parser.add_argument("--cifar10", type=Path, help="CIFAR-10 image folder: add zero-shot top-1 (retention)")
    parser.add_argument("--cifar10-images", type=int, default=1000, help="random CIFAR-10 test images evaluated")
    args = parser.parse_args(argv)

    data = args.data
    if data == "flickr8k-1k":
        folder = SHARED_DATA / "flickr8k-1k"
        data = f"karpathy:{folder / 'dataset_flickr8k_1k.json'}?images={folder / 'images'}"
    cifar10 = None
    if args.cifar10 is not None:
        cifar10 = load_dataset_spec(f"imagefolder:{args.cifar10}?split=test").shuffle(seed=0)
        cifar10 = cifar10.select(range(min(args.cifar10_images, len(cifar10))))
    load_before, start = os.getloadavg(), time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in args.seeds:
        run = args.output_dir / f"seed_{seed}"
        preset = load_preset("tiny", seed=seed, data=data, **SIZES[args.size])
        run_pipeline(run, preset, log=lambda line: print(line, flush=True))
        splits = datasets.load_from_disk(str(run / "work" / "data"))
        folders = train_recipes(run, preset, splits)
        per_seed[seed] = {model: measure(folders[model], splits["test"], cifar10) for model in MODELS}
        write_json_atomically(run / "recipes" / "results.json", per_seed[seed])
    results = {
        "command": "PYTHONPATH=. python benchmarks/recipes/run_comparison.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "data": data or f"synthetic scenes ({args.size} size: {SIZES[args.size] or 'the tiny preset'})",
        "seeds": args.seeds,
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
        "wall_s": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "per_seed": per_seed,
        "summary": summarise(per_seed),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.output_dir / "results.json", results)
    (args.output_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
