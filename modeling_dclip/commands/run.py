"""`dclip run`: the whole pipeline on the embedded default (or `--data`), into `--output-dir`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="Generate data, align the base, train the teacher, distil the student, evaluate all three.",
        description="Runs every stage and writes base/, teacher/, student/, results.json and results.md. "
        "Finished stages are reused unless --overwrite.",
    )
    parser.add_argument("--output-dir", default="outputs/dclip-run", help="where results go (default: %(default)s)")
    parser.add_argument("--preset", default="default", help="default (10 min on 2 CPU cores), tiny, or large")
    parser.add_argument("--config", help="YAML file of preset fields (train_images, image_size, align: {...}, ...)")
    parser.add_argument("--data", help="dataset spec with train and test splits, e.g. ../shared/data/flickr8k-1k")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--overwrite", action="store_true", help="recompute every stage")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training.pipeline import StageError, load_preset, run_pipeline

    try:
        preset = load_preset(args.preset, args.config, data=args.data, seed=args.seed)
    except (ValueError, OSError) as error:
        print(f"dclip run: {error}", file=sys.stderr)
        return 2
    try:
        results = run_pipeline(args.output_dir, preset, overwrite=args.overwrite)
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
