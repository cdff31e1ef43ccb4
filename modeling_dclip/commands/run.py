"""`dclip run`: the whole pipeline on the embedded default (or `--data`), into `--output-dir`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Generate data, align the base, train the teacher, distil the student, evaluate all three.",
        description="Runs every stage and writes base/, teacher/, student/, results.json and results.md. "
        "A finished stage is reused only when everything it depends on (config, data content, models, regions, "
        "seed) is unchanged; otherwise the run says what changed and recomputes it.",
    )
    parser.add_argument("--output-dir", default="outputs/dclip-run", help="where results go (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="default (10 min on 2 CPU cores), tiny, or large")
    parser.add_argument("--config", help="YAML file of preset fields (train_images, image_size, align: {...}, ...)")
    parser.add_argument("--data", help="dataset spec with train and test splits, e.g. ../shared/data/flickr8k-1k")
    parser.add_argument("--seed", type=int, help="seed of the data generation and of every stage")
    parser.add_argument(
        "--base-model",
        help="start from this model instead of aligning one, as the paper starts from CLIP: a CLIPModel checkpoint "
        "(Hub id such as openai/clip-vit-base-patch16, or a folder) or a saved DCLIPModel; used unchanged",
    )
    parser.add_argument(
        "--detector",
        help="YOLO weights for the teacher's regions: an ultralytics name (yolov8x.pt, needs a network), a local .pt "
        "or an exported .onnx (needs onnxruntime); default: the preset's regions (a 2x2 grid)",
    )
    parser.add_argument("--detector-conf", type=float, help="minimum detection confidence (default 0.25)")
    parser.add_argument("--max-regions", type=int, help="regions per image including the whole image (default 10)")
    parser.add_argument(
        "--feature-store",
        help="folder of the feature store (default $DCLIP_FEATURE_STORE or ~/.cache/dclip/features)",
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute every stage")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..feature_store import FeatureStore
    from ..pipeline import RunLockedError, StageError, load_preset, run_pipeline

    try:
        preset = load_preset(
            args.preset,
            args.config,
            data=args.data,
            seed=args.seed,
            base_model=args.base_model,
            detector=args.detector,
            detector_conf=args.detector_conf,
            max_regions=args.max_regions,
        )
    except (ValueError, OSError) as error:
        print(f"dclip run: {error}", file=sys.stderr)
        return 2
    try:
        results = run_pipeline(
            args.output_dir, preset, overwrite=args.overwrite, store=FeatureStore(args.feature_store)
        )
    except RunLockedError as error:
        print(f"dclip run: {error}", file=sys.stderr)
        return 3
    except StageError as error:
        print(f"dclip run: {error}. Finished stages are kept in {args.output_dir}; rerun to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"dclip run: interrupted; finished stages are kept in {args.output_dir}; rerun to resume.", file=sys.stderr
        )
        return 130
    for name, metrics in results["models"].items():
        summary = ", ".join(
            f"{k} {100 * metrics[k]:.1f}" for k in ("text_to_image_R@1", "compositional_accuracy") if k in metrics
        )
        print(f"{name}: {summary}")
    print(f"results: {args.output_dir}/results.json")
    return 0
