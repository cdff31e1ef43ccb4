"""Saved checkpoints carry their code: loading them with `trust_remote_code=True` in a process that cannot import
`modeling_dclip`, from a folder and from a Hub cache, and saving them again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoProcessor

from modeling_dclip import DCLIPModel, DCLIPProcessor, DCLIPTeacherModel

CODE_FILES = {"configuration_dclip.py", "modeling_dclip.py", "processing_dclip.py", "regions.py", "towers.py"}

# Runs in a fresh interpreter where `import modeling_dclip` fails, offline, so only the saved code can serve.
ISOLATED_LOADER = r"""
import json, sys
sys.modules["modeling_dclip"] = None
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

source, resave_dir, images, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
inputs = processor(images=[Image.open(p) for p in images], text=texts, regions=True)
with torch.no_grad():
    output = model(**inputs)
model.save_pretrained(resave_dir)
processor.save_pretrained(resave_dir)
print(json.dumps({"class": type(model).__name__, "processor": type(processor).__name__,
                  "image_embeds": output.image_embeds.tolist(), "text_embeds": output.text_embeds.tolist()}))
"""


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, embedded_student, embedded_processor, sample_photos):
    root = tmp_path_factory.mktemp("checkpoints")
    embedded_student.save_pretrained(root / "student")
    embedded_processor.save_pretrained(root / "student")
    teacher = DCLIPTeacherModel.from_backbone(
        embedded_student, fusion_dim=64, num_attention_heads=4, intermediate_size=96
    )
    with torch.no_grad():  # a teacher whose fusion matters, so that equal outputs mean equal fusion weights
        teacher.image_gate.fill_(0.5)
        teacher.text_gate.fill_(0.5)
    teacher.eval().save_pretrained(root / "teacher")
    embedded_processor.save_pretrained(root / "teacher")
    images = []
    for name in ("chelsea", "coffee"):
        sample_photos[name].save(root / f"{name}.png")
        images.append(str(root / f"{name}.png"))
    return root, {"student": embedded_student, "teacher": teacher}, images


def _expected(model, processor: DCLIPProcessor, images: list[str], texts: list[str]):
    from PIL import Image

    inputs = processor(images=[Image.open(p) for p in images], text=texts, regions=True)
    with torch.no_grad():
        return model(**inputs)


def _load_isolated(source: str, resave_dir: Path, images: list[str], texts: list[str], env: dict | None = None) -> dict:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-c", ISOLATED_LOADER, source, str(resave_dir), json.dumps(images), json.dumps(texts)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _assert_same_embeddings(loaded: dict, expected) -> None:
    torch.testing.assert_close(torch.tensor(loaded["image_embeds"]), expected.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(loaded["text_embeds"]), expected.text_embeds, atol=1e-5, rtol=0)


def _assert_resaved_correctly(folder: Path, model_class: str) -> None:
    assert CODE_FILES <= {p.name for p in folder.iterdir()}, sorted(p.name for p in folder.iterdir())
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == f"modeling_dclip.{model_class}"
    assert config["auto_map"]["AutoConfig"].startswith("configuration_dclip.")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_dclip.DCLIPProcessor"}


@pytest.mark.parametrize("name, model_class", [("student", "DCLIPModel"), ("teacher", "DCLIPTeacherModel")])
def test_isolated_trust_remote_code_load_and_resave(saved_models, embedded_processor, tmp_path, name, model_class):
    root, models, images = saved_models
    texts = ["a cat", "a cup of coffee"]
    loaded = _load_isolated(str(root / name), tmp_path / "resaved", images, texts)
    assert loaded["class"] == model_class and loaded["processor"] == "DCLIPProcessor"
    expected = _expected(models[name], embedded_processor, images, texts)
    _assert_same_embeddings(loaded, expected)
    _assert_resaved_correctly(tmp_path / "resaved", model_class)
    # The re-saved folder loads again, in isolation, to the same embeddings.
    again = _load_isolated(str(tmp_path / "resaved"), tmp_path / "resaved_twice", images, texts)
    _assert_same_embeddings(again, expected)


def _lay_out_hub_cache(
    cache: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef0123456789abcdef01234567"
) -> None:
    """Lay a folder out as huggingface_hub's cache does: blobs, snapshots/<revision>/ and refs/main. The Hub's
    servers cannot be reached here, so the cache is filled by hand instead of by a download."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for index, file in enumerate(sorted(folder.iterdir())):
        blob = repo / "blobs" / f"blob{index:04d}"
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("name, model_class", [("student", "DCLIPModel"), ("teacher", "DCLIPTeacherModel")])
def test_hub_id_loads_from_hub_cache(saved_models, embedded_processor, tmp_path, name, model_class):
    root, models, images = saved_models
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "org/dclip", root / name)
    texts = ["a cat", "a cup of coffee"]
    loaded = _load_isolated("org/dclip", tmp_path / "resaved", images, texts, env={"HF_HUB_CACHE": str(cache)})
    assert loaded["class"] == model_class
    _assert_same_embeddings(loaded, _expected(models[name], embedded_processor, images, texts))
    _assert_resaved_correctly(tmp_path / "resaved", model_class)


def test_auto_classes_registered_in_process(saved_models):
    root, _, _ = saved_models
    assert isinstance(AutoModel.from_pretrained(root / "student"), DCLIPModel)
    assert isinstance(AutoModel.from_pretrained(root / "teacher"), DCLIPTeacherModel)
    assert isinstance(AutoProcessor.from_pretrained(root / "teacher"), DCLIPProcessor)
    assert AutoConfig.from_pretrained(root / "teacher").base_config.model_type == "dclip"
