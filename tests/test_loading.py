"""`modeling_dclip.loading`: safetensors only, no prompt, and errors that name the folder, on real saved folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOWER, tiny_student
from transformers import BertConfig, BertModel

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel
from modeling_dclip.loading import ModelLoadError, load_dual_encoder, load_model_and_processor


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory) -> Path:
    student, processor = tiny_student(projection_dim=8, text_pooling=None, max_position_embeddings=24)
    folder = tmp_path_factory.mktemp("models") / "student"
    student.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def copy(student_folder, tmp_path) -> Path:
    return Path(shutil.copytree(student_folder, tmp_path / "model"))


def test_a_saved_student_and_teacher_load(student_folder, tmp_path):
    model, processor = load_model_and_processor(student_folder)
    assert isinstance(model, DCLIPModel) and not model.training and isinstance(processor, DCLIPProcessor)
    teacher = DCLIPTeacherModel.from_backbone(model, fusion_dim=8, num_attention_heads=2, intermediate_size=16)
    teacher.save_pretrained(tmp_path / "teacher")
    processor.save_pretrained(tmp_path / "teacher")
    loaded, _ = load_model_and_processor(tmp_path / "teacher")
    assert isinstance(loaded, DCLIPTeacherModel)


@pytest.mark.parametrize("keep", [0, 5, 1000, None])
def test_truncated_safetensors_name_the_folder(copy, keep):
    weights = copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if keep is None else data[:keep])
    with pytest.raises(ModelLoadError) as error:
        load_model_and_processor(copy)
    assert str(copy) in str(error.value)
    assert "model.safetensors is truncated or not a safetensors file" in str(error.value)


@pytest.mark.parametrize("load", [load_model_and_processor, load_dual_encoder])
def test_pickle_only_weights_are_refused_with_the_way_to_convert(copy, student_folder, load):
    model = DCLIPModel.from_pretrained(student_folder)
    (copy / "model.safetensors").unlink()
    torch.save(model.state_dict(), copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as error:
        load(copy)
    message = str(error.value)
    assert f"pickle file {copy / 'pytorch_model.bin'}" in message and "only safetensors" in message
    assert "save_pretrained" in message and "use_safetensors=False" in message


def test_unknown_model_type_is_an_error_naming_it_without_a_prompt(copy, tmp_path):
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "dclip_typo"  # the auto_map stays: transformers would ask whether to trust remote code
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model_type 'dclip_typo', which neither DCLIP"):
        load_model_and_processor(copy)
    # `dclip eval` fails the same way, without waiting for an answer on stdin (closed here, as in CI).
    result = subprocess.run(
        [sys.executable, "-m", "modeling_dclip.cli", "eval", "--model", str(copy), "--dataset", "synthetic:?n=2"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert "model_type 'dclip_typo'" in result.stderr and "[y/N]" not in result.stdout + result.stderr


def test_other_architectures_load_through_auto_classes_without_remote_code(tmp_path):
    BertModel(BertConfig(**TINY_TOWER, vocab_size=99)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="is a BertModel, not a dual encoder"):  # loaded, then refused
        load_model_and_processor(tmp_path / "bert")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_model_and_processor(tmp_path / "missing")
