"""One table for the training recipes: base, DCLIP, ConaCLIP, DCLIP + ConaCLIP, Knowledge-CLIP and the two-stage
compressed student, on the same data with the same budget, over several seeds (mean ± std).

    PYTHONPATH=. python benchmarks/recipes/run_comparison.py --output-dir /tmp/recipes --size small --seeds 0 1 2

runs both data sets by default: the synthetic scenes (held-out `test` split) and ../shared/data/flickr8k-1k (Karpathy
`test` split), each model also scored on CIFAR-10 zero-shot (`--cifar10`, default ../shared/data/cifar10-test) so
that every recipe's zero-shot retention (its top-1 / the base's, per seed) is reported.

Per data set and seed, `modeling_dclip.pipeline.run_pipeline` makes the data, the base, the DCLIP teacher and
the DCLIP student; every other recipe then trains `distill_student` from its config in `trainers/configs/` with the
paths and the preset's student budget (epochs, batch size, learning rate, warmup; best epoch on `val`) put in, so
only the loss, the targets and the config's freezing differ:

- ConaCLIP: the frozen base as teacher (`conaclip.yaml`); DCLIP + ConaCLIP: the DCLIP teacher (`dclip_conaclip.yaml`);
- Knowledge-CLIP: all-MiniLM-L6-v2 as text teacher (`knowledge_clip.yaml`);
- two-stage compression: the base is compressed (every other text layer, MobileNetV2 for EfficientNet-Lite0) and
  distilled from the base in stage 1, then fine-tuned contrastively in stage 2, each stage with the full budget.

Encoding speed is measured side by side: one batch of test images and one of test captions is prepared once, then
every model of the seed encodes them in turn, round after round (interleaved, so that the machine's load falls on all
alike); the table gives each model's median images/s and texts/s over the rounds and its ratio to the DCLIP student.
`results.json` and `results.md` go to the output folder with the command and the machine's load average.
"""

from __future__ import annotations

import argparse
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
from modeling_dclip.atomic import write_json_atomically
from modeling_dclip.data.captions import caption_pairs
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.evaluation import evaluate_model, supported_tasks
from modeling_dclip.pipeline import load_preset, run_pipeline
from modeling_dclip.recipes import parameter_counts
from modeling_dclip.regions import to_rgb
from modeling_dclip.training import DistillConfig, distill_student, load_stage_config
from modeling_dclip.training.checkpointing import is_complete

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "trainers" / "configs"
SHARED_DATA = REPO.parent / "shared" / "data"

SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"distill": {"learning_rate": 1e-4}},
    # Meant for a shared 2-core CPU; its wall time has not been measured yet.
    "small": {
        "pretrain_images": 160,
        "train_images": 160,
        "val_images": 32,
        "test_images": 64,
        "align": {"num_train_epochs": 10, "batch_size": 32},
        "teacher": {"num_train_epochs": 5, "batch_size": 32},
        "distill": {"num_train_epochs": 3, "batch_size": 32, "learning_rate": 1e-4, "warmup_steps": 2},
    },
}
"""Overrides of the pipeline's `tiny` preset."""

BUDGET_FIELDS = ("num_train_epochs", "batch_size", "learning_rate", "warmup_steps")
"""The student budget every recipe gets from the preset, whatever its config says."""

SPEED_ROUNDS = 7
SPEED_BATCH = 64

MODELS = ("base", "DCLIP", "ConaCLIP", "DCLIP+ConaCLIP", "Knowledge-CLIP", "two-stage compressed")
METRICS = ("text_to_image_R@1", "text_to_image_R@5", "image_to_text_R@1", "image_to_text_R@5")


def train_recipes(run: Path, preset, splits) -> dict[str, Path]:
    """Train every recipe other than DCLIP on this seed's base / teacher; returns model name -> folder."""
    budget = {name: value for name, value in preset.distill.items() if name in BUDGET_FIELDS}
    common = {"seed": preset.seed, "image_size": preset.image_size, "eval_split": "", **budget}
    base, teacher = str(run / "base"), str(run / "teacher")
    jobs = {
        "ConaCLIP": ("conaclip", {"base_model": base, "teacher_model": base}),
        "DCLIP+ConaCLIP": (
            "dclip_conaclip",
            {"base_model": base, "teacher_model": teacher},
        ),
        "Knowledge-CLIP": ("knowledge_clip", {"base_model": base}),
        "compression stage 1": ("compression_stage1", {"base_model": base, "teacher_model": base}),
        "two-stage compressed": ("compression_stage2", {"base_model": str(run / "recipes" / "compression_stage1")}),
    }
    folders = {"base": run / "base", "DCLIP": run / "student"}
    for name, (config_name, paths) in jobs.items():
        out = run / "recipes" / config_name
        if not is_complete(out):
            config = load_stage_config(
                DistillConfig,
                CONFIGS / f"{config_name}.yaml",
                **{**common, **paths, "output_dir": str(out), "work_dir": str(run / "work" / config_name)},
            )
            start = time.perf_counter()
            distill_student(config, splits["train"], splits["val"] if "val" in splits else None)
            print(f"[recipes] {run.name} {name}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        folders[name] = out
    del folders["compression stage 1"]
    return folders


def encode_speeds(
    folders: dict[str, Path], test: datasets.Dataset, rounds: int = SPEED_ROUNDS
) -> dict[str, dict[str, float]]:
    """Median images/s and texts/s of every model, side by side: one batch of test images and one of test captions
    is prepared once per model, then the models encode them in turn, round after round (round 0 warms up)."""
    rows = test.select(range(min(SPEED_BATCH, len(test))))
    images = [to_rgb(image) for image in rows["image"]]
    captions = caption_pairs(test).captions[:SPEED_BATCH]
    models, inputs = {}, {}
    for name, folder in folders.items():
        models[name], processor = DCLIPModel.from_pretrained(folder).eval(), DCLIPProcessor.from_pretrained(folder)
        inputs[name] = (
            processor(images=images, return_tensors="pt")["pixel_values"],
            processor(text=captions, return_tensors="pt", padding=True, truncation=True),
        )
    seconds: dict[str, dict[str, list[float]]] = {name: {"images": [], "texts": []} for name in models}
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for name, model in models.items():
                pixel_values, text = inputs[name]
                start = time.perf_counter()
                model.get_image_features(pixel_values=pixel_values)
                middle = time.perf_counter()
                model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
                end = time.perf_counter()
                if round_index:
                    seconds[name]["images"].append(middle - start)
                    seconds[name]["texts"].append(end - middle)
    return {
        name: {
            "images_per_s": len(images) / statistics.median(times["images"]),
            "texts_per_s": len(captions) / statistics.median(times["texts"]),
        }
        for name, times in seconds.items()
    }


def measure(folder: Path, test: datasets.Dataset, cifar10: datasets.Dataset | None) -> dict[str, float]:
    """Test-split retrieval, CIFAR-10 zero-shot top-1 (standard CIFAR-10 templates) and parameters of one model."""
    model, processor = DCLIPModel.from_pretrained(folder).eval(), DCLIPProcessor.from_pretrained(folder)
    result = {
        name: value
        for name, value in evaluate_model(model, processor, test, supported_tasks(test)).items()
        if name in METRICS
    }
    if cifar10 is not None:
        result["cifar10_top1"] = evaluate_model(model, processor, cifar10, ["zeroshot"], templates="cifar10")[
            "zeroshot_top1"
        ]
    return {**result, "parameters_M": parameter_counts(model)["total"] / 1e6}


def measure_seed(
    folders: dict[str, Path], test: datasets.Dataset, cifar10: datasets.Dataset | None
) -> dict[str, dict[str, float]]:
    """Every model's measures on one seed, with its zero-shot retention (top-1 / the base's) and its encoding speed
    relative to the DCLIP student's, both taken within the seed."""
    measured = {model: measure(folders[model], test, cifar10) for model in MODELS}
    speeds = encode_speeds(folders, test)
    reference = speeds["DCLIP"]
    for model, values in measured.items():
        values.update(speeds[model])
        values["images_per_s_vs_DCLIP"] = speeds[model]["images_per_s"] / reference["images_per_s"]
        values["texts_per_s_vs_DCLIP"] = speeds[model]["texts_per_s"] / reference["texts_per_s"]
        if cifar10 is not None:
            values["cifar10_retention"] = values["cifar10_top1"] / measured["base"]["cifar10_top1"]
    return measured


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """model -> measure -> {mean, std} over seeds (sample std; 0 with one seed)."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        runs = [per_seed[seed][model] for seed in per_seed]
        summary[model] = {
            key: {
                "mean": statistics.fmean(run[key] for run in runs),
                "std": statistics.stdev(run[key] for run in runs) if len(runs) > 1 else 0.0,
            }
            for key in runs[0]
        }
    return summary


PERCENT_KEYS = (*METRICS, "cifar10_top1", "cifar10_retention")


def markdown(results: dict[str, Any]) -> str:
    columns = [
        *PERCENT_KEYS,
        "parameters_M",
        "images_per_s",
        "texts_per_s",
        "images_per_s_vs_DCLIP",
        "texts_per_s_vs_DCLIP",
    ]
    lines = [
        "# Training recipes compared",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Seeds {results['seeds']}; wall time {results['wall_s'] / 60:.1f} min; load average before "
        f"{results['load_before']}, after {results['load_after']}; torch threads {results['torch_threads']}.",
        "",
        "Retrieval on each data set's `test` split, CIFAR-10 zero-shot top-1 and retention (top-1 / the base's, per "
        "seed) in %, mean ± std over seeds; parameters in millions; encoding speed measured side by side (median "
        "over interleaved rounds, batch of 64) and its ratio to the DCLIP student's.",
        "",
    ]
    for name, section in results["datasets"].items():
        summary = section["summary"]
        keys = [key for key in columns if key in summary["base"]]
        lines += [
            f"## {name}",
            "",
            f"Data: {section['data']}; seeds {section['seeds']}; wall time {section['wall_s'] / 60:.1f} min.",
            "",
            "| model | " + " | ".join(keys) + " |",
            "|---|" + "---|" * len(keys),
        ]
        for model, values in summary.items():
            cells = []
            for key in keys:
                scale, digits = (100, 1) if key in PERCENT_KEYS else (1, 2 if key.endswith("vs_DCLIP") else 1)
                cells.append(f"{scale * values[key]['mean']:.{digits}f} ± {scale * values[key]['std']:.{digits}f}")
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def dataset_spec(name: str) -> str | None:
    """`synthetic` (None: the pipeline's own scenes), `flickr8k-1k` (../shared/data) or any dataset spec."""
    if name == "synthetic":
        return None
    if name == "flickr8k-1k":
        folder = SHARED_DATA / "flickr8k-1k"
        return f"karpathy:{folder / 'dataset_flickr8k_1k.json'}?images={folder / 'images'}"
    return name


def compare_on(name: str, output_dir: Path, size: str, seeds: list[int], cifar10) -> dict[str, Any]:
    """Train and measure every recipe on one data set for every seed."""
    data, start = dataset_spec(name), time.perf_counter()
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    for seed in seeds:
        run = output_dir / f"seed_{seed}"
        preset = load_preset("tiny", seed=seed, data=data, **SIZES[size])
        run_pipeline(run, preset, log=lambda line: print(line, flush=True))
        splits = datasets.load_from_disk(str(run / "work" / "data"))
        per_seed[seed] = measure_seed(train_recipes(run, preset, splits), splits["test"], cifar10)
        write_json_atomically(run / "recipes" / "results.json", per_seed[seed])
    return {
        "data": data or f"synthetic scenes ({size} size: {SIZES[size]})",
        "seeds": seeds,
        "wall_s": round(time.perf_counter() - start, 1),
        "per_seed": per_seed,
        "summary": summarise(per_seed),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["synthetic", "flickr8k-1k"],
        help="'synthetic', 'flickr8k-1k' (../shared/data) or dataset specs with train/test splits",
    )
    parser.add_argument(
        "--cifar10",
        type=Path,
        default=SHARED_DATA / "cifar10-test",
        help="CIFAR-10 image folder for zero-shot retention; 'none' skips it",
    )
    parser.add_argument("--cifar10-images", type=int, default=1000, help="random CIFAR-10 test images evaluated")
    args = parser.parse_args(argv)

    cifar10 = None
    if str(args.cifar10) != "none":
        cifar10 = load_dataset_spec(f"imagefolder:{args.cifar10}?split=test").shuffle(seed=0)
        cifar10 = cifar10.select(range(min(args.cifar10_images, len(cifar10))))
    load_before, start = os.getloadavg(), time.perf_counter()
    sections = {
        name: compare_on(
            name,
            args.output_dir / (name if dataset_spec(name) != name else f"dataset_{index}"),
            args.size,
            args.seeds,
            cifar10,
        )
        for index, name in enumerate(args.datasets)
    }
    results = {
        "command": "PYTHONPATH=. python benchmarks/recipes/run_comparison.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds,
        "cifar10": {"path": str(args.cifar10), "images": len(cifar10)} if cifar10 is not None else None,
        "load_before": [round(value, 2) for value in load_before],
        "load_after": [round(value, 2) for value in os.getloadavg()],
        "wall_s": round(time.perf_counter() - start, 1),
        "torch_threads": torch.get_num_threads(),
        "datasets": sections,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(args.output_dir / "results.json", results)
    (args.output_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
