"""`dclip rank`: rank captions for images with a DCLIP student (default: the embedded offline student)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

DEFAULT_CAPTIONS = (
    "a photo of a cat",
    "a cup of coffee",
    "an astronaut",
    "a rocket on a launch pad",
    "a bus in a street",
    "a man in a suit and tie",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="Rank captions for images with a DCLIP student.",
        description="Print, for each image, the captions ranked by the student's similarity.",
    )
    parser.add_argument(
        "--model", default=None, help="Student folder or Hub id (default: the embedded offline student)."
    )
    parser.add_argument(
        "--images",
        nargs="*",
        default=None,
        help="Image files (default: the sample photos that scikit-image and ultralytics ship).",
    )
    parser.add_argument("--captions", nargs="*", default=list(DEFAULT_CAPTIONS), help="Captions to rank.")
    parser.add_argument("--top", type=int, default=3, help="How many captions to print per image.")
    parser.set_defaults(func=run)


def packaged_sample_photos() -> dict[str, object]:
    """Sample photographs shipped inside installed packages: scikit-image's data and ultralytics' assets."""
    from PIL import Image

    from ..processing_dclip import load_image

    photos: dict[str, object] = {}
    try:
        skimage_data = importlib.import_module("skimage.data")
        for name in ("chelsea", "coffee", "astronaut", "rocket"):
            photos[f"skimage:{name}"] = Image.fromarray(getattr(skimage_data, name)())
    except ImportError:
        pass
    try:
        assets = Path(importlib.import_module("ultralytics").__file__).parent / "assets"
        for path in sorted(assets.glob("*.jpg")):
            photos[f"ultralytics:{path.name}"] = load_image(path)
    except ImportError:
        pass
    return photos


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import EMBEDDED_TEXT, EMBEDDED_VISION, DCLIPModel, DCLIPProcessor
    from ..processing_dclip import load_image

    if args.model is None:
        print("model: embedded default student (EfficientNet-Lite0 + all-MiniLM-L6-v2, projections untrained)")
        model = DCLIPModel.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
        processor = DCLIPProcessor.from_vision_text_pretrained(EMBEDDED_VISION, EMBEDDED_TEXT)
    else:
        print(f"model: {args.model}")
        model = DCLIPModel.from_pretrained(args.model)
        processor = DCLIPProcessor.from_pretrained(args.model)
    if args.images:
        images = {path: load_image(path) for path in args.images}
    else:
        images = packaged_sample_photos()
        if not images:
            raise SystemExit("No images given and no sample photos found: pass --images FILE [FILE ...].")
    inputs = processor(images=list(images.values()), text=args.captions)
    with torch.inference_mode():
        probabilities = model.eval()(**inputs).logits_per_image.softmax(dim=-1)
    for name, row in zip(images, probabilities):
        ranked = row.argsort(descending=True)[: args.top].tolist()
        print(f"{name}: " + "; ".join(f"{args.captions[i]!r} {row[i]:.2f}" for i in ranked))
    return 0
