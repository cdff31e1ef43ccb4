"""`dclip export --format onnx` on a tiny saved student: both ONNX encoders give PyTorch's embeddings (within 1e-4)
through onnxruntime on real photographs and captions of several lengths and batch sizes."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_student

from modeling_dclip.cli import main
from modeling_dclip.onnx_export import IMAGE_FILE, INFO_FILE, TEXT_FILE, OnnxEncoders, onnx_parity


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    student, processor = tiny_student(layers=2)
    student.save_pretrained(root / "student")
    processor.save_pretrained(root / "student")
    assert main(["export", "--model", str(root / "student"), "--format", "onnx", "--output", str(root / "onnx")]) == 0
    return student, processor, root / "onnx"


def test_onnx_encoders_equal_pytorch_on_real_photos(exported, sample_photos):
    student, processor, folder = exported
    assert (folder / IMAGE_FILE).is_file() and (folder / TEXT_FILE).is_file()
    info = json.loads((folder / INFO_FILE).read_text())
    assert info["image_encoder"]["outputs"] == {"image_embeds": ["batch", 16]}
    photos = list(sample_photos.values())
    captions = [
        "a cat",
        "a cup of coffee on a saucer",
        "an astronaut in a white suit in front of a flag, smiling for a portrait photograph",
    ]
    for images, texts in ((photos, captions), (photos[:1], captions[2:])):
        differences = onnx_parity(student, processor, folder, images, texts)
        assert differences["image_max_abs_diff"] < 1e-4 and differences["text_max_abs_diff"] < 1e-4, differences


def test_onnx_embeddings_are_unit_vectors_of_the_projection_width(exported, sample_photos):
    _, processor, folder = exported
    encoders = OnnxEncoders(folder, threads=1)
    pixels = processor(images=list(sample_photos.values()))["pixel_values"].numpy()
    embeds = encoders.encode_images(pixels)
    assert embeds.shape == (4, 16)
    torch.testing.assert_close(torch.from_numpy(embeds).norm(dim=1), torch.ones(4))
