"""Stage configurations: dataclasses read from YAML, every field overridable on the command line.

`parse_stage_config(AlignConfig, ["--config", "a.yaml", "--learning_rate", "1e-4"])` reads the YAML file, then
applies `--field value` overrides; values are parsed as YAML scalars/lists/mappings (`--loss_weights
'{contrastive: 1, image_distill: 0.5}'`, `--freeze_patterns '[text_model.*]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from ..losses import DCLIP_HYBRID, resolve_recipe

ConfigT = TypeVar("ConfigT", bound="TrainingConfig")


@dataclass
class TrainingConfig:
    """What every stage shares: data, optimisation, precision, checkpoints, logging and validation.

    Args:
        output_dir: where the final model (with its processor) is saved.
        work_dir: checkpoints, the best model and logs; defaults to `{output_dir}/training`.
        data: dataset spec (see `modeling_dclip.data.spec`) with a `train` split, or `synthetic`.
        train_split / eval_split: split names; an empty `eval_split` disables validation.
        batch_size: global batch (all processes together, before accumulation); must divide by processes.
        gradient_accumulation_steps: micro-batches per optimizer step; the effective batch is their product.
        max_grad_norm: gradient clipping norm; 0 disables clipping.
        lr_scheduler: a transformers scheduler name (`cosine`, `linear`, `constant_with_warmup`, ...).
        mixed_precision: `no`, `fp16` or `bf16` (accelerate's).
        checkpointing_steps: `save_state` every N optimizer steps; 0 disables.
        resume_from_checkpoint: a checkpoint folder, or `latest` (the newest under `work_dir/checkpoints`).
        report_to: accelerate tracker (`tensorboard`) or empty for none.
        eval_metric / greater_is_better: the metric that selects the best checkpoint.
        load_best_at_end: save the best (not the last) weights as the final model.
    """

    output_dir: str = "outputs/stage"
    work_dir: str | None = None
    data: str = "synthetic:?n=200"
    train_split: str = "train"
    eval_split: str = ""
    image_size: int | None = None
    seed: int = 0
    num_epochs: int = 1
    max_steps: int = 0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "cosine"
    mixed_precision: str = "no"
    checkpointing_steps: int = 0
    keep_checkpoints: int = 2
    resume_from_checkpoint: str | None = None
    report_to: str = ""
    logging_steps: int = 10
    eval_metric: str = "text_to_image_R@1"
    greater_is_better: bool = True
    load_best_at_end: bool = True
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.work_dir is None:
            self.work_dir = os.path.join(self.output_dir, "training")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be at least 1")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class AlignConfig(TrainingConfig):
    """`align_base`: LiT-style alignment of two pretrained towers into a base dual encoder.

    Args:
        vision_model / text_model: tower names (Hub ids, folders, or the embedded default).
        init_from: a saved `DCLIPModel` folder to start from instead of the two towers.
        unlock_vision_blocks: number of last vision blocks trained (0: image tower locked, its features cached).
        train_text_tower: train the text tower (LiT does); else only the projections and temperature.
        unlock_text_layers: with `train_text_tower`, how many last text layers (-1: all).
        region_config: region extractor settings saved with the processor (default 2x2 grid).
    """

    vision_model: str = "dclip-embedded/efficientnet-lite0"
    text_model: str = "dclip-embedded/all-MiniLM-L6-v2"
    init_from: str | None = None
    projection_dim: int = 256
    unlock_vision_blocks: int = 0
    train_text_tower: bool = True
    unlock_text_layers: int = -1
    region_config: dict | None = None
    learning_rate: float = 1e-4


@dataclass
class TeacherConfig(TrainingConfig):
    """`train_teacher`: the teacher's fusion on cached region embeddings, symmetric InfoNCE.

    Args:
        base_model: the base dual encoder (a saved `DCLIPModel` folder) whose embeddings the teacher enriches.
        fusion_dim / num_fusion_layers / num_attention_heads / intermediate_size / dropout: fusion shape.
        temperature / learnable_temperature: the InfoNCE temperature (DCLIP: 0.05, fixed).
        objective: `pairwise` (every caption of the batch scored against every image by fusing each pair, as the
            teacher ranks at evaluation) or `paired` (the DCLIP paper's: each image fused with its own caption only;
            B times cheaper); see `modeling_dclip.training.teacher`.
        regions: region extractor settings (`{"type": "grid", "scales": [2]}`; YOLO: `{"type": "yolo", ...}`).
        use_dataset_boxes: take regions from the dataset's `boxes` column instead of the extractor.
    """

    base_model: str = "outputs/base"
    fusion_dim: int = 512
    num_fusion_layers: int = 1
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    dropout: float = 0.1
    temperature: float = 0.05
    learnable_temperature: bool = False
    objective: str = "pairwise"
    regions: dict | None = None
    use_dataset_boxes: bool = False
    learning_rate: float = 1e-4


@dataclass
class DistillConfig(TrainingConfig):
    """`distill_student`: the student, initialised from the base, trained with a loss recipe.

    The same trainer runs every recipe of `modeling_dclip.recipes`; only the targets it caches differ:

    - `teacher_image_embeds` / `teacher_text_embeds` (DCLIP, ConaCLIP, compression) from `teacher_model`, whose
      kind its folder's config tells: a DCLIP teacher gives its fused embeddings of each (image, caption) pair; any
      other dual encoder (a `DCLIPModel`, a CLIP checkpoint) its own embeddings of the pair's image and caption;
    - `teacher_lm_text_embeds` / `teacher_concept_labels` (Knowledge-CLIP) from `text_teacher_model`.

    Args:
        base_model: the student's initialisation (a saved `DCLIPModel` folder).
        teacher_model: a DCLIP teacher or a frozen dual encoder folder; needed when the recipe has terms reading
            `teacher_image_embeds` / `teacher_text_embeds`. Its embeddings must have the student's width.
        use_dataset_boxes: compute the teacher's targets on the dataset's `boxes` (as the teacher was trained with
            `TeacherConfig.use_dataset_boxes`) instead of the teacher processor's region extractor.
        loss_weights: the recipe: term name -> weight (default DCLIP's hybrid, 1/1/1), or a registered recipe name
            (`conaclip`, `knowledge_clip`, `compression_stage1`, `compression_stage2`), names joined by `+` adding
            their weights (`dclip+conaclip`); see `modeling_dclip.losses.resolve_recipe`.
        loss_options: term name -> keyword arguments of its loss module (a fixed `temperature`, the concept head's
            `shared_head`, ...); the Knowledge-CLIP terms' sizes are filled in from the student and the targets.
        text_teacher_model: Knowledge-CLIP's text teacher, any Hugging Face encoder or causal LM (mean-pooled), or
            the packaged `dclip-embedded/all-MiniLM-L6-v2`; needed when the recipe weights `text_embedding_distill`
            or `concept`.
        num_concepts / concept_temperature: K-means concepts over the text teacher's caption embeddings, and the
            temperature of the soft concept labels (`modeling_dclip.recipes.knowledge_clip.soft_concept_labels`).
        compress: build a smaller student from `base_model` first (two-stage compression, stage 1): keyword
            arguments of `modeling_dclip.recipes.compress_student` (`text_layers`, `vision_layers`,
            `vision_architecture`); stage 2 then starts from stage 1's output with no `compress`.
        logit_scale: fixed inverse temperature of the contrastive term (DCLIP: 1/0.05 = 20); 0 keeps the model's.
        freeze_patterns: `fnmatch` patterns of parameter names kept frozen (DCLIP: the text tower).
        lora_r / lora_alpha / lora_target_modules: LoRA through peft when `lora_r > 0`.
        freeze_batchnorm_stats: keep BatchNorm layers in eval mode (running statistics fixed) while training.
        wise_alpha: WiSE-FT, final = (1 - alpha) * base + alpha * fine-tuned; 1 keeps the fine-tuned weights.
    """

    base_model: str = "outputs/base"
    teacher_model: str | None = "outputs/teacher"
    use_dataset_boxes: bool = False
    loss_weights: dict | str = field(default_factory=lambda: dict(DCLIP_HYBRID))
    loss_options: dict = field(default_factory=dict)
    text_teacher_model: str | None = None
    num_concepts: int = 16
    concept_temperature: float = 0.1
    compress: dict | None = None
    logit_scale: float = 20.0
    freeze_patterns: list = field(default_factory=lambda: ["text_model.*"])
    lora_r: int = 0
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list = field(default_factory=lambda: ["query", "value", "q_proj", "v_proj"])
    freeze_batchnorm_stats: bool = True
    wise_alpha: float = 1.0
    learning_rate: float = 1e-5
    warmup_steps: int = 10
    max_grad_norm: float = 0.5
    num_epochs: int = 2

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


def _field_names(config_class: type) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def load_stage_config(config_class: type[ConfigT], path: str | os.PathLike | None = None, **overrides) -> ConfigT:
    """A stage config from a YAML file (optional) with keyword overrides on top; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as file:
            loaded = yaml.safe_load(file) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides)
    unknown = sorted(set(values) - _field_names(config_class))
    if unknown:
        source = f"{path} or the command line" if path else "the overrides"
        raise ValueError(f"unknown {config_class.__name__} field(s) {unknown} in {source}")
    types = {f.name: str(f.type) for f in dataclasses.fields(config_class)}
    for name, value in values.items():
        # YAML reads `2e-5` (no dot) as a string; numeric fields take it as the number it is.
        if types[name] in ("float", "int") and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:
                values[name] = float(value) if types[name] == "float" else int(value)
            except ValueError:
                raise ValueError(f"{config_class.__name__}.{name}: expected a number, got {value!r}") from None
    return config_class(**values)


def parse_stage_config(config_class: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    """Parse `--config FILE` and `--<field> VALUE` overrides (YAML-typed values) into `config_class`."""
    parser = argparse.ArgumentParser(description=config_class.__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file of config fields; command-line fields override it")
    for f in dataclasses.fields(config_class):
        parser.add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS, metavar="VALUE")
    args = vars(parser.parse_args(argv))
    path = args.pop("config", None)
    overrides = {name: yaml.safe_load(value) if isinstance(value, str) else value for name, value in args.items()}
    for name in (
        "output_dir",
        "work_dir",
        "data",
        "base_model",
        "teacher_model",
        "text_teacher_model",
        "init_from",
        "resume_from_checkpoint",
    ):
        if name in overrides and overrides[name] is not None:
            overrides[name] = str(args[name])  # paths stay strings even when they look like numbers
    return load_stage_config(config_class, path, **overrides)
