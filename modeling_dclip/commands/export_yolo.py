"""`dclip export-yolo`: write a dataset with boxes (synthetic scenes, COCO with instances, ...) as an ultralytics
YOLO detection dataset, the input of `dclip train-detector`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-yolo",
        help="Write a dataset with boxes as YOLO detection data (images/, labels/, data.yaml) for train-detector.",
        description="Exports any dataset spec whose rows carry boxes and labels, e.g. the synthetic scenes "
        "('synthetic:?n=500&seed=0') or COCO captions with instances "
        "('coco:captions_val2014.json?instances=instances_val2014.json'), as an ultralytics YOLO dataset, and "
        "prints the path of its data.yaml for `dclip train-detector --data`. A `split` column with train and val "
        "rows is kept; otherwise the rows are split at random.",
    )
    parser.add_argument("--data", required=True, help="dataset spec with boxes (see modeling_dclip.data.spec)")
    parser.add_argument("--output", required=True, help="new or empty folder to write the YOLO dataset to")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction held out for val when the dataset has no train/val split column (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of that random split (default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import datasets

    from ..data.spec import load_dataset_spec
    from ..data.yolo_export import export_yolo

    try:
        dataset = load_dataset_spec(args.data)
        if not isinstance(dataset, datasets.Dataset):
            raise ValueError(f"--data {args.data}: a streamed dataset cannot be exported; drop streaming=true")
        missing = {"boxes", "labels"} - set(dataset.column_names)
        if missing:
            raise ValueError(
                f"--data {args.data}: the dataset has no {sorted(missing)} column(s); export-yolo needs boxes, e.g. "
                "synthetic:?n=500 or coco:captions.json?instances=instances.json"
            )
        data_yaml = export_yolo(dataset, args.output, val_fraction=args.val_fraction, seed=args.seed)
    except (ValueError, OSError) as error:
        print(f"dclip export-yolo: {error}", file=sys.stderr)
        return 2
    print(data_yaml)
    return 0
