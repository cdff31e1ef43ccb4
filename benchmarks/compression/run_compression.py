"""Two-stage compression of the full Flickr8k student, built, trained and measured in one resumable command.

    PYTHONPATH=. python benchmarks/compression/run_compression.py --output-dir outputs/compression

1. `full_base`: the embedded default (EfficientNet-Lite0 + all-MiniLM-L6-v2) aligned LiT-style on Flickr8k train
   with both towers locked (features cached; only the projections and the temperature train);
2. `full`: the full student, `full_base` fine-tuned contrastively with stage 2's budget (towers locked, their
   features cached; projections and temperature trained; best epoch by text-to-image R@1 on Flickr8k val);
3. `stage1`: the compressed student built from `full` (EfficientNet-Lite0 keeps the first block of each stage; the
   text tower keeps `--text-layers` of MiniLM's 6 layers and the word embeddings of the tokens the vocabulary
   corpus uses) and distilled tower by tower from `full` on unpaired data (every Flickr8k photo outside the test
   split; the Flickr8k train captions), `modeling_dclip.training.distill_towers`;
4. `stage2_seed{S}`: stage 1's student fine-tuned exactly as `full` was (same budget, same locked towers), per
   seed;
5. every model scored on the Flickr8k test split (1,000 photos, 5,000 captions, both directions) and on CIFAR-10
   zero-shot (10,000 test images, 18 templates); parameters, file sizes and encoding speeds (side by side,
   interleaved rounds, 2 threads, batch 1 and 64).

Rerunning the command reuses every finished part: a stage is skipped when its folder holds a completion record of
the same settings (`stage.json`), an evaluation when `evals/<model>.json` records the same weights and settings.
Writes `results.json` and `results.md` into the output directory.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import torch

from modeling_dclip import DCLIPModel, DCLIPProcessor
from modeling_dclip.atomic import write_json_atomically, write_text_atomically
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.evaluation import caption_pairs, evaluate_model, get_classnames, get_templates, validator
from modeling_dclip.feature_store import FeatureStore
from modeling_dclip.recipes import parameter_counts, unknown_token_rate
from modeling_dclip.regions import to_rgb
from modeling_dclip.training import AlignConfig, TowerDistillConfig, align_base, distill_towers

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
RETRIEVAL = [f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)]
METRICS = [*RETRIEVAL, "cifar10_top1"]
FROZEN_PREFIX = [
    "vision_model.timm_model.conv_stem.*",
    "vision_model.timm_model.bn1.*",
    "vision_model.timm_model.blocks.0.*",
    "vision_model.timm_model.blocks.1.*",
]
"""The stem and the first two stages, which the kept-block tower computes exactly as the big one does (only the
second block of stage 1 and later blocks go): frozen in stage 1, so that no gradient flows through the
highest-resolution layers."""


def log(message: str) -> None:
    print(f"[compression {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_stage(folder: Path, settings: dict[str, Any], build: Callable[[], None]) -> Path:
    """Run `build()` unless `folder` holds a finished model trained with the same `settings`."""
    record = folder / "stage.json"
    if (folder / "training_complete.json").is_file() and record.is_file():
        if json.loads(record.read_text()) == settings:
            log(f"{folder.name}: reused")
            return folder
    if (folder / "training_complete.json").is_file():
        log(f"{folder.name}: settings changed, retraining")
        shutil.rmtree(folder)
    start = time.perf_counter()
    build()
    write_json_atomically(record, settings)
    log(f"{folder.name}: trained in {time.perf_counter() - start:.0f} s")
    return folder


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def cifar_prompts() -> list[str]:
    return [template.format(name) for name in get_classnames("cifar10") for template in get_templates("cifar10")]


def evaluate(folder: Path, test: datasets.Dataset, cifar10: datasets.Dataset, evals: Path) -> dict[str, float]:
    """Flickr8k test retrieval and CIFAR-10 zero-shot top-1 (in %) of the model in `folder`, cached by weights."""
    key = {"weights": weights_digest(folder), "test_rows": len(test), "cifar10_rows": len(cifar10)}
    path = evals / f"{folder.name}.json"
    if path.is_file() and json.loads(path.read_text())["key"] == key:
        return json.loads(path.read_text())["metrics"]
    start = time.perf_counter()
    model, processor = DCLIPModel.from_pretrained(folder).eval(), DCLIPProcessor.from_pretrained(folder)
    metrics = evaluate_model(model, processor, test, ["retrieval"])
    metrics["cifar10_top1"] = evaluate_model(model, processor, cifar10, ["zeroshot"], templates="cifar10")[
        "zeroshot_top1"
    ]
    metrics = {name: 100.0 * value for name, value in metrics.items() if name in METRICS}
    write_json_atomically(path, {"key": key, "metrics": metrics})
    log(f"{folder.name}: evaluated in {time.perf_counter() - start:.0f} s: {metrics}")
    return metrics


def speeds(
    folders: dict[str, Path], test: datasets.Dataset, rounds: dict[int, int], sizes: list[int]
) -> dict[str, Any]:
    """Seconds per batch of each model, side by side, with 2 threads: the same test photos (at each of `sizes`
    pixels) and captions (each model's own tokenizer) prepared once, then the models encode them in turn, round
    after round (a warm-up round first). Per size and batch size (`rounds`: batch size -> rounds): each model's
    median seconds and the per-round ratios full / model (`*_speedup`, mean and std over rounds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    largest = max(rounds)  # the batch sizes
    rows = test.select(range(largest))
    images = [to_rgb(image) for image in rows["image"]]
    captions = caption_pairs(rows).captions[:largest]
    models = {name: DCLIPModel.from_pretrained(folder).eval() for name, folder in folders.items()}
    processors = {name: DCLIPProcessor.from_pretrained(folder) for name, folder in folders.items()}
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    for size in sizes:
        for batch, count in rounds.items():
            crop = {"height": size, "width": size}
            inputs = {
                name: (
                    processor.image_processor(
                        images[:batch], size={"shortest_edge": size}, crop_size=crop, return_tensors="pt"
                    )["pixel_values"],
                    processor(text=captions[:batch], return_tensors="pt", padding=True, truncation=True),
                )
                for name, processor in processors.items()
            }
            seconds = {name: {"images": [], "texts": []} for name in models}
            with torch.inference_mode():
                for round_index in range(count + 1):
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
            entry: dict[str, Any] = {"rounds": count}
            for name, times in seconds.items():
                entry[name] = {f"{kind}_median_s": statistics.median(values) for kind, values in times.items()}
                for kind in ("images", "texts"):
                    ratios = [f / c for f, c in zip(seconds["full"][kind], times[kind])]
                    entry[name][f"{kind}_speedup"] = mean_std(ratios) | {"median": statistics.median(ratios)}
                    entry[name][f"{kind}_speedup_of_medians"] = (
                        statistics.median(seconds["full"][kind]) / entry[name][f"{kind}_median_s"]
                    )
            result[f"{size}px_batch_{batch}"] = entry
    result["load_after"] = os.getloadavg()
    torch.set_num_threads(threads)
    return result


def mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def tokenizer_costs(folder: Path, full: Path, held_out: list[str]) -> dict[str, float]:
    """What the reduced vocabulary costs on text outside its corpus: `[UNK]` rates and tokens per text against the
    full tokenizer, on CIFAR-10 prompts and Flickr8k test captions."""
    reduced, original = DCLIPProcessor.from_pretrained(folder).tokenizer, DCLIPProcessor.from_pretrained(full).tokenizer
    costs = {"vocabulary_size": len(reduced), "full_vocabulary_size": len(original)}
    for name, texts in (("cifar10_prompts", cifar_prompts()), ("flickr8k_test_captions", held_out)):
        costs[f"{name}_unk_rate"] = unknown_token_rate(reduced, texts)
        costs[f"{name}_full_unk_rate"] = unknown_token_rate(original, texts)
        lengths = [
            sum(len(ids) for ids in t(texts, add_special_tokens=False)["input_ids"]) for t in (reduced, original)
        ]
        costs[f"{name}_tokens_ratio"] = lengths[0] / lengths[1]
    return costs


def markdown(results: dict[str, Any]) -> str:
    full, small = results["models"]["full"], results["models"]["compressed"]
    lines = [
        "| metric | full student | compressed | difference |",
        "|---|---|---|---|",
    ]
    for metric in METRICS:
        f, c = full[metric], small[metric]
        lines.append(
            f"| {metric} | {f['mean']:.1f} | {c['mean']:.1f} ± {c['std']:.1f} | {c['mean'] - f['mean']:+.1f} |"
        )
    lines += [
        "",
        f"parameters: {results['parameters']['full']['total'] / 1e6:.2f} M -> "
        f"{results['parameters']['compressed']['total'] / 1e6:.2f} M (ratio {results['parameter_ratio']['mean']:.3f}); "
        f"file size ratio {results['file_size_ratio']:.3f}",
    ]
    for size in results["speed_sizes"]:
        for batch in results["speed_batches"]:
            entry = results["speed"][f"{size}px_batch_{batch}"][f"compressed_seed{results['seeds'][0]}"]
            lines.append(
                f"{size} px, batch {batch}: images x{entry['images_speedup']['mean']:.2f} ± "
                f"{entry['images_speedup']['std']:.2f}, "
                f"texts x{entry['texts_speedup']['mean']:.2f} ± {entry['texts_speedup']['std']:.2f} (per-round ratios, "
                f"{entry['images_speedup']['n']} rounds)"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=ROOT / "outputs" / "compression")
    parser.add_argument("--data", default=str(SHARED_DATA / "flickr8k"))
    parser.add_argument("--cifar10", default=str(SHARED_DATA / "cifar10-test"))
    parser.add_argument("--cifar10-images", type=int, default=0, help="evaluate the first N CIFAR-10 images (0: all)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--speed-sizes", type=int, nargs="+", default=[64, 224], help="image sizes timed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--text-layers", type=int, nargs="+", default=[5], help="MiniLM layers kept (0-based)")
    parser.add_argument("--align-epochs", type=int, default=10)
    parser.add_argument("--stage1-epochs", type=int, default=2)
    parser.add_argument("--stage1-captions-per-image", type=int, default=2, help="stage 1's texts per train photo")
    parser.add_argument("--stage2-epochs", type=int, default=3)
    parser.add_argument("--stage2-lr", type=float, default=1e-3)
    parser.add_argument("--remeasure-speed", action="store_true", help="time the models again even if timed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training and evaluating")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    flickr = load_dataset_spec(args.data)
    split = flickr["split"]
    train = flickr.select([i for i, s in enumerate(split) if s == "train"])
    val = flickr.select([i for i, s in enumerate(split) if s == "val"])
    test = flickr.select([i for i, s in enumerate(split) if s == "test"])
    unpaired_images = flickr.select([i for i, s in enumerate(split) if s != "test"]).select_columns(["image"])
    train_captions = caption_pairs(train).captions
    # Stage 1's texts: the first captions of each train photo (the CPU budget's share of the 30,455).
    stage1_texts = [text for captions in train["captions"] for text in captions[: args.stage1_captions_per_image]]
    cifar10 = load_dataset_spec(f"imagefolder:{args.cifar10}?split=test")
    if args.cifar10_images:
        cifar10 = cifar10.shuffle(seed=0).select(range(args.cifar10_images))
    log(f"flickr8k train {len(train)} / val {len(val)} / test {len(test)}; cifar10 {len(cifar10)}")

    size = args.image_size
    store = FeatureStore(out / "features")  # the locked towers' features and stage 1's targets, by content
    validate = validator(val, batch_size=64)
    stage2 = {
        "num_train_epochs": args.stage2_epochs,
        "batch_size": 128,
        "learning_rate": args.stage2_lr,
        "warmup_steps": 20,
        "train_text_tower": False,
        "unlock_vision_blocks": 0,
        "image_size": size,
        "metric_for_best_model": "text_to_image_R@1",
        "eval_batch_size": 64,
    }
    base_settings = {
        "data": args.data,
        "image_size": size,
        "train_text_tower": False,
        "num_train_epochs": args.align_epochs,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "warmup_steps": 20,
        "projection_dim": 256,
    }
    base = out / "full_base"
    run_stage(
        base,
        base_settings,
        lambda: align_base(AlignConfig(output_dir=str(base), eval_split="", **base_settings), train, store=store),
    )
    full = out / "full"
    # The full student's towers are the base's, locked (their features come from the store); it trains in the base's
    # work_dir.
    full_settings = {"init_from": str(base), "seed": 0, "work_dir": str(base / "training"), **stage2}
    run_stage(
        full,
        full_settings,
        lambda: align_base(AlignConfig(output_dir=str(full), **full_settings), train, validate, store),
    )

    stage1 = out / "stage1"
    stage1_settings = {
        "big_model": str(full),
        "compress": {"text_layers": args.text_layers, "vision_blocks": "first"},
        "reduce_vocabulary": True,
        "freeze_patterns": FROZEN_PREFIX,
        "image_size": size,
        "num_train_epochs": args.stage1_epochs,
        "batch_size": 64,
        "learning_rate": 3e-4,
        "warmup_steps": 30,
        "save_steps": 50,
        "resume_from_checkpoint": "latest",
        "num_images": len(unpaired_images),
        "num_texts": len(stage1_texts),
    }
    vocabulary = train_captions + cifar_prompts()

    def build_stage1() -> None:
        fields = {k: v for k, v in stage1_settings.items() if k not in ("num_images", "num_texts")}
        distill_towers(
            TowerDistillConfig(output_dir=str(stage1), **fields), unpaired_images, stage1_texts, vocabulary, store
        )

    run_stage(stage1, stage1_settings, build_stage1)

    evals = out / "evals"
    evals.mkdir(exist_ok=True)
    compressed: dict[int, Path] = {}
    measured: dict[str, dict[str, float]] = {"full": evaluate(full, test, cifar10, evals)}
    for seed in args.seeds:
        folder = out / f"stage2_seed{seed}"
        # Every seed starts from the same stage-1 towers, locked; the seeds train one after another in one work_dir.
        settings = {"init_from": str(stage1), "seed": seed, "work_dir": str(out / "stage2_features"), **stage2}
        run_stage(
            folder,
            settings,
            lambda folder=folder, settings=settings: align_base(
                AlignConfig(output_dir=str(folder), **settings), train, validate, store
            ),
        )
        compressed[seed] = folder
        measured[folder.name] = evaluate(folder, test, cifar10, evals)
        # Results are rewritten after every seed, so a stopped run leaves the seeds it finished recorded.
        write_results(out, args, full, compressed, measured, test, start)
    log(f"done in {time.perf_counter() - start:.0f} s")


def write_results(
    out: Path,
    args: argparse.Namespace,
    full: Path,
    compressed: dict[int, Path],
    measured: dict[str, dict[str, float]],
    test: datasets.Dataset,
    start: float,
) -> None:
    seeds = sorted(compressed)
    batches = {1: 21, 64: 7}
    folders = {"full": full, **{f"compressed_seed{seed}": compressed[seed] for seed in seeds}}
    # Every seed's compressed student has the same architecture: one of them is timed against the full student.
    timed = {"full": full, f"compressed_seed{seeds[0]}": compressed[seeds[0]]}
    key = {"weights": {name: weights_digest(folder) for name, folder in timed.items()}, "sizes": args.speed_sizes}
    speed_path = out / "speed.json"
    if args.remeasure_speed or not speed_path.is_file() or json.loads(speed_path.read_text())["key"] != key:
        write_json_atomically(speed_path, {"key": key, "speed": speeds(timed, test, batches, args.speed_sizes)})
        args.remeasure_speed = False
    speed = json.loads(speed_path.read_text())["speed"]
    full_params = parameter_counts(DCLIPModel.from_pretrained(full))
    small_params = parameter_counts(DCLIPModel.from_pretrained(compressed[seeds[0]]))
    file_size = {name: (folder / "model.safetensors").stat().st_size for name, folder in folders.items()}
    batch_64 = speed[f"{args.image_size}px_batch_64"]
    results = {
        "command": "PYTHONPATH=. python benchmarks/compression/run_compression.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("output_dir", "remeasure_speed")
        ),
        "image_size": args.image_size,
        "seeds": seeds,
        "parameters": {"full": full_params, "compressed": small_params},
        "parameter_ratio": {"mean": small_params["total"] / full_params["total"], "std": 0.0},
        "file_size_ratio": statistics.fmean(file_size[f"compressed_seed{s}"] for s in seeds) / file_size["full"],
        "file_sizes": file_size,
        "image_speedup": batch_64[f"compressed_seed{seeds[0]}"]["images_speedup"],
        "text_speedup": batch_64[f"compressed_seed{seeds[0]}"]["texts_speedup"],
        "speed_batches": list(batches),
        "speed_sizes": args.speed_sizes,
        "speed": speed,
        "models": {
            "full": {metric: mean_std([measured["full"][metric]]) for metric in METRICS},
            "compressed": {
                metric: mean_std([measured[f"stage2_seed{s}"][metric] for s in seeds]) for metric in METRICS
            },
        },
        "per_seed": {f"stage2_seed{s}": measured[f"stage2_seed{s}"] for s in seeds},
        "tokenizer": tokenizer_costs(compressed[seeds[0]], full, caption_pairs(test).captions),
        "stage_summaries": {
            name: json.loads((out / name / "training_complete.json").read_text())
            for name in ["full_base", "full", "stage1", *(f"stage2_seed{s}" for s in seeds)]
        },
        "wall_s": round(time.perf_counter() - start, 1),
    }
    for summary in results["stage_summaries"].values():
        summary.pop("history", None)
    write_json_atomically(out / "results.json", results)
    write_text_atomically(out / "results.md", markdown(results))
    log(f"results written for seeds {seeds}:\n{markdown(results)}")


if __name__ == "__main__":
    main()
