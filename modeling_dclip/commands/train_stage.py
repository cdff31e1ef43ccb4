"""What the single-stage trainers run (`accelerate launch trainers/<stage>.py --config FILE [--field VALUE ...]`):
parse the stage's config, build its validation on `eval_split` when one is set, train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..evaluation import validator
from ..feature_store import FeatureStore
from ..training import (
    AlignConfig,
    DistillConfig,
    TeacherConfig,
    align_base,
    distill_student,
    parse_stage_config,
    train_teacher,
)
from ..training.data import load_split

STAGES = {
    "align_base": (AlignConfig, align_base),
    "train_teacher": (TeacherConfig, train_teacher),
    "distill_student": (DistillConfig, distill_student),
}


def train_stage(stage: str, argv: Sequence[str] | None = None) -> Path:
    """Train `stage` (`align_base`, `train_teacher` or `distill_student`) from command-line arguments; returns the
    output folder."""
    config_class, run = STAGES[stage]
    config = parse_stage_config(config_class, argv)
    store = FeatureStore()
    evaluate = None
    if config.eval_split:
        evaluate = validator(load_split(config.data, config.eval_split), config.eval_batch_size, store)
    return run(config, evaluate=evaluate, store=store)


__all__ = ["STAGES", "train_stage"]
