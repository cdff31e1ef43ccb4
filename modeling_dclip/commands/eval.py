"""`dclip eval`: evaluate a student, a teacher or any CLIP checkpoint on a dataset spec; print a table and write
`results.json`."""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomic import write_json_atomically
from ..environment import recorded_environment

TASK_NAMES = ("retrieval", "compositional", "zeroshot")
_REGION_CHOICES = (
    "processor (the extractor saved with the processor), dataset (the dataset's own boxes), grid, "
    'or a JSON object of extractor settings such as \'{"type": "yolo", "weights": "detector.pt"}\''
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Evaluate a model on a dataset: retrieval, compositional accuracy or zero-shot classification.",
        description="Evaluate a DCLIP student or teacher, or any CLIP checkpoint, on a dataset spec (see "
        "modeling_dclip.data.spec); print the metrics and write them to results.json.",
    )
    parser.add_argument("--model", required=True, help="saved model folder or Hub id (student, teacher or CLIP)")
    parser.add_argument(
        "--dataset", required=True, help="dataset spec, e.g. karpathy:DIR?split=test or imagefolder:DIR"
    )
    parser.add_argument(
        "--task", nargs="+", choices=TASK_NAMES, default=["retrieval"], help="one or more tasks (default: %(default)s)"
    )
    parser.add_argument(
        "--split", default="test", help="rows of this split are evaluated; 'all' takes every row (default: %(default)s)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--output-dir", help="write OUTPUT_DIR/results.json")
    output.add_argument("--output", help="write the results to this file (default: ./results.json)")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of python, numpy and torch (default: %(default)s)")
    parser.add_argument(
        "--templates",
        default="simple",
        help="zero-shot prompt templates: simple, cifar10, cifar100, imagenet, or one template "
        "with {} for the class name (default: %(default)s)",
    )
    parser.add_argument(
        "--classnames",
        help="zero-shot class names by label from a named set (cifar10, cifar100, "
        "imagenet) instead of the dataset's own",
    )
    parser.add_argument(
        "--regions", default="processor", help=f"teacher only, where regions come from: {_REGION_CHOICES}"
    )
    parser.add_argument(
        "--feature-store",
        help="folder of the feature store where embeddings, regions and token states are cached by content "
        "(default: $DCLIP_FEATURE_STORE or ~/.cache/dclip/features)",
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        return _evaluate(args)
    except (ValueError, FileNotFoundError, TypeError) as error:
        print(f"dclip eval: error: {error}", file=sys.stderr)
        return 2


def check_writable(output: Path) -> None:
    """Fail now, before hours of evaluation, if `output` cannot be written: its folder is created if missing, and
    a file is created and removed there.

    Raises:
        `ValueError` naming `output` and the reason (read-only location, no space, a folder in the way, ...).
    """
    if output.is_dir():
        raise ValueError(f"cannot write the results to {output}: it is a folder (pass a file to --output)")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=f".{output.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise ValueError(f"cannot write the results to {output}: {error.strerror or error}") from error


def _evaluate(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    output = Path(args.output) if args.output else Path(args.output_dir or ".") / "results.json"
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    check_writable(output)

    import numpy as np
    import torch

    from ..data.spec import DatasetSpec
    from ..evaluation import get_classnames, get_templates
    from ..evaluation.model_eval import evaluate_model, is_teacher, load_model_for_evaluation, prepare_task_inputs
    from ..feature_store import FeatureStore, region_source_from_config
    from ..modeling_dclip import DCLIPModel

    spec = DatasetSpec.parse(args.dataset)
    templates = [args.templates] if "{}" in args.templates else get_templates(args.templates)
    classnames = get_classnames(args.classnames) if args.classnames else None
    region_source = _region_source(args.regions)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    model, processor = load_model_for_evaluation(args.model, device=args.device)
    loaded_model = time.perf_counter()
    dataset = _select_split(spec.load()[0], args.split, spec)
    try:
        inputs = prepare_task_inputs(dataset, args.task, classnames, templates)
    except ValueError as error:
        raise ValueError(f"dataset {spec} (split {args.split}), task {' '.join(args.task)}: {error}") from error
    loaded_data = time.perf_counter()

    metrics = evaluate_model(
        model,
        processor,
        dataset,
        args.task,
        classnames=classnames,
        templates=templates,
        batch_size=args.batch_size,
        region_source=region_source,
        store=FeatureStore(args.feature_store),
    )
    evaluated = time.perf_counter()

    kind = "teacher" if is_teacher(model) else "student" if isinstance(model, DCLIPModel) else "dual encoder"
    results = {
        "task": list(args.task),
        "metrics": metrics,
        "model": {
            "name_or_path": args.model,
            "kind": kind,
            "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "dataset": {"spec": str(spec), "split": args.split, **inputs.sizes()},
        "seed": args.seed,
        "batch_size": args.batch_size,
        "device": str(next(model.parameters()).device),
        "versions": recorded_environment(),
        "wall_time_s": {
            "load_model": round(loaded_model - started, 3),
            "load_dataset": round(loaded_data - loaded_model, 3),
            "evaluate": round(evaluated - loaded_data, 3),
            "total": round(time.perf_counter() - started, 3),
        },
        "command": _equivalent_command(args),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if inputs.classnames is not None:
        results["zeroshot"] = {
            "classnames": inputs.classnames,
            "templates": args.templates,
            "num_templates": len(templates),
        }
    if kind == "teacher":
        results["regions"] = (region_source or region_source_from_config(processor.region_config)).to_dict()
    _print_table(results)  # first: a failed write below loses nothing that was measured
    try:
        write_json_atomically(output, results)
    except OSError as error:
        print(
            f"dclip eval: error: the metrics above could not be written to {output}: {error.strerror or error}",
            file=sys.stderr,
        )
        return 1
    print(f"results: {output}")
    return 0


def _region_source(choice: str):
    """The teacher's region source named by `--regions`; `None` for the processor's own extractor."""
    from ..feature_store import DatasetBoxes
    from ..regions import GridRegionExtractor, region_extractor_from_dict

    if choice == "processor":
        return None
    if choice == "dataset":
        return DatasetBoxes()
    if choice == "grid":
        return GridRegionExtractor()
    try:
        settings = json.loads(choice)
    except json.JSONDecodeError:
        settings = None
    if not isinstance(settings, dict):
        raise ValueError(f"--regions {choice!r} is not one of: {_REGION_CHOICES}")
    return region_extractor_from_dict(settings)


def _select_split(dataset, split: str, spec) -> Any:
    """The rows of `split`, or every row for `all` or a dataset without a `split` column."""
    if split == "all" or "split" not in dataset.column_names:
        return dataset
    values = dataset["split"]
    present = sorted(set(values))
    if split not in present:
        raise ValueError(
            f"dataset {spec} has no rows of split {split!r}; its splits are {present}. Pass --split "
            f"{present[0] if len(present) == 1 else 'NAME'} (or --split all), or name the split in the spec"
        )
    if len(present) == 1:
        return dataset
    return dataset.select([row for row, value in enumerate(values) if value == split])


def _equivalent_command(args: argparse.Namespace) -> str:
    """The `dclip eval` command line that reproduces this run, every option spelled out."""
    words = [
        "dclip",
        "eval",
        "--model",
        args.model,
        "--dataset",
        args.dataset,
        "--task",
        *args.task,
        "--split",
        args.split,
        "--batch-size",
        str(args.batch_size),
        "--seed",
        str(args.seed),
    ]
    optional = {
        "--templates": args.templates if "zeroshot" in args.task else None,
        "--classnames": args.classnames,
        "--regions": args.regions if args.regions != "processor" else None,
        "--feature-store": args.feature_store,
        "--device": args.device,
        "--output-dir": args.output_dir,
        "--output": args.output,
    }
    for option, value in optional.items():
        if value is not None:
            words += [option, value]
    return shlex.join(words)


def _print_table(results: dict[str, Any]) -> None:
    dataset, model = results["dataset"], results["model"]
    sizes = ", ".join(f"{value} {name}" for name, value in dataset.items() if name in ("images", "captions", "classes"))
    print(f"model: {model['name_or_path']} ({model['kind']}, {model['class']})")
    print(f"dataset: {dataset['spec']} (split {dataset['split']}: {sizes})")
    width = max(len(name) for name in results["metrics"])
    print(f"{'metric':<{width}}  value")
    for name, value in results["metrics"].items():
        print(f"{name:<{width}}  {value:.4f}")
    print(f"wall time: {results['wall_time_s']['total']:.1f} s")
