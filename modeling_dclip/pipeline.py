"""The whole DCLIP pipeline in one call (`dclip run`): data, base, teacher, student, evaluation, results.

Every stage is identified by a fingerprint of everything that determines its result: its resolved config, the
fingerprints of its inputs (the data's content, the models it starts from, the region settings), the seed, and the
version of the code that trains it (`TrainingConfig.training_version`). Its output folder holds a record
(`stage.json`: the fingerprint, the inputs it was computed from, and the environment it ran in, which is
recorded, not part of the fingerprint), written last. A later run reuses a finished
stage only when its fingerprint matches, and otherwise says which inputs changed and recomputes it (and, through
their fingerprints, every stage after it). A stage that fails is reported by name, and what finished before it stays
on disk; rerunning the same command resumes, an unfinished training stage from its last checkpoint (`StageRunner`). A
lock file keeps a second run out of the same folder. Expensive features (tower features, regions, token states,
teacher targets) come from the feature store, keyed by content, so a recomputed stage reuses whatever of them still
applies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import yaml

from .atomic import atomic_path, write_json_atomically, write_text_atomically
from .environment import distribution_version, recorded_environment
from .feature_store import DatasetBoxes, FeatureStore, digest, file_digest, images_fingerprint, texts_fingerprint
from .training.config import AlignConfig, DistillConfig, TeacherConfig, load_stage_config

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
        regions: region extractor settings of the teacher, for datasets without boxes (and without `detector`).
        use_dataset_boxes: regions from the dataset's `boxes` column when it has one (the synthetic scenes' exact
            object boxes, standing in for a detector trained on the domain), else from `detector` or `regions`.
        base_model: start from this model instead of aligning one, as the DCLIP paper starts from CLIP: a
            `CLIPModel` checkpoint (Hub id such as `openai/clip-vit-base-patch16`, or a folder) or a saved
            `DCLIPModel`; the base is that model unchanged.
        detector: YOLO weights for the teacher's regions (ultralytics: a name such as `yolov8x.pt`, a local `.pt`,
            or an exported `.onnx`), with `detector_conf`, `max_regions` (including the whole image) and
            `detector_classes` (class ids kept; all when empty).
        save_steps: each training stage saves a checkpoint every N optimizer updates (and keeps the newest two),
            from which an interrupted run resumes when rerun; 0: an interrupted stage restarts.
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
    base_model: str | None = None
    detector: str | None = None
    detector_conf: float = 0.25
    max_regions: int = 10
    detector_classes: list | None = None
    save_steps: int = 50
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


class RunLockedError(RuntimeError):
    """Another `dclip run` is using the output folder."""


STAGE_RECORD = "stage.json"
"""Written last into a finished stage's folder: the stage's fingerprint and the inputs it was computed from."""
WORK_MARK = "stage_work.json"
"""Written first into a stage's work folder: the fingerprint of the inputs its checkpoints belong to."""
LOCK_FILE = ".dclip-run.lock"
MODEL_NAMES = ("base", "teacher", "student")
_UNRESULTFUL_FIELDS = (
    "output_dir",
    "work_dir",
    "data",
    "base_model",
    "teacher_model",
    "init_from",
    "resume_from_checkpoint",
    "report_to",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_batch_size",
)
"""Config fields that do not decide a stage's result (paths are replaced by the fingerprints of what they hold)."""


@contextlib.contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.dclip-run.lock` for the whole run; a second run in the same folder is refused at once.

    Raises:
        RunLockedError: naming the folder and the process that holds it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunLockedError(
                f"{folder} is being written by another dclip run (pid {holder}); wait for it to finish or choose "
                "another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted names of the fields whose values differ between two (nested) input records."""
    before, after = (
        _flatten(json.loads(json.dumps(old, default=str))),
        _flatten(json.loads(json.dumps(new, default=str))),
    )
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def model_source_fingerprint(name_or_path: str) -> str:
    """What identifies a model a stage starts from: the content of a local folder or file (weights, configs,
    tokenizer files), the embedded towers' weights, or else the Hub id as given."""
    from .towers import EMBEDDED_TEXT, EMBEDDED_VISION, embedded_text_path, embedded_vision_weights_path

    path = {EMBEDDED_VISION: embedded_vision_weights_path, EMBEDDED_TEXT: embedded_text_path}.get(name_or_path)
    path = Path(path()) if path is not None else Path(name_or_path)
    if path.is_file():
        return file_digest(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".lock" and STAGE_RECORD != p.name)
        return digest([(str(p.relative_to(path)), file_digest(p)) for p in files])
    return f"hub:{name_or_path}"


def _config_inputs(config) -> dict[str, Any]:
    """A training stage's settings that decide its result, with the version of the code that trains it."""
    settings = {key: value for key, value in config.to_dict().items() if key not in _UNRESULTFUL_FIELDS}
    return {**settings, "training_version": type(config).training_version}


class StageRunner:
    """Runs stages whose finished results are reused only for the inputs that produced them (module docstring).

    A stage's work folder (`work/<name>`: its checkpoints, best epoch and logs) is marked with the fingerprint it
    works for. An interrupted stage rerun for the same inputs keeps it, so that its training resumes from its last
    checkpoint (the stages train with `resume_from_checkpoint: latest`); for other inputs it is emptied first. A
    finished stage's checkpoints are deleted once its record is written.

    A resumed stage's recorded `seconds` include its earlier attempts, each counted from its start to the last file
    it wrote into the work folder (an attempt may have been killed without a chance to say when it stopped); the
    time it spent after that is lost work, and not counted.
    """

    def __init__(self, work: Path, log: Callable[[str], None]):
        self.work, self.log = work, log
        self.records: dict[str, dict[str, Any]] = {}  # the stages run or reused through this runner, by name
        self.timings_file = work / "timings.json"
        self.timings: dict[str, float] = (
            json.loads(self.timings_file.read_text()) if self.timings_file.is_file() else {}
        )

    def run(self, name: str, folder: Path, inputs: dict[str, Any], action: Callable[[], Any]) -> dict[str, Any]:
        """The record of stage `name`, whose result lives in `folder`: read back when its fingerprint matches
        `inputs`, else computed by `action()` (which writes `folder`, and trains in `work/<name>`).

        Raises:
            StageError: naming the stage and the cause.
        """
        from .training.loop import CHECKPOINTS, checkpoint_folders

        inputs = json.loads(json.dumps(inputs, default=str))
        fingerprint = digest(inputs)
        record_file = folder / STAGE_RECORD
        work_dir, work_mark = self.work / name, self.work / name / WORK_MARK
        mark = json.loads(work_mark.read_text()) if work_mark.is_file() else {}
        unfinished = mark.get("fingerprint") == fingerprint
        saved = [p for p in work_dir.rglob("*") if p.is_file() and p != work_mark] if unfinished else []
        resumed, seconds_before = False, 0.0
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            if record.get("fingerprint") == fingerprint:
                self.log(f"[dclip run] {name}: reusing the finished result (same inputs)")
                self.records[name] = record
                return record
            changed = changed_fields(record.get("inputs", {}), inputs)
            self.log(f"[dclip run] {name}: inputs changed ({', '.join(changed)}); recomputing")
        elif saved:
            resumed, seconds_before = True, _seconds_worked(saved, work_mark, mark)
            where = "its last checkpoint" if checkpoint_folders(work_dir) else "the files it saved"
            self.log(f"[dclip run] {name}: resuming its unfinished run (same inputs) from {where}")
        elif unfinished:
            self.log(f"[dclip run] {name}: running again (its unfinished run saved nothing to resume from)")
        else:
            self.log(f"[dclip run] {name}: running")
        shutil.rmtree(folder, ignore_errors=True)
        if not resumed:
            shutil.rmtree(work_dir, ignore_errors=True)
        mark = {"stage": name, "fingerprint": fingerprint, "started": time.time(), "seconds_before": seconds_before}
        write_json_atomically(work_mark, mark)
        start = time.perf_counter()
        try:
            action()
        except KeyboardInterrupt:
            raise
        except Exception as error:
            raise StageError(f"stage '{name}' failed: {type(error).__name__}: {error}") from error
        seconds = round(seconds_before + time.perf_counter() - start, 2)
        record = {
            "stage": name,
            "fingerprint": fingerprint,
            "inputs": inputs,
            "seconds": seconds,
            "resumed": resumed,
            "seconds_before_resuming": round(seconds_before, 2),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": recorded_environment(),
        }
        write_json_atomically(record_file, record)
        self.records[name] = record
        shutil.rmtree(work_dir / CHECKPOINTS, ignore_errors=True)
        self.timings[name] = seconds
        write_json_atomically(self.timings_file, self.timings)
        self.log(
            f"[dclip run] {name}: done in {seconds:.1f} s"
            + (f" ({seconds_before:.1f} s of them before it resumed)" if resumed else "")
        )
        return record

    def environments(self) -> list[dict[str, Any]]:
        """The environments the stages in `records` ran in, read from their records, each with the names of the
        stages that ran in it; stages recorded before records held an environment are grouped under `None`."""
        groups: list[dict[str, Any]] = []
        for name, record in self.records.items():
            environment = record.get("environment")
            group = next((group for group in groups if group["environment"] == environment), None)
            if group is None:
                group = {"environment": environment, "stages": []}
                groups.append(group)
            group["stages"].append(name)
        return groups


def _seconds_worked(saved: list[Path], work_mark: Path, mark: dict[str, Any]) -> float:
    """The seconds an unfinished stage has worked so far: those its `mark` carries from attempts before the last, plus
    the last attempt's, from its start (marks of earlier versions: the mark's own time) to the newest file it wrote
    (`saved`: the files in its work folder besides the mark)."""
    started = mark.get("started", work_mark.stat().st_mtime)
    return mark.get("seconds_before", 0.0) + max(
        0.0, max((p.stat().st_mtime for p in saved), default=started) - started
    )


def load_run_data(preset: RunPreset, work: Path) -> tuple[datasets.DatasetDict, str]:
    """The run's splits and a description of where they come from.

    A dataset spec is read afresh every run (its fingerprints follow its files' content, so a file fixed or
    replaced is noticed); synthetic scenes are generated once per settings into `work/data/<settings digest>`.
    """
    if preset.data:
        from .data.spec import load_dataset_spec

        dataset = load_dataset_spec(preset.data)
        names = sorted(set(dataset["split"]))
        missing = {"train", "test"} - set(names)
        if missing:
            raise ValueError(f"--data {preset.data}: needs 'train' and 'test' splits, has {names}")
        splits = {name: dataset.filter(lambda s, n=name: s == n, input_columns="split") for name in names}
        return datasets.DatasetDict(splits), preset.data
    from .data.synthetic import make_synthetic_splits

    sizes = {
        "pretrain": preset.pretrain_images,
        "train": preset.train_images,
        "val": preset.val_images,
        "test": preset.test_images,
    }
    sizes = {name: count for name, count in sizes.items() if count}
    settings = {
        "sizes": sizes,
        "seed": preset.seed,
        "scene_size": preset.scene_size,
        "version": distribution_version("dclip"),
    }
    folder = work / "data" / digest(settings)
    if not (folder / "dataset_dict.json").is_file():
        with atomic_path(folder) as temporary:
            make_synthetic_splits(sizes, seed=preset.seed, image_size=preset.scene_size).save_to_disk(str(temporary))
    return datasets.load_from_disk(str(folder)), f"synthetic scenes (seed {preset.seed})"


def data_fingerprint(split: datasets.Dataset) -> dict[str, Any]:
    """The content of a split: its images, captions and (when present) annotated boxes and labels."""
    from .data.captions import caption_pairs

    record = {
        "rows": len(split),
        "images": images_fingerprint(split),
        "captions": texts_fingerprint(caption_pairs(split).captions),
    }
    for column in ("boxes", "labels", "hard_negatives", "label"):
        if column in split.column_names:
            record[column] = digest(split[column])
    return record


def teacher_regions(preset: RunPreset, dataset_has_boxes: bool) -> dict[str, Any]:
    """The teacher's region settings: the dataset's boxes, a YOLO detector, or `preset.regions`."""
    if preset.use_dataset_boxes and dataset_has_boxes:
        return DatasetBoxes().to_dict()
    if preset.detector:
        return {
            "type": "yolo",
            "weights": preset.detector,
            "conf": preset.detector_conf,
            "max_regions": preset.max_regions,
            "classes": preset.detector_classes or None,
        }
    return dict(preset.regions)


def run_pipeline(
    output_dir: str | Path,
    preset: RunPreset,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    store: FeatureStore | None = None,
) -> dict[str, Any]:
    """Run (or resume) the pipeline into `output_dir`: `base/`, `teacher/`, `student/`, `results.json`,
    `results.md`, and `work/` (data, checkpoints, evaluation records). Returns the results dict.

    Raises:
        StageError: naming the stage that failed and why.
        RunLockedError: another run is using `output_dir`.
    """
    out = Path(output_dir)
    with run_lock(out):
        return _run_locked(out, preset, overwrite, log, store if store is not None else FeatureStore())


def _run_locked(
    out: Path, preset: RunPreset, overwrite: bool, log: Callable[[str], None], store: FeatureStore
) -> dict[str, Any]:
    from .evaluation import evaluate_model, supported_tasks, validator
    from .loading import load_dual_encoder, load_model_and_processor
    from .training.align import align_base
    from .training.checkpointing import save_model_atomically
    from .training.distill import distill_student
    from .training.teacher import train_teacher

    work = out / "work"
    if overwrite:
        for name in (*MODEL_NAMES, "work", "results.json", "results.md"):
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stages = StageRunner(work, log)
    log("[dclip run] data: loading and fingerprinting")
    try:
        splits, description = load_run_data(preset, work)
        fingerprints = {name: data_fingerprint(split) for name, split in splits.items()}
    except Exception as error:
        raise StageError(f"stage 'data' failed: {type(error).__name__}: {error}") from error
    train, val, test = splits["train"], splits["val"] if "val" in splits else None, splits["test"]
    # Every training stage checkpoints, so that an interrupted one resumes where it stopped (StageRunner).
    common = {
        "seed": preset.seed,
        "image_size": preset.image_size,
        "eval_split": "",
        "save_steps": preset.save_steps,
        "resume_from_checkpoint": "latest",
    }

    # The base: a given model unchanged (the paper's CLIP), or two towers aligned on `pretrain`.
    if preset.base_model:

        def import_base() -> None:
            model, processor = load_dual_encoder(preset.base_model)
            save_model_atomically(model, processor, out / "base", {"stage": "base_model"})

        base = stages.run(
            "base_model",
            out / "base",
            {"base_model": preset.base_model, "content": model_source_fingerprint(preset.base_model)},
            import_base,
        )
    else:
        align_config = load_stage_config(
            AlignConfig,
            **{
                **common,
                "output_dir": str(out / "base"),
                "work_dir": str(work / "align_base"),
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
        towers = (
            {"init_from": model_source_fingerprint(align_config.init_from)}
            if align_config.init_from
            else {
                name: model_source_fingerprint(getattr(align_config, name)) for name in ("vision_model", "text_model")
            }
        )
        base = stages.run(
            "align_base",
            out / "base",
            {
                "config": _config_inputs(align_config),
                "towers": towers,
                "data": fingerprints["pretrain" if "pretrain" in splits else "train"],
            },
            lambda: align_base(align_config, pretrain, store=store),
        )

    regions = teacher_regions(preset, "boxes" in train.column_names)
    teacher_config = load_stage_config(
        TeacherConfig,
        **{
            **common,
            "base_model": str(out / "base"),
            "output_dir": str(out / "teacher"),
            "work_dir": str(work / "train_teacher"),
            "regions": None if regions["type"] == "dataset" else regions,
            "use_dataset_boxes": regions["type"] == "dataset",
            **preset.teacher,
        },
    )
    region_inputs = dict(regions)
    if regions.get("type") == "yolo":  # the detector by its bytes: another path to the same file is the same input
        region_inputs["weights_content"] = model_source_fingerprint(str(regions["weights"]))
        if not region_inputs["weights_content"].startswith("hub:"):
            region_inputs["weights"] = Path(str(regions["weights"])).name
    # No validation for the teacher: scoring every (caption, image) pair each epoch would cost more than training it.
    teacher = stages.run(
        "train_teacher",
        out / "teacher",
        {
            "config": _config_inputs(teacher_config),
            "base": base["fingerprint"],
            "data": fingerprints["train"],
            "regions": region_inputs,
        },
        lambda: train_teacher(teacher_config, train, store=store),
    )

    distill_config = load_stage_config(
        DistillConfig,
        **{
            **common,
            "base_model": str(out / "base"),
            "teacher_model": str(out / "teacher"),
            "output_dir": str(out / "student"),
            "work_dir": str(work / "distill_student"),
            **preset.distill,
        },
    )
    # The student's best epoch is chosen on `val` (never on `test`) when there is one.
    student = stages.run(
        "distill_student",
        out / "student",
        {
            "config": _config_inputs(distill_config),
            "base": base["fingerprint"],
            "teacher": teacher["fingerprint"],
            "data": fingerprints["train"],
            "val": fingerprints.get("val"),
        },
        lambda: distill_student(
            distill_config,
            train,
            validator(val, distill_config.eval_batch_size) if val is not None else None,
            store=store,
        ),
    )

    records = {"base": base, "teacher": teacher, "student": student}
    models: dict[str, dict[str, float]] = {}
    for name in MODEL_NAMES:
        folder = work / "evaluation" / name

        def evaluate(name: str = name, folder: Path = folder) -> None:
            model, processor = load_model_and_processor(out / name, device="cpu")
            metrics = evaluate_model(model, processor, test, supported_tasks(test), store=store)
            write_json_atomically(folder / "metrics.json", metrics)

        stages.run(
            f"evaluate_{name}",
            folder,
            {"model": records[name]["fingerprint"], "test": fingerprints["test"]},
            evaluate,
        )
        models[name] = json.loads((folder / "metrics.json").read_text())

    results = {
        "models": models,
        "dataset": {
            "spec": description,
            "splits": {split: len(rows) for split, rows in splits.items()},
            "evaluated_on": "test",
            "fingerprints": fingerprints,
            "regions": teacher["inputs"]["regions"],
        },
        # What produced each model, read from the stages' own records, never from this run's command line.
        "stages": {
            name: {"fingerprint": record["fingerprint"], **record["inputs"]} for name, record in records.items()
        },
        "preset": asdict(preset),
        "versions": recorded_environment(),
        "timings_s": stages.timings,
    }
    write_json_atomically(out / "results.json", results)
    write_text_atomically(out / "results.md", results_markdown(results))
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
