"""The whole DCLIP pipeline in one call (`dclip run`): data, base, teacher, student, evaluation, results.

Every stage writes its result atomically and is reused by a later run unless `overwrite`; a stage that fails is
reported by name with its error, and what finished before it stays on disk.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from .align import align_base
from .checkpointing import is_complete, write_json_atomically
from .config import AlignConfig, DistillConfig, TeacherConfig, load_stage_config

logger = logging.getLogger(__name__)

MODEL_NAMES = ("base", "teacher", "student")


@dataclass
class RunPreset:
    """Sizes and per-stage settings of a pipeline run; `align`, `teacher`, `distill` override stage config fields.

    Args:
        pretrain_images / train_images / val_images / test_images: synthetic scenes per split (ignored with
            `data`). `align_base` stands in for CLIP's pre-training, so it learns from its own `pretrain` scenes:
            as CLIP never saw DCLIP's fine-tuning pairs, the base has not memorised the scenes the teacher and the
            student learn from (aligned on those, it retrieves them almost perfectly and leaves nothing to learn).
            `val` selects the student's best epoch; `test` is only evaluated.
        scene_size: side of the generated scenes in pixels.
        image_size: the towers' input size (the processor resizes to it).
        data: a dataset spec with train/test (and optionally pretrain, val) splits instead of synthetic scenes;
            without a `pretrain` split the base is aligned on `train`.
        regions: region extractor settings of the teacher, for datasets without boxes.
        use_dataset_boxes: regions from the dataset's `boxes` column when it has one (the synthetic scenes' exact
            object boxes, standing in for a detector trained on the domain), else from `regions`.
    """

    pretrain_images: int = 640
    train_images: int = 640
    val_images: int = 100
    test_images: int = 100
    scene_size: int = 128
    image_size: int = 128
    seed: int = 0
    data: str | None = None
    regions: dict = field(default_factory=lambda: {"type": "grid", "scales": [2]})
    use_dataset_boxes: bool = True
    align: dict = field(default_factory=dict)
    teacher: dict = field(default_factory=dict)
    distill: dict = field(default_factory=dict)


PRESETS: dict[str, dict[str, Any]] = {
    # Fits the 10-minute budget on a 2-core CPU.
    "default": {
        "align": {
            "num_train_epochs": 40,
            "batch_size": 64,
            "learning_rate": 2e-3,
            "warmup_steps": 10,
            "train_text_tower": False,
        },
        "teacher": {
            "objective": "pairwise",
            "num_train_epochs": 20,
            "batch_size": 32,
            "learning_rate": 1e-3,
            "warmup_steps": 10,
            "fusion_dim": 64,
            "num_attention_heads": 2,
            "intermediate_size": 128,
        },
        "distill": {
            "num_train_epochs": 5,
            "batch_size": 32,
            "learning_rate": 3e-4,
            "warmup_steps": 5,
            "freeze_patterns": [
                "text_model.*",
                "vision_model.timm_model.conv_stem.*",
                "vision_model.timm_model.bn1.*",
                "vision_model.timm_model.blocks.[0-4].*",
            ],
        },
    },
    # For tests: a few images, one short epoch per stage.
    "tiny": {
        "pretrain_images": 32,
        "train_images": 32,
        "val_images": 8,
        "test_images": 16,
        "scene_size": 64,
        "image_size": 64,
        "align": {"num_train_epochs": 2, "batch_size": 16, "learning_rate": 2e-3, "train_text_tower": False},
        "teacher": {
            "num_train_epochs": 1,
            "batch_size": 16,
            "fusion_dim": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "distill": {
            "num_train_epochs": 1,
            "batch_size": 16,
            "freeze_patterns": [
                "text_model.*",
                "vision_model.timm_model.conv_stem.*",
                "vision_model.timm_model.bn1.*",
                "vision_model.timm_model.blocks.[0-5].*",
            ],
        },
    },
    # Closer to the paper's scale; hours on CPU.
    "large": {
        "pretrain_images": 10000,
        "train_images": 5000,
        "val_images": 200,
        "test_images": 1000,
        "scene_size": 224,
        "image_size": 224,
        "align": {"num_train_epochs": 10, "batch_size": 128, "learning_rate": 1e-4, "unlock_text_layers": -1},
        "teacher": {
            "num_train_epochs": 10,
            "batch_size": 64,
            "learning_rate": 1e-4,
            "fusion_dim": 256,
            "num_attention_heads": 4,
            "intermediate_size": 1024,
        },
        "distill": {"num_train_epochs": 2, "batch_size": 64, "learning_rate": 1e-5},
    },
}


def load_preset(name: str = "default", config_file: str | Path | None = None, **overrides) -> RunPreset:
    """A preset by name, updated by a YAML file and keyword overrides (stage dicts are merged, not replaced)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    values: dict[str, Any] = json.loads(json.dumps(PRESETS[name]))
    updates: list[dict[str, Any]] = []
    if config_file is not None:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_file}: expected a mapping of preset fields")
        updates.append(loaded)
    updates.append({k: v for k, v in overrides.items() if v is not None})
    for update in updates:
        for key, value in update.items():
            if key not in RunPreset.__dataclass_fields__:
                raise ValueError(f"unknown preset field {key!r}; fields: {sorted(RunPreset.__dataclass_fields__)}")
            if key in ("align", "teacher", "distill") and isinstance(value, dict):
                values[key] = {**values.get(key, {}), **value}
            else:
                values[key] = value
    precisions = {values.get(stage, {}).get("mixed_precision") for stage in ("align", "teacher", "distill")}
    if len(precisions) > 1:
        # The stages run in this one process, and accelerate keeps one mixed precision per process.
        raise ValueError(
            f"align, teacher and distill must share one mixed_precision, got {sorted(map(str, precisions))}"
        )
    return RunPreset(**values)


class StageError(RuntimeError):
    """A pipeline stage failed; the message names the stage and the cause."""


def _versions() -> dict[str, str]:
    found = {}
    for name in ("dclip", "torch", "transformers", "accelerate", "datasets", "timm", "peft"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _prepare_data(preset: RunPreset, data_dir: Path) -> datasets.DatasetDict:
    if (data_dir / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(data_dir))
    if preset.data:
        from ..data.spec import load_dataset_spec

        dataset = load_dataset_spec(preset.data)
        names = sorted(set(dataset["split"]))
        missing = {"train", "test"} - set(names)
        if missing:
            raise ValueError(f"--data {preset.data}: needs 'train' and 'test' splits, has {names}")
        splits = datasets.DatasetDict({n: dataset.filter(lambda s, n=n: s == n, input_columns="split") for n in names})
    else:
        from ..data.synthetic import make_synthetic_splits

        sizes = {
            "pretrain": preset.pretrain_images,
            "train": preset.train_images,
            "val": preset.val_images,
            "test": preset.test_images,
        }
        splits = make_synthetic_splits(
            {name: n for name, n in sizes.items() if n}, seed=preset.seed, image_size=preset.scene_size
        )
    temporary = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    splits.save_to_disk(str(temporary))
    shutil.rmtree(data_dir, ignore_errors=True)
    temporary.rename(data_dir)
    return datasets.load_from_disk(str(data_dir))


def run_pipeline(
    output_dir: str | Path, preset: RunPreset, overwrite: bool = False, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run (or resume) the pipeline into `output_dir`: `base/`, `teacher/`, `student/`, `results.json`,
    `results.md`, and `work/` (data, caches, checkpoints). Returns the results dict.

    Raises:
        StageError: naming the stage that failed and why.
    """
    from ..modeling_dclip import DCLIPModel, DCLIPTeacherModel
    from ..processing_dclip import DCLIPProcessor
    from .evaluation import evaluate_dual_encoder, evaluate_teacher
    from .features import cached, region_features

    out = Path(output_dir)
    work = out / "work"
    if overwrite:
        for name in (*MODEL_NAMES, "work", "results.json", "results.md"):
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    timings_file = work / "timings.json"
    if timings_file.is_file():
        timings.update(json.loads(timings_file.read_text()))

    def stage(name: str, done: bool, action: Callable[[], Any]) -> Any:
        if done:
            log(f"[dclip run] {name}: reusing the finished result")
            return None
        log(f"[dclip run] {name}: running")
        start = time.perf_counter()
        try:
            result = action()
        except KeyboardInterrupt:
            raise
        except Exception as error:
            raise StageError(f"stage '{name}' failed: {type(error).__name__}: {error}") from error
        timings[name] = round(time.perf_counter() - start, 2)
        write_json_atomically(timings_file, timings)
        log(f"[dclip run] {name}: done in {timings[name]:.1f} s")
        return result

    data_dir = work / "data"
    splits = (
        stage("data", False, lambda: _prepare_data(preset, data_dir))
        if not (data_dir / "dataset_dict.json").is_file()
        else None
    )
    splits = splits or datasets.load_from_disk(str(data_dir))
    train, val = splits["train"], splits["val"] if "val" in splits else None
    common = {"seed": preset.seed, "image_size": preset.image_size, "eval_split": ""}
    use_boxes = preset.use_dataset_boxes and "boxes" in train.column_names

    align_config = load_stage_config(
        AlignConfig,
        **{
            **common,
            "output_dir": str(out / "base"),
            "work_dir": str(work / "base"),
            "region_config": preset.regions,
            **preset.align,
        },
    )
    if "pretrain" not in splits:
        log(
            "[dclip run] no 'pretrain' split: the base is aligned on 'train', "
            "the split the teacher and student learn from"
        )
    pretrain = splits["pretrain"] if "pretrain" in splits else train
    stage("align_base", is_complete(out / "base"), lambda: align_base(align_config, pretrain))
    teacher_config = load_stage_config(
        TeacherConfig,
        **{
            **common,
            "base_model": str(out / "base"),
            "output_dir": str(out / "teacher"),
            "work_dir": str(work / "teacher"),
            "regions": preset.regions,
            "use_dataset_boxes": use_boxes,
            **preset.teacher,
        },
    )
    from .teacher import train_teacher

    # No validation for the teacher: scoring every (caption, image) pair each epoch would cost more than training it.
    stage("train_teacher", is_complete(out / "teacher"), lambda: train_teacher(teacher_config, train))
    distill_config = load_stage_config(
        DistillConfig,
        **{
            **common,
            "base_model": str(out / "base"),
            "teacher_model": str(out / "teacher"),
            "output_dir": str(out / "student"),
            "work_dir": str(work / "student"),
            "use_dataset_boxes": use_boxes,
            **preset.distill,
        },
    )
    from .distill import distill_student

    # The teacher's targets come from the features cached while training it, not from a second pass.
    targets_cache = work / "student" / "teacher_targets.safetensors"
    if not targets_cache.is_file() and not is_complete(out / "student"):

        def targets():
            from .data import CaptionTable
            from .features import teacher_targets, text_features

            teacher = DCLIPTeacherModel.from_pretrained(str(out / "teacher")).eval()
            processor = DCLIPProcessor.from_pretrained(str(out / "teacher"))
            table = CaptionTable.from_dataset(train)
            regions = cached(
                work / "teacher" / "train_regions.safetensors",
                lambda: region_features(teacher, processor, train, use_dataset_boxes=use_boxes),
            )
            texts = cached(
                work / "teacher" / "train_texts.safetensors", lambda: text_features(teacher, processor, table.captions)
            )
            return cached(targets_cache, lambda: teacher_targets(teacher, regions, texts, table.caption_to_image))

        stage("teacher_targets", False, targets)
    # The student's best epoch is chosen on `val` (never on `test`) when there is one.
    stage("distill_student", is_complete(out / "student"), lambda: distill_student(distill_config, train, val))

    test = splits["test"]
    models: dict[str, dict[str, float]] = {}
    for name in MODEL_NAMES:
        result_file = work / f"eval_{name}.json"
        if result_file.is_file():
            models[name] = json.loads(result_file.read_text())
            continue

        def evaluate(name: str = name) -> dict[str, float]:
            processor = DCLIPProcessor.from_pretrained(str(out / name))
            if name == "teacher":
                teacher = DCLIPTeacherModel.from_pretrained(str(out / name)).eval()
                regions = cached(
                    work / "teacher" / "test_regions.safetensors",
                    lambda: region_features(teacher, processor, test, use_dataset_boxes=use_boxes),
                )
                return evaluate_teacher(teacher, processor, test, regions)
            return evaluate_dual_encoder(DCLIPModel.from_pretrained(str(out / name)), processor, test)

        models[name] = stage(f"evaluate_{name}", False, evaluate)
        write_json_atomically(result_file, models[name])

    results = {
        "models": models,
        "dataset": {
            "spec": preset.data or f"synthetic scenes (seed {preset.seed})",
            "splits": {split: len(rows) for split, rows in splits.items()},
            "evaluated_on": "test",
            "regions": "dataset boxes (exact object boxes, standing in for a trained detector)"
            if use_boxes
            else preset.regions,
        },
        "config": {
            "preset": asdict(preset),
            "align_base": align_config.to_dict(),
            "train_teacher": teacher_config.to_dict(),
            "distill_student": distill_config.to_dict(),
        },
        "versions": _versions(),
        "timings_s": timings,
    }
    write_json_atomically(out / "results.json", results)
    (out / "results.md.tmp").write_text(results_markdown(results))
    (out / "results.md.tmp").replace(out / "results.md")
    return results


def results_markdown(results: dict[str, Any]) -> str:
    """A Markdown table of `results["models"]` (percentages) with the per-stage timings."""
    models = results["models"]
    keys = sorted({k for metrics in models.values() for k in metrics if k != "n"})
    lines = [
        "# dclip run results",
        "",
        f"Dataset: {results['dataset']['spec']}, splits {results['dataset']['splits']}; evaluated on test.",
        "",
    ]
    lines.append("| metric | " + " | ".join(models) + " |")
    lines.append("|---|" + "---|" * len(models))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{100 * models[m].get(key, float('nan')):.1f}" for m in models) + " |")
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()), ""]
    return "\n".join(lines)
