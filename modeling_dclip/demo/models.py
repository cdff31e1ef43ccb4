"""
Which DCLIP models the demo shows, loading them, and encoding with them.

Models load through `modeling_dclip.loading` (this package's classes, safetensors weights only, no remote code).
Without a model named, the demo takes the newest `dclip run` output it finds, then (in a Space) the models its
README lists, and finally the embedded-default student, which has untrained projections.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..encoding import encode_images, encode_texts
from ..feature_store import FeatureStore

STUDENT_ENV = "DCLIP_STUDENT"
TEACHER_ENV = "DCLIP_TEACHER"
RUNS_DIR_ENV = "DCLIP_RUNS_DIR"
DEFAULT_RUNS_DIRS = ("runs", "outputs")
RESULTS_FILE = "results.json"
_BATCH_SIZE = 16


@dataclass(frozen=True)
class ModelChoice:
    """The models to load (paths or Hub ids; `student=None` means the embedded default) and why these."""

    student: str | None
    teacher: str | None
    origin: str


def newest_run(runs_dirs: Sequence[str | os.PathLike]) -> Path | None:
    """The most recent `dclip run` output (by its `results.json`) with a student folder, in or under `runs_dirs`."""
    candidates = []
    for root in map(Path, runs_dirs):
        for results in (root / RESULTS_FILE, *root.glob(f"*/{RESULTS_FILE}"), *root.glob(f"*/*/{RESULTS_FILE}")):
            if results.is_file() and (results.parent / "student" / "config.json").is_file():
                candidates.append(results)
    if not candidates:
        return None
    return max(candidates, key=lambda path: path.stat().st_mtime).parent


def space_readme_models(app_dir: Path) -> list[str]:
    """The `models:` of the Space README in `app_dir`, the Space folder (student first, then teacher)."""
    from huggingface_hub import metadata_load

    metadata = metadata_load(app_dir / "README.md") or {}
    models = metadata.get("models") or []
    return [models] if isinstance(models, str) else list(models)


def choose_models(
    student: str | None = None,
    teacher: str | None = None,
    runs_dirs: Sequence[str | os.PathLike] | None = None,
    app_dir: Path | None = None,
) -> ModelChoice:
    """
    Resolve the demo's models: an explicit student (argument or `DCLIP_STUDENT`), else the newest `dclip run` output
    (in `runs_dirs`, `DCLIP_RUNS_DIR`, or `runs/` and `outputs/`), else in a Hugging Face Space the README's `models`,
    else the embedded-default student. An explicit teacher (argument or `DCLIP_TEACHER`) is kept in every case.
    """
    student = student or os.environ.get(STUDENT_ENV) or None
    teacher = teacher or os.environ.get(TEACHER_ENV) or None
    if student:
        return ModelChoice(student, teacher, f"student `{student}` (given)")
    if runs_dirs is None:
        runs_dirs = [os.environ[RUNS_DIR_ENV]] if os.environ.get(RUNS_DIR_ENV) else list(DEFAULT_RUNS_DIRS)
    run = newest_run(runs_dirs)
    if run is not None:
        run_teacher = run / "teacher"
        if teacher is None and (run_teacher / "config.json").is_file():
            teacher = str(run_teacher)
        return ModelChoice(str(run / "student"), teacher, f"newest `dclip run` output `{run}`")
    if os.environ.get("SPACE_ID") and app_dir is not None:
        models = space_readme_models(app_dir)
        if models:
            return ModelChoice(models[0], teacher or (models[1] if len(models) > 1 else None), "the Space README")
    return ModelChoice(None, teacher, "embedded-default student (untrained projections: rankings are not meaningful)")


class DemoModels:
    """The student (search, ranking, zero-shot) and optionally the teacher (region view), ready for inference."""

    def __init__(
        self,
        student,
        processor,
        teacher=None,
        teacher_processor=None,
        description: str = "",
        store: FeatureStore | None = None,
    ):
        self.student = student.eval()
        self.store = store if store is not None else FeatureStore()
        self.processor = processor
        self.teacher = teacher.eval() if teacher is not None else None
        self.teacher_processor = teacher_processor
        self.description = description

    @classmethod
    def load(cls, choice: ModelChoice) -> DemoModels:
        from ..loading import load_model_and_processor

        if choice.student is None:
            student, processor = _embedded_default_student()
        else:
            student, processor = load_model_and_processor(choice.student, device="cpu")
        teacher = teacher_processor = None
        if choice.teacher is not None:
            teacher, teacher_processor = load_model_and_processor(choice.teacher, device="cpu")
            if teacher.config.model_type != "dclip_teacher":
                raise ValueError(f"{choice.teacher}: a {teacher.config.model_type} model, not a DCLIP teacher")
        description = f"Student from the {choice.origin}." + (
            f" Teacher: `{choice.teacher}`." if choice.teacher else " No teacher loaded: the region view is off."
        )
        return cls(student, processor, teacher, teacher_processor, description)

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """L2-normalised image embeddings `[n, dim]` (float32), through the package's one encoding module."""
        return encode_images(self.student, self.processor, images, _BATCH_SIZE).numpy()

    def encode_gallery(self, images: list[Image.Image]) -> np.ndarray:
        """[`encode_images`] through the feature store: a gallery embedded once is read back (by its pixels and
        the student's weights) when the demo restarts or the same images are uploaded again."""
        return self.store.image_embeddings(self.student, self.processor, images, _BATCH_SIZE).numpy()

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings `[n, dim]` (float32), through the package's one encoding module."""
        return encode_texts(self.student, self.processor, texts, _BATCH_SIZE).numpy()

    @property
    def logit_scale(self) -> float:
        return float(self.student.logit_scale.exp())


def _embedded_default_student():
    from .. import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor

    student = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    return student, processor
