"""Real-photo benchmark: DCLIP on Flickr8k with CIFAR-10 zero-shot retention, side by side with its base.

For each seed, the `dclip run` pipeline (`modeling_dclip.training.pipeline.run_pipeline`) on a Karpathy-split
dataset: align the base dual encoder (embedded towers) on train, extract regions (grid, or YOLO with `--yolo-weights`),
train the teacher and distil the student, selecting checkpoints on val only. Then base, teacher and student are
evaluated on test and val (retrieval both ways, mAP), base and student (and WiSE-FT interpolations of the student
with its base) on CIFAR-10 zero-shot with the standard CIFAR-10 templates. Results are aggregated over seeds as mean
and sample standard deviation (ddof=1).

    python benchmarks/real_photos/run_benchmark.py --data ../shared/data/flickr8k-1k --cifar ../shared/data/cifar10-test

Writes `results.json`, `results.md` and `retention_vs_recall.png` next to this file (or into `--results-dir`);
training outputs go to `--work-dir` (default `outputs/real_photos`). Finished seeds and evaluations are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WISE_ALPHAS = (0.25, 0.5, 0.75)
RETRIEVAL_KEYS = tuple(
    f"{direction}_{measure}"
    for direction in ("text_to_image", "image_to_text")
    for measure in ("R@1", "R@5", "R@10", "mAP")
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--data", required=True, help="Karpathy-split dataset folder or spec (train/val/test)")
    parser.add_argument("--cifar", required=True, help="CIFAR-10 test images as an image folder (<class>/*.jpg)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", default=str(HERE / "config.yaml"), help="preset fields for every seed's run")
    parser.add_argument("--yolo-weights", default=None, help="YOLO weights for the regions (default: the grid)")
    parser.add_argument("--work-dir", default="outputs/real_photos")
    parser.add_argument("--results-dir", default=str(HERE))
    parser.add_argument("--cifar-limit", type=int, default=0, help="evaluate on the first N per class (0: all)")
    parser.add_argument("--overwrite", action="store_true", help="recompute every seed")
    return parser.parse_args(argv)


def cifar_dataset(path: str, per_class_limit: int):
    from modeling_dclip.data.spec import load_dataset_spec

    dataset = load_dataset_spec(f"imagefolder:{path}")
    if per_class_limit:
        seen: dict[int, int] = {}
        keep = []
        for row, label in enumerate(dataset["label"]):
            seen[label] = seen.get(label, 0) + 1
            if seen[label] <= per_class_limit:
                keep.append(row)
        dataset = dataset.select(keep)
    return dataset


def cached_json(path: Path, compute) -> dict[str, Any]:
    """`compute()`'s result, read back from `path` when an earlier run already wrote it."""
    if path.is_file():
        return json.loads(path.read_text())
    from modeling_dclip.training.checkpointing import write_json_atomically

    result = compute()
    write_json_atomically(path, result)
    return result


def evaluate_seed(run_dir: Path, cifar, log) -> dict[str, Any]:
    """Val metrics of the three models, CIFAR-10 zero-shot of base and student, and the WiSE-FT curve."""
    import datasets

    from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
    from modeling_dclip.evaluation import evaluate_model
    from modeling_dclip.training.distill import wise_ft

    splits = datasets.load_from_disk(str(run_dir / "work" / "data"))
    evaluations = run_dir / "work" / "benchmark"
    evaluations.mkdir(parents=True, exist_ok=True)

    def timed(name: str, compute):
        def run() -> dict[str, float]:
            start = time.perf_counter()
            metrics = compute()
            log(f"  {run_dir.name} {name}: {time.perf_counter() - start:.0f} s")
            return metrics

        return cached_json(evaluations / f"{name}.json", run)

    processor = DCLIPProcessor.from_pretrained(str(run_dir / "student"))
    base = DCLIPModel.from_pretrained(str(run_dir / "base"))
    student = DCLIPModel.from_pretrained(str(run_dir / "student"))
    val = {}
    if "val" in splits:  # a data set without a val split is still scored on test
        val = {
            "base": timed("val_base", lambda: evaluate_model(base, processor, splits["val"])),
            "student": timed("val_student", lambda: evaluate_model(student, processor, splits["val"])),
            "teacher": timed(
                "val_teacher",
                lambda: evaluate_model(
                    DCLIPTeacherModel.from_pretrained(str(run_dir / "teacher")),
                    DCLIPProcessor.from_pretrained(str(run_dir / "teacher")),
                    splits["val"],
                    cache_dir=evaluations / "regions",
                ),
            ),
        }

    def zeroshot(model) -> dict[str, float]:
        metrics = evaluate_model(model, processor, cifar, tasks=("zeroshot",), templates="cifar10")
        return {"cifar10_top1": metrics["zeroshot_top1"], "cifar10_top5": metrics["zeroshot_top5"]}

    cifar10 = {
        "base": timed("cifar10_base", lambda: zeroshot(base)),
        "student": timed("cifar10_student", lambda: zeroshot(student)),
    }
    wise = {}
    for alpha in WISE_ALPHAS:

        def interpolated(alpha: float = alpha):
            model = DCLIPModel.from_pretrained(str(run_dir / "student"))
            wise_ft(model, base, alpha)
            return {**evaluate_model(model, processor, splits["test"]), **zeroshot(model)}

        wise[str(alpha)] = timed(f"wise_{alpha}", interpolated)
    return {"val": val, "cifar10": cifar10, "wise": wise}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    seeds = sorted(per_seed)
    models: dict[str, dict[str, dict[str, float]]] = {}
    for role in ("base", "teacher", "student"):
        metrics: dict[str, list[float]] = {}
        for seed in seeds:
            test = per_seed[seed]["test"][role]
            values = {key: test[key] for key in RETRIEVAL_KEYS if key in test}
            if per_seed[seed]["val"]:
                values.update({f"val_{key}": per_seed[seed]["val"][role][key] for key in RETRIEVAL_KEYS})
            if role in per_seed[seed]["cifar10"]:
                values["cifar10_top1"] = per_seed[seed]["cifar10"][role]["cifar10_top1"]
            for key, value in values.items():
                metrics.setdefault(key, []).append(value)
        models[role] = {key: mean_std(values) for key, values in metrics.items()}
    retention = [
        per_seed[s]["cifar10"]["student"]["cifar10_top1"] / per_seed[s]["cifar10"]["base"]["cifar10_top1"]
        for s in seeds
    ]
    wise = {}
    for alpha in WISE_ALPHAS:
        runs = [per_seed[s]["wise"][str(alpha)] for s in seeds]
        wise[str(alpha)] = {
            "text_to_image_R@1": mean_std([run["text_to_image_R@1"] for run in runs]),
            "image_to_text_R@1": mean_std([run["image_to_text_R@1"] for run in runs]),
            "cifar10_top1": mean_std([run["cifar10_top1"] for run in runs]),
            "zeroshot_retention": mean_std(
                [run["cifar10_top1"] / per_seed[s]["cifar10"]["base"]["cifar10_top1"] for run, s in zip(runs, seeds)]
            ),
        }
    return {"seeds": seeds, "models": models, "zeroshot_retention": mean_std(retention), "wise_ft": wise}


def results_markdown(results: dict[str, Any], command: str) -> str:
    models = results["models"]
    keys = [key for key in (*RETRIEVAL_KEYS, "cifar10_top1") if key in models["base"]]
    lines = [
        "# Real-photo benchmark: Flickr8k retrieval and CIFAR-10 zero-shot retention",
        "",
        f"Command: `{command}`",
        "",
        f"Seeds {results['seeds']}; mean ± sample std (ddof=1) in percent; retrieval on the test split, checkpoints "
        "selected on val. The teacher has no CIFAR-10 figure: it scores (image, text) pairs through its fusion and is "
        "not used as a classifier.",
        "",
        "| metric | " + " | ".join(models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for key in keys:
        cells = [
            f"{100 * models[m][key]['mean']:.1f} ± {100 * models[m][key]['std']:.1f}" if key in models[m] else "-"
            for m in models
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    retention = results["zeroshot_retention"]
    lines += [
        "",
        "Zero-shot retention (student / base CIFAR-10 top-1): "
        f"{100 * retention['mean']:.1f}% ± {100 * retention['std']:.1f}",
        "",
        "WiSE-FT (student weights interpolated with the base's, alpha = weight of the student):",
        "",
        "| alpha | text_to_image_R@1 | image_to_text_R@1 | cifar10_top1 | retention |",
        "|---|---|---|---|---|",
    ]
    for alpha, row in results["wise_ft"].items():
        cells = [
            f"{100 * row[k]['mean']:.1f} ± {100 * row[k]['std']:.1f}"
            for k in ("text_to_image_R@1", "image_to_text_R@1", "cifar10_top1", "zeroshot_retention")
        ]
        lines.append(f"| {alpha} | " + " | ".join(cells) + " |")
    lines += ["", f"Wall time: {results['wall_time_s'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    points = [("base", 1.0, models["base"]["text_to_image_R@1"]["mean"])]
    for alpha, row in results["wise_ft"].items():
        points.append((f"WiSE-FT {alpha}", row["zeroshot_retention"]["mean"], row["text_to_image_R@1"]["mean"]))
    points.append(("student", results["zeroshot_retention"]["mean"], models["student"]["text_to_image_R@1"]["mean"]))
    figure, axes = plt.subplots(figsize=(6, 4.5))
    axes.plot([100 * p[1] for p in points], [100 * p[2] for p in points], "o-", color="tab:blue")
    for name, retention, recall in points:
        axes.annotate(name, (100 * retention, 100 * recall), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel("CIFAR-10 zero-shot retention (% of base top-1)")
    axes.set_ylabel("Flickr8k test text-to-image R@1 (%)")
    axes.set_title(f"Retrieval vs zero-shot retention ({len(results['seeds'])} seeds, means)")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    import sys

    from modeling_dclip.training.pipeline import load_preset, run_pipeline

    args = parse_args(argv)
    command = "python benchmarks/real_photos/run_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    regions = {"type": "yolo", "weights": args.yolo_weights} if args.yolo_weights else None
    cifar = cifar_dataset(args.cifar, args.cifar_limit)
    per_seed = {}
    for seed in args.seeds:
        run_dir = Path(args.work_dir) / f"seed{seed}"
        overrides = {"data": args.data, "seed": seed}
        if regions:
            overrides["regions"] = regions
        preset = load_preset("default", args.config, **overrides)
        print(f"[real photos] seed {seed}: pipeline into {run_dir}", flush=True)
        results = run_pipeline(run_dir, preset, overwrite=args.overwrite)
        per_seed[seed] = {
            "test": results["models"],
            "timings_s": results["timings_s"],
            **evaluate_seed(run_dir, cifar, lambda line: print(line, flush=True)),
        }
    results = aggregate(per_seed)
    results.update(
        {
            "wall_time_s": round(time.perf_counter() - start, 1),
            "command": command,
            "data": args.data,
            "cifar10": {"path": args.cifar, "images": len(cifar)},
            "regions": regions or "grid (config.yaml)",
            "per_seed": per_seed,
        }
    )
    out = Path(args.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results, command))
    plot(results, out / "retention_vs_recall.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
