"""Real-photo benchmark v2: full Flickr8k, real YOLO regions, and the control the paper never ran (plain fine-tuning).

    python benchmarks/real_photos/run_benchmark.py --data ../shared/data/flickr8k --cifar ../shared/data/cifar10-test \
        --detector ../shared/models/yolov8n-coco-int8/yolov8n_int8.onnx --seeds 0 1 2 --output-dir outputs/real_photos

The protocol is written at the top of `README.md` beside this file. In short: the base (embedded towers, LiT) is
aligned on a fixed `pretrain` part of Flickr8k train and never sees the fine-tuning photos (protocol `disjoint`; the
variant `all` aligns it on every train photo); every fine-tuned model starts from it with the same trainable
parameters and budget; `val` chooses the learning rate (searched for plain fine-tuning and for the DCLIP student,
at the first seed) and the epoch; `test` (1,000 photos, 5,000 captions) and CIFAR-10 (10,000 images) are only
reported. Every stage is content-keyed (`modeling_dclip.pipeline.StageRunner`): rerunning the same command reuses
what finished (an interrupted training stage from its last checkpoint), so the benchmark can be run across sessions,
a seed at a time (`--seeds 1`).

Writes `results.json` (`models.<name>.<metric>.{mean,std,n,runs}`, `runs` each seed's figure;
`zeroshot_retention`; `environment`: this command's Python, package releases and CPU, and each protocol's
`environments`: those its stages' records hold, with the stages run in each), `results.md` and
`retention_vs_recall.png` into `--results-dir` (default: beside this file). The same code and seed train other
figures in another environment, so a figure is reproducible in its own; `check_rerun.py` compares a re-run of one
seed with the recorded figures.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

HERE = Path(__file__).resolve().parent
RETRIEVAL = tuple(f"{d}_{m}" for d in ("text_to_image", "image_to_text") for m in ("R@1", "R@5", "R@10", "mAP"))
WISE_ALPHAS = (0.25, 0.5, 0.75)
RERANK_TOP_K = 20
ONCE_SEED = 0
"""The seed of the stages trained once per protocol (the base and the teachers), whatever `--seeds` says."""
ONCE_MODELS = ("base", "teacher")
"""The models trained once per protocol, with `ONCE_SEED`; the fine-tuned ones are trained at every seed."""
# The releases results.md names beside each protocol (results.json holds the whole recorded environment).
ENVIRONMENT_SHOWN = ("python", "torch", "transformers", "accelerate", "timm", "numpy", "pillow", "onnxruntime")
"""The teacher re-ranks the base's top 20 images of each caption and captions of each image (retrieve, then re-rank,
as `dclip search --rerank` uses it): every pair of a 1,000-photo split (5 million) costs about 1.4 hours of this
CPU, the shortlists (120,000 pairs) 2 minutes (`time_teacher_pairs.py`)."""
DEFAULT_BUDGET = {
    "align": {
        "num_train_epochs": 10,
        "batch_size": 128,
        "learning_rate": 1e-3,
        "warmup_steps": 20,
        "train_text_tower": False,
    },
    "teacher": {
        "num_train_epochs": 5,
        "batch_size": 64,
        "learning_rate": 5e-4,
        "warmup_steps": 20,
        "fusion_dim": 256,
        "num_attention_heads": 4,
        "intermediate_size": 512,
        "dropout": 0.1,
        "regions": {"type": "yolo", "max_regions": 10, "conf": 0.25},
    },
    "finetune": {
        "num_train_epochs": 3,
        "batch_size": 64,
        "warmup_steps": 20,
        "logit_scale": 20.0,
        "freeze_patterns": [
            "text_model.*",
            "vision_model.timm_model.conv_stem.*",
            "vision_model.timm_model.bn1.*",
            "vision_model.timm_model.blocks.[0-4].*",
        ],
    },
}
"""Stage settings: every fine-tuned model gets `finetune` (same frozen blocks, epochs, batch), only its recipe and
learning rate differ. The teacher's YOLO `regions` read the `--detector` weights."""
ABLATIONS: dict[str, dict[str, Any]] = {
    "regions-none": {"teacher": {"regions": {"type": "grid", "scales": [2], "max_regions": 1}}},
    "regions-grid": {"teacher": {"regions": {"type": "grid", "scales": [2]}}},
    "epochs-2": {"teacher": {"num_train_epochs": 2}},
    "epochs-10": {"teacher": {"num_train_epochs": 10}},
    "width-128": {"teacher": {"fusion_dim": 128, "num_attention_heads": 2, "intermediate_size": 256}},
    "width-512": {"teacher": {"fusion_dim": 512, "num_attention_heads": 8, "intermediate_size": 1024}},
    "distill-weight-0.25": {"loss_weights": {"contrastive": 1.0, "image_distill": 0.25, "text_distill": 0.25}},
    "distill-weight-4": {"loss_weights": {"contrastive": 1.0, "image_distill": 4.0, "text_distill": 4.0}},
    "unfrozen-vision": {"finetune": {"freeze_patterns": ["text_model.*"]}, "plain": True},
}
"""Ablations of the DCLIP student, each one change from the protocol at the first seed and the learning rates chosen
for it: `teacher` changes train another teacher (evaluated as the base's re-ranker like the main one) and distil a
student from it; `loss_weights` replace the DCLIP student's term weights; `finetune` changes the fine-tuning budget,
also for plain fine-tuning when `plain` is set (its control). `regions-none` is the whole image alone (one region),
`regions-grid` the whole image and its 2x2 cells (5 regions; YOLO gives 3.8 on average, at most 10); `epochs-N` and
`width-N` are the teacher's epochs and fusion width (heads and FFN scaled with it)."""

REFERENCE: dict[str, Any] = {"teacher": {}, "plain": True}
"""The ablations' reference row, `protocol`: the protocol's own teacher (re-ranking), DCLIP student and plain
fine-tuning at the same seed, unchanged."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the full Flickr8k as a Karpathy folder")
    parser.add_argument("--cifar", required=True, help="CIFAR-10 test images (imagefolder layout)")
    parser.add_argument("--detector", required=True, help="YOLO weights for the teacher's regions (.pt or .onnx)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--protocols", nargs="+", default=["disjoint", "all"], choices=["disjoint", "all"])
    parser.add_argument("--pretrain-photos", type=int, default=3000, help="train photos the base is aligned on")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--budget", help="YAML file updating DEFAULT_BUDGET's stage settings")
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=[],
        choices=sorted(ABLATIONS),
        help="ablations to run after the protocol `--ablation-protocol`, in this order (see ABLATIONS)",
    )
    parser.add_argument("--ablation-protocol", default="disjoint", choices=["disjoint", "all"])
    parser.add_argument("--cifar-limit", type=int, default=0, help="first N images per class (0: all 1,000)")
    parser.add_argument("--output-dir", default="outputs/real_photos")
    parser.add_argument("--results-dir", default=str(HERE))
    args = parser.parse_args(argv)
    if args.ablations and args.ablation_protocol not in args.protocols:
        parser.error(f"--ablations run after protocol {args.ablation_protocol!r}, which --protocols does not name")
    return args


def load_results(path: Path, tool: str) -> dict[str, Any]:
    """A `results.json` this script wrote, read by `tool` (`check_rerun`, `merge_seeds`); `SystemExit` naming the
    file where it is missing or is not one."""
    try:
        found = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{tool}: {path} does not exist (a results.json of run_benchmark.py)") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{tool}: {path} is not JSON ({error})") from None
    if not isinstance(found, dict) or not isinstance(found.get("protocols"), dict):
        raise SystemExit(f"{tool}: {path} holds no `protocols` (not a results.json of run_benchmark.py)")
    return found


def environment_changes(
    before: dict[str, Any], after: dict[str, Any], ignored: tuple[str, ...] = ()
) -> dict[str, list[Any]]:
    """The entries in which two recorded environments differ, `{key: [before, after]}`, sorted by key; `ignored`
    entries left out."""
    return {
        key: [before.get(key), after.get(key)]
        for key in sorted(before | after)
        if key not in ignored and before.get(key) != after.get(key)
    }


def mean_std(runs: dict[int, float]) -> dict[str, Any]:
    """Mean and sample std of one figure over the seeds that trained it, and each seed's own (`runs`, keyed by the
    seed: what a re-run of one seed is compared with, `check_rerun.py`)."""
    values = list(runs.values())
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "runs": {str(seed): value for seed, value in runs.items()},
    }


class Benchmark:
    """One protocol's models, each trained and evaluated as a content-keyed stage."""

    def __init__(self, args: argparse.Namespace, protocol: str, budget: dict[str, dict], log=print):
        from modeling_dclip.data.spec import load_dataset_spec
        from modeling_dclip.feature_store import FeatureStore, images_fingerprint
        from modeling_dclip.pipeline import StageRunner, data_fingerprint

        self.args, self.protocol, self.budget, self.log = args, protocol, budget, log
        self.out = Path(args.output_dir) / protocol
        self.runner = StageRunner(self.out / "work", log)
        self.store = FeatureStore()
        flickr = load_dataset_spec(args.data)
        split = {
            name: flickr.filter(lambda s, n=name: s == n, input_columns="split") for name in ("train", "val", "test")
        }
        rows = list(range(len(split["train"])))
        random.Random(1234).shuffle(rows)  # a fixed list, whatever the seed
        pretrain_rows = sorted(rows[: args.pretrain_photos]) if protocol == "disjoint" else rows
        finetune_rows = sorted(rows[args.pretrain_photos :]) if protocol == "disjoint" else rows
        self.splits = {
            "pretrain": split["train"].select(pretrain_rows),
            "finetune": split["train"].select(finetune_rows),
            "val": split["val"],
            "test": split["test"],
        }
        self.cifar = load_dataset_spec(f"imagefolder:{args.cifar}")
        if args.cifar_limit:
            seen: dict[int, int] = {}
            keep = []
            for row, label in enumerate(self.cifar["label"]):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] <= args.cifar_limit:
                    keep.append(row)
            self.cifar = self.cifar.select(keep)
        self.fingerprints = {name: data_fingerprint(rows) for name, rows in self.splits.items()}
        self.cifar_fingerprint = {"rows": len(self.cifar), "images": images_fingerprint(self.cifar)}
        self.records = self.runner.records  # every stage's record by name, as the runner keeps them
        self.teachers: set[str] = set()

    def stage(self, name: str, config_class, fields: dict, inputs: dict, train) -> dict:
        from modeling_dclip.pipeline import _config_inputs
        from modeling_dclip.training import load_stage_config

        config = load_stage_config(
            config_class,
            output_dir=str(self.out / name),
            work_dir=str(self.out / "work" / name),
            eval_split="",
            image_size=self.args.image_size,
            # Checkpoints every 25 updates (a few minutes here): an interrupted stage resumes from its last one.
            **{"save_steps": 25, "resume_from_checkpoint": "latest", **fields},
        )
        return self.runner.run(
            name, self.out / name, {"config": _config_inputs(config), **inputs}, lambda: train(config)
        )

    def base(self) -> dict:
        from modeling_dclip.training import AlignConfig, align_base

        return self.stage(
            "base",
            AlignConfig,
            {"seed": ONCE_SEED, **self.budget["align"]},
            {"data": self.fingerprints["pretrain"]},
            lambda config: align_base(config, self.splits["pretrain"], store=self.store),
        )

    def teacher(self, name: str = "teacher", **changes) -> dict:
        """The teacher's fusion over the frozen base, trained on the fine-tuning photos; `changes` update its
        budget (an ablation)."""
        from modeling_dclip.pipeline import model_source_fingerprint
        from modeling_dclip.training import TeacherConfig, train_teacher

        settings = {**self.budget["teacher"], **changes}
        regions = dict(settings.pop("regions"))
        yolo = regions["type"] == "yolo"
        if yolo:
            regions["weights"] = self.args.detector
        fields = {"seed": ONCE_SEED, "base_model": str(self.out / "base"), "regions": regions, **settings}
        inputs = {
            "base": self.records["base"]["fingerprint"],
            "data": self.fingerprints["finetune"],
            "detector": model_source_fingerprint(self.args.detector) if yolo else None,
        }
        self.teachers.add(name)
        return self.stage(
            name,
            TeacherConfig,
            fields,
            inputs,
            lambda config: train_teacher(config, self.splits["finetune"], store=self.store),
        )

    def finetune(
        self, name: str, seed: int, recipe: str, learning_rate: float, teacher_folder: str = "teacher", **extra
    ) -> dict:
        """A student fine-tuned from the base with `recipe` (a recipe name; `extra` may replace its
        `loss_weights`), distilling from `teacher_folder` when the recipe reads the DCLIP teacher."""
        from modeling_dclip.evaluation import validator
        from modeling_dclip.training import DistillConfig, distill_student

        # Plain fine-tuning and Knowledge-CLIP read no image teacher; ConaCLIP's teacher encoders are the frozen base.
        teacher = {"contrastive": None, "knowledge_clip": None, "conaclip": str(self.out / "base")}.get(
            recipe, str(self.out / teacher_folder)
        )
        reads_teacher = teacher == str(self.out / teacher_folder)
        fields = {
            "seed": seed,
            "base_model": str(self.out / "base"),
            "teacher_model": teacher,
            "loss_weights": recipe,
            "learning_rate": learning_rate,
            **self.budget["finetune"],
            **extra,
        }
        inputs = {
            "base": self.records["base"]["fingerprint"],
            "data": self.fingerprints["finetune"],
            "val": self.fingerprints["val"],
            "teacher": self.records[teacher_folder]["fingerprint"] if reads_teacher else None,
        }
        evaluate = validator(self.splits["val"], 64)
        return self.stage(
            name,
            DistillConfig,
            fields,
            inputs,
            lambda config: distill_student(config, self.splits["finetune"], evaluate, store=self.store),
        )

    def base_similarity(self, split: str, base: tuple) -> torch.Tensor:
        """The base's (`(model, processor)`) caption x image cosine similarity on `split`: the teacher's first
        stage."""
        from modeling_dclip.data.captions import caption_pairs

        model, processor = base
        images = self.store.image_embeddings(model, processor, self.splits[split])
        texts = self.store.text_embeddings(model, processor, caption_pairs(self.splits[split]).captions)
        return texts @ images.T

    def evaluate(self, name: str, folder: str, wise_alpha: float = 1.0) -> dict[str, float]:
        """Test retrieval (teacher: re-ranking the base's top-k) and, for dual encoders, CIFAR-10 zero-shot;
        content-keyed."""
        from modeling_dclip.atomic import write_json_atomically
        from modeling_dclip.evaluation import evaluate_model
        from modeling_dclip.loading import load_model_and_processor

        model_record = self.records[folder]
        teacher = folder in self.teachers
        target = self.out / "work" / "evaluation" / f"{name}"

        def run() -> None:
            model, processor = load_model_and_processor(self.out / folder, device="cpu")
            base = load_model_and_processor(self.out / "base", device="cpu") if teacher or wise_alpha < 1.0 else None
            if wise_alpha < 1.0:
                from modeling_dclip.training.distill import wise_ft

                wise_ft(model, base[0], wise_alpha)

            def retrieval(split: str) -> dict[str, float]:
                if not teacher:
                    return evaluate_model(model, processor, self.splits[split], ["retrieval"], store=self.store)
                shortlist = {"first_stage": self.base_similarity(split, base), "rerank_top_k": RERANK_TOP_K}
                return evaluate_model(
                    model, processor, self.splits[split], ["retrieval"], store=self.store, **shortlist
                )

            metrics = retrieval("test")
            if not teacher:
                cifar = evaluate_model(
                    model, processor, self.cifar, ["zeroshot"], templates="cifar10", store=self.store
                )
                metrics["cifar10_top1"] = cifar["zeroshot_top1"]
            if folder == "base" or teacher:  # what a teacher adds over its base, on photos it never saw
                metrics.update({f"val_{key}": value for key, value in retrieval("val").items()})
            write_json_atomically(target / "metrics.json", metrics)

        inputs = {
            "model": model_record["fingerprint"],
            "wise_alpha": wise_alpha,
            "test": self.fingerprints["test"],
            "cifar": self.cifar_fingerprint,
            "version": 3,
            "rerank_top_k": RERANK_TOP_K if teacher else None,
        }
        self.runner.run(f"evaluate_{name}", target, inputs, run)
        return json.loads((target / "metrics.json").read_text())


def best_val(bench: Benchmark, record: dict) -> dict[str, float]:
    """A fine-tuning stage's val R@1 both ways at its best epoch (the highest sum: the one it keeps)."""
    summary = json.loads((bench.out / record["stage"] / "training_complete.json").read_text())
    best = max(summary["history"], key=lambda row: row["text_to_image_R@1"] + row["image_to_text_R@1"])
    return {f"val_{key}": best[key] for key in ("text_to_image_R@1", "image_to_text_R@1")}


def select_learning_rate(bench: Benchmark, name: str, recipe: str, learning_rates: list[float]) -> float:
    """The learning rate whose best epoch has the highest val R@1 (both directions summed), at the first seed."""
    scores = {}
    for rate in learning_rates:
        record = bench.finetune(f"{name}-lr{rate:g}-seed{bench.args.seeds[0]}", bench.args.seeds[0], recipe, rate)
        scores[rate] = sum(best_val(bench, record).values())
    bench.log(f"[real_photos] {name}: val R@1 sums by learning rate {scores}")
    return max(scores, key=scores.get)


def run_protocol(bench: Benchmark) -> dict[str, Any]:
    """The protocol's models: base, teacher, the four fine-tuned students at every seed, the WiSE-FT curve."""
    args = bench.args
    bench.base()
    bench.teacher()
    # label -> seed -> figures
    per_model: dict[str, dict[int, dict[str, float]]] = {
        label: {ONCE_SEED: bench.evaluate(label, label)} for label in ONCE_MODELS
    }
    rates = {
        "plain fine-tuning": select_learning_rate(bench, "plain", "contrastive", args.learning_rates),
        "DCLIP student": select_learning_rate(bench, "dclip", "dclip", args.learning_rates),
    }
    recipes = {
        "plain fine-tuning": ("plain", "contrastive", rates["plain fine-tuning"]),
        "DCLIP student": ("dclip", "dclip", rates["DCLIP student"]),
        "ConaCLIP student": ("conaclip", "conaclip", rates["DCLIP student"]),
        "Knowledge-CLIP student": ("knowledge", "knowledge_clip", rates["DCLIP student"]),
    }
    for seed in args.seeds:
        for label, (name, recipe, rate) in recipes.items():
            extra = {"text_teacher_model": "dclip-embedded/all-MiniLM-L6-v2"} if recipe == "knowledge_clip" else {}
            folder = f"{name}-lr{rate:g}-seed{seed}"
            bench.finetune(folder, seed, recipe, rate, **extra)
            per_model.setdefault(label, {})[seed] = bench.evaluate(folder, folder)
        for alpha in WISE_ALPHAS:
            folder = f"dclip-lr{rates['DCLIP student']:g}-seed{seed}"
            label = f"DCLIP student WiSE-FT {alpha:g}"
            per_model.setdefault(label, {})[seed] = bench.evaluate(f"{folder}-wise{alpha:g}", folder, alpha)
    base_cifar = per_model["base"][ONCE_SEED]["cifar10_top1"]
    models = {
        label: {key: mean_std({seed: run[key] for seed, run in runs.items()}) for key in next(iter(runs.values()))}
        for label, runs in per_model.items()
    }
    retention = {
        label: mean_std({seed: run["cifar10_top1"] / base_cifar for seed, run in runs.items()})
        for label, runs in per_model.items()
        if "cifar10_top1" in next(iter(runs.values()))
    }
    return {
        "models": models,
        "zeroshot_retention": retention,
        "learning_rates": rates,
        "splits": {name: len(rows) for name, rows in bench.splits.items()},
        "cifar_images": len(bench.cifar),
        "timings_s": bench.runner.timings,  # the runner's own record: the ablations' stages join it later
    }


def run_ablation(bench: Benchmark, name: str, learning_rates: dict[str, float]) -> dict[str, Any]:
    """One ablation (`ABLATIONS[name]`; `"protocol"`: no change, the protocol's own models) at the first seed: its
    teacher re-ranking val and test, its DCLIP student, and plain fine-tuning under the same change when it is a
    change of the fine-tuning budget; students' val R@1 at their best epoch, test and CIFAR-10 as in the protocol."""
    change = {"protocol": REFERENCE, **ABLATIONS}[name]
    seed = bench.args.seeds[0]
    suffix = "" if change is REFERENCE else f"-{name}"  # the reference's models are the protocol's own
    teacher_folder = f"teacher{suffix}" if change.get("teacher") else "teacher"
    models: dict[str, dict[str, float]] = {}
    if "teacher" in change:
        bench.teacher(teacher_folder, **change.get("teacher", {}))
        models["teacher"] = bench.evaluate(teacher_folder, teacher_folder)
    extra = dict(change.get("finetune", {}))
    if "loss_weights" in change:
        extra["loss_weights"] = change["loss_weights"]
    students = {"DCLIP student": ("dclip", "dclip")}
    if change.get("plain"):
        students["plain fine-tuning"] = ("plain", "contrastive")
    for label, (prefix, recipe) in students.items():
        rate = learning_rates[label]
        folder = f"{prefix}{suffix}-lr{rate:g}-seed{seed}"
        record = bench.finetune(folder, seed, recipe, rate, teacher_folder, **extra)
        models[label] = {**best_val(bench, record), **bench.evaluate(folder, folder)}
    return {"change": change, "seed": seed, "models": models}


def ablation_table(found: dict[str, Any]) -> list[str]:
    """Markdown lines of a protocol's ablations: val R@1 (teacher: re-ranking the base's top-k; students: their best
    epoch), test R@1 and CIFAR-10 retention, one seed."""
    base_cifar = found["models"]["base"]["cifar10_top1"]["mean"]
    seed = next(iter(found["ablations"].values()))["seed"]
    lines = [
        f"### Ablations (seed {seed}; `protocol`: no change)",
        "",
        "| ablation | model | val t2i R@1 | val i2t R@1 | test t2i R@1 | test i2t R@1 | retention |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ablation in found["ablations"].items():
        for label, metrics in ablation["models"].items():
            cells = [
                f"{100 * metrics[key]:.1f}" if key in metrics else "–"
                for key in (
                    "val_text_to_image_R@1",
                    "val_image_to_text_R@1",
                    "text_to_image_R@1",
                    "image_to_text_R@1",
                )
            ]
            kept = metrics.get("cifar10_top1")
            cells.append(f"{100 * kept / base_cifar:.1f}" if kept is not None else "–")
            lines.append(f"| {name} | {label} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def environment_line(environment: dict[str, Any]) -> str:
    """The environment a stage record holds, in one line: the releases that decide its figures, and the CPU."""
    releases = ", ".join(f"{name} {environment[name]}" for name in ENVIRONMENT_SHOWN)
    return (
        f"{releases}; {environment['cpu'] or 'CPU'} ({environment['torch_cpu_capability']}, "
        f"{environment['torch_threads']} threads), CUDA {environment['cuda_device'] or 'none'}"
    )


def write_results(results: dict[str, Any], folder: Path) -> None:
    from modeling_dclip.atomic import write_json_atomically, write_text_atomically

    for found in results["protocols"].values():
        # The recorded seconds of every stage in `timings_s` (the protocol's and its ablations'), summed: a run that
        # reuses finished stages still reports what they cost.
        found["stages_s_total"] = round(sum(found["timings_s"].values()), 1)
    write_json_atomically(folder / "results.json", results)
    lines = ["# Real-photo benchmark v2: results", "", f"Command: `{results['command']}`", ""]
    for protocol, found in results["protocols"].items():
        lines += [
            f"## Protocol `{protocol}` (splits {found['splits']}, CIFAR-10 {found['cifar_images']} images, "
            f"learning rates chosen on val: {found['learning_rates']})",
            "",
            "| model | " + " | ".join(RETRIEVAL) + " | CIFAR-10 top-1 | retention |",
            "|---|" + "---|" * (len(RETRIEVAL) + 2),
        ]
        for label, metrics in found["models"].items():
            cells = [
                f"{100 * metrics[k]['mean']:.1f} ± {100 * metrics[k]['std']:.1f}" if k in metrics else "–"
                for k in (*RETRIEVAL, "cifar10_top1")
            ]
            kept = found["zeroshot_retention"].get(label)
            cells.append(f"{100 * kept['mean']:.1f} ± {100 * kept['std']:.1f}" if kept else "–")
            lines.append(f"| {label} (n={next(iter(metrics.values()))['n']}) | " + " | ".join(cells) + " |")
        lines.append("")
        groups = found["environments"]
        for group in groups:
            where = environment_line(group["environment"]) if group["environment"] else "not recorded"
            if group is not groups[0] and group["environment"] and groups[0]["environment"]:
                # What sets this group apart from the first, which the one-line summary may not show (the kernel
                # build in `platform`, for one).
                changes = environment_changes(groups[0]["environment"], group["environment"])
                where += "; differs from the first in " + ", ".join(
                    f"{key} ({first} -> {this})" for key, (first, this) in changes.items()
                )
            lines += [f"Environment of {len(group['stages'])} stages: {where}", ""]
        if found.get("ablations"):
            lines += ablation_table(found)
    write_text_atomically(folder / "results.md", "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    # One colour per model, one marker per protocol, the seed std as error bars; a legend beside the axes rather than
    # labels at the points, which overlap where models lie close.
    figure, axis = plt.subplots(figsize=(8, 4))
    colours: dict[str, Any] = {}
    for protocol, found in results["protocols"].items():
        for label, kept in found["zeroshot_retention"].items():
            recall = found["models"][label]["text_to_image_R@1"]
            colour = colours.setdefault(label, f"C{len(colours) % 10}")
            axis.errorbar(
                100 * recall["mean"],
                100 * kept["mean"],
                xerr=100 * recall["std"],
                yerr=100 * kept["std"],
                fmt="o" if protocol == "disjoint" else "s",
                color=colour,
                capsize=2,
                label=f"{label} ({protocol}, n={recall['n']})",
            )
    axis.set_xlabel("Flickr8k test text-to-image R@1 (%), mean ± seed std")
    axis.set_ylabel("CIFAR-10 zero-shot retention (%)")
    axis.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=6)
    figure.tight_layout()
    figure.savefig(folder / "retention_vs_recall.png", dpi=150)


def main(argv: list[str] | None = None) -> None:
    import sys

    import yaml

    from modeling_dclip.environment import recorded_environment

    args = parse_args(argv)
    budget = json.loads(json.dumps(DEFAULT_BUDGET))
    if args.budget:
        for stage, fields in (yaml.safe_load(Path(args.budget).read_text()) or {}).items():
            budget[stage].update(fields)
    results: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]),
        "budget": budget,
        "image_size": args.image_size,
        "seeds": args.seeds,
        # This command's; each protocol's `environments` say where its stages ran (their records).
        "environment": recorded_environment(),
        "protocols": {},
    }
    for protocol in args.protocols:
        bench = Benchmark(args, protocol, budget)
        found = results["protocols"][protocol] = run_protocol(bench)
        found["environments"] = bench.runner.environments()
        write_results(results, Path(args.results_dir))
        if protocol != args.ablation_protocol:
            continue
        found["ablations"] = {}
        # "protocol" (no change) first, as their reference; results written after each, so a stop keeps the rest
        for name in ["protocol", *args.ablations] if args.ablations else []:
            found["ablations"][name] = run_ablation(bench, name, found["learning_rates"])
            found["environments"] = bench.runner.environments()
            write_results(results, Path(args.results_dir))


if __name__ == "__main__":
    main()
