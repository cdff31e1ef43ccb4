"""Stage configurations: dataclasses parsed by `transformers.HfArgumentParser`, read from a YAML file and overridden
on the command line.

`parse_stage_config(AlignConfig, ["--config", "a.yaml", "--learning_rate", "1e-4"])` reads the YAML file, then applies
the `--field value` overrides. Field names follow `transformers.TrainingArguments` wherever it has the same concept
(`num_train_epochs`, `lr_scheduler_type`, `save_steps`, `save_total_limit`, `metric_for_best_model`,
`load_best_model_at_end`, ...). Mapping and list fields (`loss_weights`, `loss_options`, `freeze_patterns`, `regions`,
`compress`, ...) take YAML on the command line (`--loss_weights '{contrastive: 1, image_distill: 0.5}'`,
`--freeze_patterns '[text_model.*]'`), as `TrainingArguments` takes JSON for its dict fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from transformers import HfArgumentParser, SchedulerType

from ..losses import DCLIP_HYBRID, resolve_recipe

ConfigT = TypeVar("ConfigT", bound="TrainingConfig")

NULL_STRINGS = ("none", "null")
"""Command-line spellings of "no value" for optional fields (`--teacher_model null`)."""


def option(default: Any, help: str) -> Any:  # noqa: A002 (argparse's name)
    """A config field with its `--help` text; mutable defaults (dicts, lists) are copied for each instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=functools.partial(_copy, default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _copy(value: Any) -> Any:
    return yaml.safe_load(yaml.safe_dump(value))


def inherited(config_class: type, name: str, default: Any) -> Any:
    """The field `name` of `config_class` with another default and the same help text."""
    return option(default, config_class.__dataclass_fields__[name].metadata["help"])


@dataclass
class TrainingConfig:
    """What every stage shares: data, optimisation, precision, checkpoints, logging and validation."""

    training_version: ClassVar[int] = 2
    """The version of the package's training code for this kind of stage, part of a stage's inputs
    (`modeling_dclip.pipeline`): raised whenever a change of the code makes the same settings and data train other
    weights (another random stream, another order of summation), so that a result trained by earlier code is not
    reused as if the current code had made it. Results recorded before 16fc4b3 carry no version. 1 (16fc4b3 to
    f8d779e): the loop's data loader with a generator of its own, the teacher's pairs summed in a fixed order. 2:
    the data loader draws each epoch's seed from the global random stream again (the stream of the code that
    recorded the real-photo benchmark), the teacher's pairs still summed in a fixed order."""

    output_dir: str = option("outputs/stage", "Where the final model (with its processor) is saved.")
    work_dir: str | None = option(
        None,
        "Checkpoints, the best model, caches and logs; default `{output_dir}-training`, beside the model folder, so "
        "that uploading the model folder never uploads training state.",
    )
    data: str = option(
        "synthetic:?n=200", "Dataset spec (see `modeling_dclip.data.spec`) with a `train` split, or `synthetic:...`."
    )
    train_split: str = option("train", "Split of `data` trained on.")
    eval_split: str = option("", "Split of `data` validated on after each epoch; empty: no validation.")
    image_size: int | None = option(None, "Resize and crop images to this many pixels; unset: the processor's size.")
    seed: int = option(0, "Seed of the model initialisation, the pair order of each epoch and every process' RNGs.")
    num_train_epochs: int = option(1, "Epochs to train (ignored when `max_steps` > 0).")
    max_steps: int = option(0, "If > 0: the number of optimizer updates to train, overriding `num_train_epochs`.")
    batch_size: int = option(
        32,
        "Global batch size: all processes together, per micro-batch (accelerate's `split_batches`: each process "
        "takes its slice of every batch, so results do not depend on the number of processes); must divide by it.",
    )
    gradient_accumulation_steps: int = option(
        1,
        "Micro-batches per optimizer update (`accelerator.accumulate`); the update's batch is "
        "`batch_size * gradient_accumulation_steps`. An epoch's last update takes the micro-batches that remain.",
    )
    learning_rate: float = option(1e-4, "Peak learning rate of AdamW.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (`accelerator.clip_grad_norm_`); 0 disables clipping.")
    warmup_steps: int = option(0, "Linear warmup from 0 over this many optimizer updates.")
    lr_scheduler_type: str = option(
        "cosine", "A transformers scheduler name (`cosine`, `linear`, `constant_with_warmup`, ...)."
    )
    mixed_precision: Literal["no", "fp16", "bf16"] | None = option(
        None,
        "accelerate's mixed precision; unset: the launcher's (`accelerate launch --mixed_precision bf16`, an "
        "accelerate config file), else `no`. `fp16` needs a GPU. One process trains in one precision.",
    )
    save_steps: int = option(
        0, "`accelerator.save_state` every N optimizer updates into `work_dir/checkpoints`; 0: no checkpoints."
    )
    save_total_limit: int | None = option(
        2, "Checkpoints kept (accelerate's `total_limit`: the oldest are deleted); 0 keeps them all."
    )
    resume_from_checkpoint: str | None = option(
        None,
        "A checkpoint folder to resume from, or `latest`: the newest complete one under `work_dir/checkpoints` (a "
        "fresh start when there is none yet, so the same command both starts and resumes a run).",
    )
    report_to: str = option("none", "accelerate tracker to log to (`tensorboard`, `wandb`, ...), or `none`.")
    logging_steps: int = option(10, "Log the training terms to the tracker every N optimizer updates.")
    metric_for_best_model: str = option(
        "text_to_image_R@1", "Validation metric that selects the best epoch (with `eval_split`)."
    )
    greater_is_better: bool = option(True, "Whether a larger `metric_for_best_model` is better.")
    load_best_model_at_end: bool = option(
        True, "Save the best epoch's weights (not the last ones) as the final model, when validation ran."
    )
    eval_batch_size: int = option(
        64, "Batch size of the validation encoders (validation runs on the main process only, on its device)."
    )

    def __post_init__(self) -> None:
        _normalize_command_line_values(self)
        if not self.work_dir:
            self.work_dir = os.path.normpath(self.output_dir) + "-training"
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        try:
            SchedulerType(self.lr_scheduler_type)
        except ValueError as error:
            raise ValueError(f"lr_scheduler_type: {error}") from None
        if self.save_total_limit is not None and self.save_total_limit < 0:
            raise ValueError(f"save_total_limit must be >= 0 (0 keeps every checkpoint), got {self.save_total_limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _type_hints(config_class: type) -> dict[str, Any]:
    return typing.get_type_hints(config_class)


def _normalize_command_line_values(config: TrainingConfig) -> None:
    """Turn the strings a command line gives into the values they stand for: `null`/`none` for an optional field,
    YAML for a mapping or list field (a list field also takes one bare item)."""
    for name, hint in _type_hints(type(config)).items():
        value = getattr(config, name)
        if not isinstance(value, str):
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        arguments = typing.get_args(hint) if union else (hint,)
        containers = {typing.get_origin(argument) or argument for argument in arguments} & {dict, list}
        if type(None) in arguments and value.strip().lower() in NULL_STRINGS:
            setattr(config, name, None)
        elif containers:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError as error:
                raise ValueError(f"{type(config).__name__}.{name}: not valid YAML: {value!r} ({error})") from None
            setattr(config, name, [parsed] if containers == {list} and isinstance(parsed, str) else parsed)


@dataclass
class AlignConfig(TrainingConfig):
    """`align_base`: LiT-style alignment of two pretrained towers into a base dual encoder."""

    vision_model: str = option(
        "dclip-embedded/efficientnet-lite0", "Vision tower: a Hub id, a folder, or the embedded default."
    )
    text_model: str = option(
        "dclip-embedded/all-MiniLM-L6-v2", "Text tower: a Hub id, a folder, or the embedded default."
    )
    init_from: str | None = option(None, "A saved `DCLIPModel` folder to start from instead of the two towers.")
    projection_dim: int = option(256, "Width of the shared embedding space.")
    unlock_vision_blocks: int = option(
        0, "Last vision blocks trained; 0 locks the image tower (LiT) and caches its features."
    )
    train_text_tower: bool = option(
        True, "Train the text tower (LiT does); false trains only the projections and the temperature."
    )
    unlock_text_layers: int = option(-1, "With `train_text_tower`: how many last text layers train (-1: all).")
    region_config: dict | str | None = option(
        None, "Region extractor settings saved with the processor (YAML; default: a 2x2 grid)."
    )
    learning_rate: float = inherited(TrainingConfig, "learning_rate", 1e-4)


@dataclass
class TeacherConfig(TrainingConfig):
    """`train_teacher`: the teacher's fusion on cached region embeddings, symmetric InfoNCE."""

    base_model: str = option(
        "outputs/base", "The base dual encoder (a saved `DCLIPModel` folder) whose embeddings the teacher enriches."
    )
    fusion_dim: int = option(512, "Width of the fusion layers.")
    num_fusion_layers: int = option(1, "Number of cross-modal fusion layers.")
    num_attention_heads: int = option(8, "Attention heads of each fusion layer.")
    intermediate_size: int = option(2048, "Feed-forward width of each fusion layer.")
    dropout: float = option(0.1, "Dropout of the fusion layers.")
    temperature: float = option(0.05, "InfoNCE temperature (DCLIP: 0.05).")
    learnable_temperature: bool = option(False, "Train the temperature instead of keeping it fixed.")
    objective: str = option(
        "pairwise",
        "`pairwise`: every caption of the batch scored against every image by fusing each pair, as the teacher "
        "ranks at evaluation; `paired`: the DCLIP paper's, each image fused with its own caption only (B times "
        "cheaper). See `modeling_dclip.training.teacher`.",
    )
    regions: dict | str | None = option(
        None, "Region extractor settings (YAML: `{type: grid, scales: [2]}`, `{type: yolo, ...}`)."
    )
    use_dataset_boxes: bool = option(False, "Take regions from the dataset's `boxes` column instead of the extractor.")
    learning_rate: float = inherited(TrainingConfig, "learning_rate", 1e-4)


@dataclass
class DistillConfig(TrainingConfig):
    """`distill_student`: the student, initialised from the base, trained with a loss recipe.

    The same trainer runs every recipe of `modeling_dclip.recipes`; only the targets it caches differ:

    - `teacher_image_embeds` / `teacher_text_embeds` (DCLIP, ConaCLIP, compression) from `teacher_model`, whose
      kind its folder's config tells: a DCLIP teacher gives its fused embeddings of each (image, caption) pair; any
      other dual encoder (a `DCLIPModel`, a CLIP checkpoint) its own embeddings of the pair's image and caption;
    - `teacher_lm_text_embeds` / `teacher_concept_labels` (Knowledge-CLIP) from `text_teacher_model`.
    """

    base_model: str = option("outputs/base", "The student's initialisation (a saved `DCLIPModel` folder).")
    teacher_model: str | None = option(
        "outputs/teacher",
        "A DCLIP teacher or a frozen dual encoder folder; needed when the recipe has terms reading "
        "`teacher_image_embeds` / `teacher_text_embeds`. Its embeddings must have the student's width. "
        "`null`: none.",
    )
    loss_weights: dict | str | None = option(
        dict(DCLIP_HYBRID),
        "The recipe (YAML): term name -> weight (default DCLIP's hybrid, 1/1/1), or a registered recipe name "
        "(`conaclip`, `knowledge_clip`, `compression_stage1`, `compression_stage2`), names joined by `+` adding "
        "their weights (`dclip+conaclip`); see `modeling_dclip.losses.resolve_recipe`.",
    )
    loss_options: dict | str | None = option(
        {},
        "Term name -> keyword arguments of its loss module (YAML: a fixed `temperature`, the concept head's "
        "`shared_head`, ...); the Knowledge-CLIP terms' sizes are filled in from the student and the targets.",
    )
    text_teacher_model: str | None = option(
        None,
        "Knowledge-CLIP's text teacher, any Hugging Face encoder or causal LM (mean-pooled), or the packaged "
        "`dclip-embedded/all-MiniLM-L6-v2`; needed when the recipe weights `text_embedding_distill` or `concept`.",
    )
    num_concepts: int = option(16, "Knowledge-CLIP: K-means concepts over the text teacher's caption embeddings.")
    concept_temperature: float = option(
        0.1,
        "Knowledge-CLIP: temperature of the soft concept labels "
        "(`modeling_dclip.recipes.knowledge_clip.soft_concept_labels`).",
    )
    compress: dict | str | None = option(
        None,
        "Build a smaller student from `base_model` first (two-stage compression, stage 1): YAML keyword arguments "
        "of `modeling_dclip.recipes.compress_student` (`text_layers`, `vision_layers`, `vision_architecture`); "
        "stage 2 then starts from stage 1's output with no `compress`.",
    )
    logit_scale: float = option(
        20.0, "Fixed inverse temperature of the contrastive term (DCLIP: 1/0.05 = 20); 0 keeps the model's."
    )
    freeze_patterns: list[str] | str | None = option(
        ["text_model.*"], "`fnmatch` patterns (YAML list) of parameter names kept frozen (DCLIP: the text tower)."
    )
    lora_r: int = option(0, "LoRA rank (peft); 0: no LoRA.")
    lora_alpha: int = option(16, "LoRA alpha.")
    lora_dropout: float = option(0.0, "LoRA dropout.")
    lora_target_modules: list[str] | str | None = option(
        ["query", "value", "q_proj", "v_proj"], "Module names (YAML list) LoRA adapts."
    )
    freeze_batchnorm_stats: bool = option(
        True, "Keep BatchNorm layers in eval mode (running statistics fixed) while training."
    )
    wise_alpha: float = option(
        1.0, "WiSE-FT: final = (1 - alpha) * base + alpha * fine-tuned; 1 keeps the fine-tuned weights."
    )
    learning_rate: float = inherited(TrainingConfig, "learning_rate", 1e-5)
    warmup_steps: int = inherited(TrainingConfig, "warmup_steps", 10)
    max_grad_norm: float = inherited(TrainingConfig, "max_grad_norm", 0.5)
    num_train_epochs: int = inherited(TrainingConfig, "num_train_epochs", 2)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.wise_alpha <= 1.0:
            raise ValueError(f"wise_alpha must be in [0, 1], got {self.wise_alpha}")
        resolve_recipe(self.loss_weights)  # an unknown recipe name fails here, before any model is loaded
        if self.compress is not None:
            from ..recipes import compress_student

            fields = set(inspect.signature(compress_student).parameters) - {"student"}
            unknown = sorted(set(self.compress) - fields)
            if unknown:
                raise ValueError(f"compress: unknown field(s) {unknown}; fields: {sorted(fields)}")
            if self.wise_alpha < 1.0:
                raise ValueError(
                    "wise_alpha < 1 interpolates with the base, whose shape a compressed student no longer has"
                )


def stage_parser(config_class: type[TrainingConfig]) -> HfArgumentParser:
    """The command-line parser of a stage: `--config FILE`, then one `--<field>` per config field, with its help."""
    parser = HfArgumentParser(config_class, description=inspect.getdoc(config_class).splitlines()[0])
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of config fields; the fields given on the command line override it."
    )
    return parser


def _read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as file:
        loaded = yaml.safe_load(file) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
    return loaded


def _parse(config_class: type[ConfigT], values: dict[str, Any], argv: Sequence[str], source: str) -> ConfigT:
    """`argv` parsed over `values` (from a YAML file or keyword arguments), which replace the fields' defaults; a
    scalar value goes through the field's command-line type (YAML reads `2e-5` as a string, an `output_dir` of
    `123` as a number), a mapping or list is taken as it is."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(config_class)})
    if unknown:
        raise ValueError(f"unknown {config_class.__name__} field(s) {unknown} in {source}")
    parser = stage_parser(config_class)
    parser.set_defaults(**{name: str(v) if isinstance(v, (bool, int, float)) else v for name, v in values.items()})
    config, *rest = parser.parse_args_into_dataclasses(
        args=list(argv), return_remaining_strings=True, look_for_args_file=False
    )
    if rest[-1]:
        parser.error(f"unknown arguments {rest[-1]}; `--help` lists the {config_class.__name__} fields")
    return config


def load_stage_config(config_class: type[ConfigT], path: str | os.PathLike | None = None, **overrides) -> ConfigT:
    """A stage config from a YAML file (optional) with keyword overrides on top; unknown keys are an error."""
    values = _read_yaml(path) if path is not None else {}
    values.update(overrides)
    return _parse(config_class, values, [], f"{path} or the overrides" if path else "the overrides")


def parse_stage_config(config_class: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    """Parse `--config FILE` and `--<field> VALUE` overrides into `config_class` (`--help` describes each field)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--config")
    path = first.parse_known_args(argv)[0].config
    values = _read_yaml(path) if path else {}
    return _parse(config_class, values, argv, str(path))
