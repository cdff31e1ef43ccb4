"""Training stages of DCLIP: `align_base` (LiT base dual encoder), `train_teacher` (cross-modal fusion) and
`distill_student` (loss recipe against cached teacher targets), on a shared accelerate loop; `distill_towers`
(stage 1 of two-stage compression on unpaired images and texts)."""

from .align import align_base
from .compression import TowerDistillConfig, distill_towers
from .config import AlignConfig, DistillConfig, TeacherConfig, TrainingConfig, load_stage_config, parse_stage_config
from .distill import distill_student
from .teacher import train_teacher

__all__ = [
    "AlignConfig",
    "DistillConfig",
    "TeacherConfig",
    "TowerDistillConfig",
    "TrainingConfig",
    "align_base",
    "distill_student",
    "distill_towers",
    "load_stage_config",
    "parse_stage_config",
    "train_teacher",
]
