"""Ablations on one seed of the real-photo benchmark: retrain the student (or the teacher) of a finished seed with
other settings and score it on val (which selects) and test (only reported).

    python benchmarks/real_photos/ablations.py student outputs/real_photos/seed0 outputs/real_photos/ablations \\
        '{lr1e-4: {learning_rate: 1.0e-4}, w155: {loss_weights: {contrastive: 1, image_distill: 5, text_distill: 5}}}'
    python benchmarks/real_photos/ablations.py teacher outputs/real_photos/seed0 outputs/real_photos/ablations \\
        '{ep5: {num_train_epochs: 5}, grid23: {regions: {type: grid, scales: [2, 3]}}}'

Each variant is a mapping of stage-config fields laid over the ones the seed ran with (its `results.json`); a student
variant reuses the seed's base, teacher and cached teacher targets, a teacher variant the seed's base. One JSON line
per variant is printed and kept in `<output>/<variant>/ablation.json` (finished variants are not rerun).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import datasets
import yaml

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.training import DistillConfig, TeacherConfig, distill_student, load_stage_config, train_teacher
from modeling_dclip.training.evaluation import evaluate_dual_encoder, evaluate_teacher
from modeling_dclip.training.features import cached, region_features

REPORTED = ("text_to_image_R@1", "image_to_text_R@1", "text_to_image_mAP", "image_to_text_mAP")


def train_student_variant(run: Path, folder: Path, overrides: dict[str, Any], splits) -> dict[str, dict[str, float]]:
    work = folder / "training"
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(run / "work" / "student" / "teacher_targets.safetensors", work / "teacher_targets.safetensors")
    preset = json.loads((run / "results.json").read_text())["config"]["distill_student"]
    fields = {**preset, "output_dir": str(folder), "work_dir": str(work), **overrides}
    distill_student(load_stage_config(DistillConfig, **fields), splits["train"], splits["val"])
    model, processor = DCLIPModel.from_pretrained(folder), DCLIPProcessor.from_pretrained(folder)
    return {split: evaluate_dual_encoder(model, processor, splits[split]) for split in ("val", "test")}


def train_teacher_variant(run: Path, folder: Path, overrides: dict[str, Any], splits) -> dict[str, dict[str, float]]:
    preset = json.loads((run / "results.json").read_text())["config"]["train_teacher"]
    fields = {**preset, "output_dir": str(folder), "work_dir": str(folder / "training"), **overrides}
    train_teacher(load_stage_config(TeacherConfig, **fields), splits["train"])
    teacher, processor = DCLIPTeacherModel.from_pretrained(folder).eval(), DCLIPProcessor.from_pretrained(folder)
    scores = {}
    for split in ("val", "test"):
        regions = cached(
            folder / f"{split}_regions.safetensors",
            lambda split=split: region_features(teacher, processor, splits[split]),
        )
        scores[split] = evaluate_teacher(teacher, processor, splits[split], regions)
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("student", "teacher"))
    parser.add_argument("run", type=Path, help="a finished seed of run_benchmark.py (its work-dir/seedN)")
    parser.add_argument("output", type=Path)
    parser.add_argument("variants", type=yaml.safe_load, help="YAML mapping: variant name -> config fields")
    args = parser.parse_args(argv)
    splits = datasets.load_from_disk(str(args.run / "work" / "data"))
    train = train_student_variant if args.stage == "student" else train_teacher_variant
    for name, overrides in args.variants.items():
        folder = args.output / args.stage / name
        record = folder / "ablation.json"
        if not record.is_file():
            start = time.perf_counter()
            scores = train(args.run, folder, overrides or {}, splits)
            result = {
                "stage": args.stage,
                "variant": name,
                "overrides": overrides,
                "seconds": round(time.perf_counter() - start),
                **{split: {key: metrics[key] for key in REPORTED} for split, metrics in scores.items()},
            }
            record.write_text(json.dumps(result))
        print(record.read_text(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
