"""`dclip export`: a student's towers as ONNX models (`--format onnx`), checked against PyTorch."""

from __future__ import annotations

import argparse
import sys

PARITY_TOLERANCE = 1e-4


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export a student's image and text encoders (tower + projection) as ONNX models.",
        description="Writes OUTPUT/image_encoder.onnx, OUTPUT/text_encoder.onnx, the processor and "
        "onnx_export.json, then compares their outputs with PyTorch's through onnxruntime. For a student with CLIP "
        "towers, DCLIPModel.to_clip() is the export to CLIP tools.",
    )
    parser.add_argument("--model", required=True, help="student (or CLIP) folder or Hub id")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: %(default)s)")
    parser.add_argument("--output", required=True, help="the folder to write")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from ..loading import load_model_and_processor
    from ..modeling_dclip import DCLIPTeacherModel
    from ..onnx_export import export_onnx, onnx_parity

    try:
        model, processor = load_model_and_processor(args.model, device="cpu")
        if isinstance(model, DCLIPTeacherModel):
            raise ValueError(f"--model {args.model}: a DCLIP teacher scores pairs; export its student instead")
    except (ValueError, FileNotFoundError) as error:
        print(f"dclip export: error: {error}", file=sys.stderr)
        return 2
    paths = export_onnx(model, processor, args.output, source=args.model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(3)]
    texts = ["a dog runs on the grass", "two people sit on a bench by the sea", "a red car"]
    differences = onnx_parity(model, processor, args.output, images, texts)
    for name, path in paths.items():
        print(f"{name} encoder: {path}")
    print(
        f"largest difference to PyTorch: image {differences['image_max_abs_diff']:.2e}, "
        f"text {differences['text_max_abs_diff']:.2e}"
    )
    if max(differences.values()) > PARITY_TOLERANCE:
        print(f"dclip export: error: the ONNX outputs differ from PyTorch's by more than {PARITY_TOLERANCE}")
        return 1
    return 0
