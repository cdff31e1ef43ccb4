"""`dclip train-detector`: train an ultralytics YOLO on a YOLO-format dataset, offline, for `YoloRegionExtractor`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-detector",
        help="Train a YOLO region detector on a YOLO-format dataset (e.g. the synthetic scenes' export).",
        description="Trains an ultralytics YOLO without network access and prints the path of its best weights, "
        "which the teacher's processor takes as regions {type: yolo, weights: PATH}.",
    )
    parser.add_argument("--data", required=True, help="ultralytics data YAML (path, train, val, names)")
    parser.add_argument(
        "--model",
        default="yolov8n.yaml",
        help="architecture .yaml to train from scratch, or a local .pt to fine-tune (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=int, default=50, help="training epochs (default: %(default)s)")
    parser.add_argument("--imgsz", type=int, default=640, help="training image size in pixels (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="images per batch (default: %(default)s)")
    parser.add_argument(
        "--output-dir",
        default="outputs/detector",
        help="run folder; the weights go to its weights/best.pt (default: %(default)s)",
    )
    parser.add_argument("--device", default=None, help="cpu, 0, 0,1, ... (default: ultralytics chooses)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.detector import train_detector

    try:
        best = train_detector(
            args.data,
            model=args.model,
            epochs=args.epochs,
            imgsz=args.imgsz,
            batch=args.batch,
            output_dir=args.output_dir,
            device=args.device,
            workers=args.workers,
            seed=args.seed,
        )
    except (ValueError, OSError, ImportError) as error:
        print(f"dclip train-detector: {error}", file=sys.stderr)
        return 2
    print(best)
    return 0
