"""
Export a student's two towers, each with its projection, as ONNX models for serving without PyTorch.

`export_onnx` writes into a folder:

- `image_encoder.onnx`: `pixel_values [batch, 3, H, W]` (float32, as the processor prepares them) ->
  `image_embeds [batch, projection_dim]`, L2-normalised;
- `text_encoder.onnx`: `input_ids [batch, sequence]` (int64), `attention_mask [batch, sequence]` (int64) ->
  `text_embeds [batch, projection_dim]`, L2-normalised;
- the processor's files (tokenizer, image processor), so that inputs are prepared as for the PyTorch model;
- `onnx_export.json`: the inputs, outputs, opset and the source model.

The graphs come from `torch.onnx.export` with the `torch.export` (dynamo) exporter, with a dynamic batch (and
sequence length). Optimum's exporter is not used: it knows whole Hub architectures (CLIP, BERT, ...), not a DCLIP
tower pair with its own pooling and projection. For a student with CLIP towers, `DCLIPModel.to_clip()` remains the
export to the CLIP ecosystem.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .atomic import atomic_path, write_json_atomically

IMAGE_FILE, TEXT_FILE, INFO_FILE = "image_encoder.onnx", "text_encoder.onnx", "onnx_export.json"
OPSET = 18


class ImageEncoder(torch.nn.Module):
    """The image tower, its pooling and projection: `pixel_values [B, 3, H, W]` -> L2-normalised `[B, D]`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)


class TextEncoder(torch.nn.Module):
    """The text tower, its pooling and projection: `input_ids, attention_mask [B, T]` -> L2-normalised `[B, D]`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return F.normalize(features.pooler_output, dim=-1)


def _sample_inputs(processor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Example inputs for tracing: two images of different sizes, two texts of different lengths."""
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 80), (20, 120, 220))]
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].float()
    text = processor(text=["a photo", "two dogs run across the grass after a ball"], return_tensors="pt", padding=True)
    return pixel_values, {"input_ids": text["input_ids"].long(), "attention_mask": text["attention_mask"].long()}


def _export(module: torch.nn.Module, args: tuple, names: list[str], output: str, dynamic: dict, path: Path) -> None:
    program = torch.onnx.export(
        module,
        args,
        input_names=names,
        output_names=[output],
        dynamic_shapes=dynamic,
        opset_version=OPSET,
        dynamo=True,
        verbose=False,
    )
    with atomic_path(path) as temporary:
        program.save(str(temporary))


@torch.no_grad()
def export_onnx(model, processor, output_dir: str | os.PathLike, source: str | None = None) -> dict[str, Path]:
    """
    Write the image and text encoders of a dual encoder (`DCLIPModel` or any model with CLIP's
    `get_image_features` / `get_text_features`) as ONNX models, and its processor, into `output_dir`.

    Returns:
        `{"image": path, "text": path}`.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval().cpu()
    pixel_values, text = _sample_inputs(processor)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    _export(
        ImageEncoder(model).eval(),
        (pixel_values,),
        ["pixel_values"],
        "image_embeds",
        {"pixel_values": {0: batch}},
        output_dir / IMAGE_FILE,
    )
    _export(
        TextEncoder(model).eval(),
        (text["input_ids"], text["attention_mask"]),
        ["input_ids", "attention_mask"],
        "text_embeds",
        {"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        output_dir / TEXT_FILE,
    )
    processor.save_pretrained(str(output_dir))
    write_json_atomically(
        output_dir / INFO_FILE,
        {
            "source_model": source,
            "opset": OPSET,
            "image_encoder": {
                "file": IMAGE_FILE,
                "inputs": {"pixel_values": ["batch", *pixel_values.shape[1:]]},
                "outputs": {"image_embeds": ["batch", int(model.config.projection_dim)]},
            },
            "text_encoder": {
                "file": TEXT_FILE,
                "inputs": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]},
                "outputs": {"text_embeds": ["batch", int(model.config.projection_dim)]},
            },
            "normalised": True,
        },
    )
    return {"image": output_dir / IMAGE_FILE, "text": output_dir / TEXT_FILE}


class OnnxEncoders:
    """The exported encoders through onnxruntime (CPU): `encode_images(pixel_values)` and
    `encode_texts(input_ids, attention_mask)`, numpy in, L2-normalised `[B, D]` float32 numpy out."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        # No busy-waiting between runs: idle threads would otherwise spin on cores other work needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        folder = Path(folder)
        providers = ["CPUExecutionProvider"]
        self.image = onnxruntime.InferenceSession(str(folder / IMAGE_FILE), options, providers=providers)
        self.text = onnxruntime.InferenceSession(str(folder / TEXT_FILE), options, providers=providers)

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.image.run(None, {"pixel_values": np.asarray(pixel_values, dtype=np.float32)})[0]

    def encode_texts(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        inputs = {
            "input_ids": np.asarray(input_ids, dtype=np.int64),
            "attention_mask": np.asarray(attention_mask, dtype=np.int64),
        }
        return self.text.run(None, inputs)[0]


@torch.no_grad()
def onnx_parity(model, processor, folder: str | os.PathLike, images: list, texts: list[str]) -> dict[str, Any]:
    """
    The largest absolute difference between the PyTorch model's and the exported encoders' embeddings of
    `images` (PIL) and `texts`: `{"image_max_abs_diff": float, "text_max_abs_diff": float}`.
    """
    onnx = OnnxEncoders(folder)
    model = model.float().eval().cpu()
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].float()
    text = processor(text=texts, return_tensors="pt", padding=True)
    torch_images = ImageEncoder(model)(pixel_values).numpy()
    torch_texts = TextEncoder(model)(text["input_ids"], text["attention_mask"]).numpy()
    return {
        "image_max_abs_diff": float(np.abs(onnx.encode_images(pixel_values.numpy()) - torch_images).max()),
        "text_max_abs_diff": float(
            np.abs(onnx.encode_texts(text["input_ids"].numpy(), text["attention_mask"].numpy()) - torch_texts).max()
        ),
    }


__all__ = ["ImageEncoder", "OnnxEncoders", "TextEncoder", "export_onnx", "onnx_parity"]
