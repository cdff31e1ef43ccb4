"""Each named recipe trains the student from its config in `trainers/configs/` through a real `accelerate launch` of
`trainers/distill_student.py`, on the tiny random base of `test_training` and a few 64 px synthetic scenes: the
recipe's terms are the ones trained and logged, the targets come from the right teacher, and the saved student is a
plain `DCLIPModel`."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch
from safetensors.torch import load_file
from test_training import REPO, cpu_one_thread, subprocess_env, tiny_base  # noqa: F401 (fixtures)

from modeling_dclip import DCLIPModel, DCLIPProcessor
from modeling_dclip.encoding import encode_texts
from modeling_dclip.losses import resolve_recipe
from modeling_dclip.recipes import parameter_counts
from modeling_dclip.training import DistillConfig, TeacherConfig, train_teacher
from modeling_dclip.training.data import CaptionTable, load_split

CONFIGS = REPO / "trainers" / "configs"


@pytest.fixture(scope="module")
def scenes_spec(tmp_path_factory) -> str:
    """The tiny preset's scenes (64 px), saved once and read by every run as a dataset spec."""
    from modeling_dclip.data.synthetic import make_synthetic_dataset

    path = tmp_path_factory.mktemp("scenes") / "train"
    make_synthetic_dataset(16, split="train", image_size=64).save_to_disk(str(path))
    return f"hf:{path}"


@pytest.fixture(scope="module")
def tiny_teacher(tiny_base, scenes_spec, tmp_path_factory) -> Path:
    config = TeacherConfig(
        base_model=str(tiny_base),
        output_dir=str(tmp_path_factory.mktemp("teacher") / "teacher"),
        data=scenes_spec,
        batch_size=8,
        max_steps=1,
        fusion_dim=16,
        num_attention_heads=2,
        intermediate_size=32,
    )
    return train_teacher(config)


def launch(config_name: str, data: str, output_dir: Path, *overrides: str) -> dict:
    """Train from `trainers/configs/{config_name}.yaml` (paths and the tiny budget overridden) and return the run's
    `training_complete.json`."""
    result = subprocess.run(
        [
            *accelerate_launch(1),
            str(REPO / "trainers" / "distill_student.py"),
            "--config",
            str(CONFIGS / f"{config_name}.yaml"),
            "--output_dir",
            str(output_dir),
            "--data",
            data,
            "--batch_size",
            "8",
            "--max_steps",
            "2",
            "--warmup_steps",
            "0",
            "--learning_rate",
            "1e-3",
            "--save_steps",
            "0",
            *overrides,
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "training_complete.json").read_text())


def assert_trained_with(summary: dict, recipe: str) -> None:
    """The run weighted exactly the named recipe's terms, and each was computed (finite) in its last step."""
    weights = resolve_recipe(recipe)
    assert summary["steps"] == 2 and summary["loss_weights"] == weights
    terms = summary["last_train_terms"]
    assert set(weights) <= set(terms), sorted(terms)
    assert all(torch.isfinite(torch.tensor(terms[name])) for name in weights)


def load_plain_student(folder: Path) -> DCLIPModel:
    """The saved student, which must load as a plain `DCLIPModel` with no missing or unexpected weight."""
    model, info = DCLIPModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(before[name], after[name]) for name in before if name.startswith(prefix))


def test_recipe_names_are_checked_before_any_model_loads():
    with pytest.raises(ValueError, match="unknown recipe 'conaclp'"):
        DistillConfig(loss_weights="dclip+conaclp")
    with pytest.raises(ValueError, match="compress: unknown field"):
        DistillConfig(compress={"text_layer": 2})


def table_rows(spec: str) -> torch.Tensor:
    """The image row of each training caption."""
    return CaptionTable.from_dataset(load_split(spec, "train")).caption_to_image


def store_entries(store: Path, kind: str) -> list[Path]:
    """The feature store's entries of `kind` (the trainers run with `DCLIP_FEATURE_STORE` set to `store`)."""
    return sorted((store / kind).glob("*.safetensors"))


def test_conaclip_distils_from_a_frozen_dual_encoder(tiny_base, scenes_spec, tmp_path, monkeypatch):
    monkeypatch.setenv("DCLIP_FEATURE_STORE", str(tmp_path / "store"))
    out = tmp_path / "conaclip"
    summary = launch("conaclip", scenes_spec, out, "--base_model", str(tiny_base), "--teacher_model", str(tiny_base))
    assert_trained_with(summary, "conaclip")
    base, student = load_file(str(tiny_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    load_plain_student(out)
    assert changed(base, student, "text_model.") and changed(
        base, student, "vision_model."
    )  # the config freezes nothing
    # The teacher is a DCLIPModel folder, so its targets are its own embeddings of each pair's caption (and image).
    [texts] = store_entries(tmp_path / "store", "text_embeddings")
    [images] = store_entries(tmp_path / "store", "image_embeddings")
    targets = {"teacher_text_embeds": load_file(str(texts))["text_embeds"]}
    targets["teacher_image_embeds"] = load_file(str(images))["image_embeds"][table_rows(scenes_spec)]
    table = CaptionTable.from_dataset(load_split(scenes_spec, "train"))
    expected = encode_texts(
        DCLIPModel.from_pretrained(tiny_base), DCLIPProcessor.from_pretrained(tiny_base), table.captions
    )
    torch.testing.assert_close(targets["teacher_text_embeds"], expected, atol=1e-5, rtol=0)
    assert targets["teacher_image_embeds"].shape == expected.shape


def test_dclip_plus_conaclip_distils_from_the_dclip_teacher(
    tiny_base, tiny_teacher, scenes_spec, tmp_path, monkeypatch
):
    monkeypatch.setenv("DCLIP_FEATURE_STORE", str(tmp_path / "store"))
    out = tmp_path / "dclip_conaclip"
    summary = launch(
        "dclip_conaclip", scenes_spec, out, "--base_model", str(tiny_base), "--teacher_model", str(tiny_teacher)
    )
    assert_trained_with(summary, "dclip+conaclip")
    assert {"image_distill", "text_distill", "intra_ts_fd", "inter_ss_sym_kl"} <= set(summary["loss_weights"])
    # The DCLIP teacher's fused embeddings of each pair, not a dual encoder's embeddings.
    assert len(store_entries(tmp_path / "store", "teacher_targets")) == 1
    assert not store_entries(tmp_path / "store", "image_embeddings")
    base, student = load_file(str(tiny_base / "model.safetensors")), load_file(str(out / "model.safetensors"))
    load_plain_student(out)
    frozen = [name for name in base if name.startswith("text_model.")]
    assert frozen and all(torch.equal(base[name], student[name]) for name in frozen)
    assert changed(base, student, "vision_model.")


def test_knowledge_clip_trains_against_a_language_model_and_saves_a_plain_student(
    tiny_base, scenes_spec, tmp_path, monkeypatch
):
    monkeypatch.setenv("DCLIP_FEATURE_STORE", str(tmp_path / "store"))
    out = tmp_path / "knowledge_clip"
    summary = launch("knowledge_clip", scenes_spec, out, "--base_model", str(tiny_base), "--num_concepts", "4")
    assert_trained_with(summary, "knowledge_clip")
    assert {"image_concept", "text_concept"} <= set(summary["last_train_terms"])  # the concept head read both towers
    [entry] = store_entries(tmp_path / "store", "text_teacher_targets")
    targets = load_file(str(entry))
    n_captions = len(CaptionTable.from_dataset(load_split(scenes_spec, "train")).captions)
    assert targets["teacher_lm_text_embeds"].shape == (
        n_captions,
        384,
    )  # all-MiniLM-L6-v2's width, not the student's 16
    labels = targets["teacher_concept_labels"]
    assert labels.shape == (n_captions, 4)
    torch.testing.assert_close(labels.sum(-1), torch.ones(n_captions))
    student = load_plain_student(out)  # neither the projection nor the concept head was saved
    assert parameter_counts(student) == parameter_counts(DCLIPModel.from_pretrained(tiny_base))
    assert changed(
        load_file(str(tiny_base / "model.safetensors")), load_file(str(out / "model.safetensors")), "text_model."
    )


def test_two_stage_compression_builds_a_smaller_student_and_fine_tunes_it(tiny_base, scenes_spec, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    # The tiny base has CLIP image towers, whose layers are dropped (the config replaces timm backbones instead).
    summary = launch(
        "compression_stage1",
        scenes_spec,
        stage1,
        "--base_model",
        str(tiny_base),
        "--teacher_model",
        str(tiny_base),
        "--compress",
        "{text_layers: every_other, vision_layers: every_other}",
    )
    assert_trained_with(summary, "compression_stage1")
    small, big = load_plain_student(stage1), DCLIPModel.from_pretrained(tiny_base)
    assert small.config.text_config.num_hidden_layers == 1 and small.config.vision_config.num_hidden_layers == 1
    assert summary["parameters"] == parameter_counts(small)
    assert parameter_counts(small)["text"] < parameter_counts(big)["text"]
    assert parameter_counts(small)["vision"] < parameter_counts(big)["vision"]

    summary = launch("compression_stage2", scenes_spec, stage2, "--base_model", str(stage1))
    assert_trained_with(summary, "compression_stage2")
    assert set(summary["loss_weights"]) == {"contrastive"}
    assert parameter_counts(load_plain_student(stage2)) == parameter_counts(small)
    assert changed(load_file(str(stage1 / "model.safetensors")), load_file(str(stage2 / "model.safetensors")), "")
