"""`dclip regions`: detect the regions of every image of a dataset into the feature store, resumably.

This is the step `dclip run --detector` runs before the teacher, on its own: a progress bar, chunks written as they
finish (a run killed midway continues where it stopped when run again), memory flat over thousands of photos, and
several processes sharing the work under `accelerate launch -m modeling_dclip.cli regions ...`. A later `dclip run`
with the same detector settings on the same images reads the regions back instead of detecting again.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "regions",
        help="Detect the regions of a dataset's images (YOLO or grid) into the feature store, resumably.",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="dataset spec, e.g. ../shared/data/flickr8k (see dclip eval)")
    parser.add_argument(
        "--split", default="train", help="rows of this split; 'all' takes every row (default: %(default)s)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--detector",
        help="YOLO weights: an ultralytics name (yolov8x.pt, needs a network), a local .pt or an exported .onnx",
    )
    source.add_argument("--grid", type=int, nargs="+", metavar="N", help="grid regions (N x N per scale) instead")
    parser.add_argument("--conf", type=float, default=0.25, help="minimum detection confidence (default: %(default)s)")
    parser.add_argument(
        "--max-regions", type=int, default=10, help="regions per image including the whole image (default: %(default)s)"
    )
    parser.add_argument("--classes", type=int, nargs="+", help="keep only these detector class ids")
    parser.add_argument("--imgsz", type=int, default=640, help="detector input size (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="images per detector call (default: %(default)s)")
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=256,
        help="images per stored chunk, the unit of resumption (default: %(default)s)",
    )
    parser.add_argument(
        "--feature-store", help="feature store folder (default: $DCLIP_FEATURE_STORE or ~/.cache/dclip)"
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..data.spec import load_dataset_spec
    from ..feature_store import FeatureStore
    from ..regions import GridRegionExtractor, YoloRegionExtractor
    from ..training.loop import launched_without_accelerator

    try:
        dataset = load_dataset_spec(args.data)
        if args.split != "all":
            if "split" not in dataset.column_names or args.split not in set(dataset["split"]):
                splits = sorted(set(dataset["split"])) if "split" in dataset.column_names else []
                raise ValueError(f"--data {args.data} has no split {args.split!r} (splits: {splits}); use --split all")
            dataset = dataset.filter(lambda split: split == args.split, input_columns="split")
        if args.detector:
            source = YoloRegionExtractor(
                args.detector,
                conf=args.conf,
                max_regions=args.max_regions,
                classes=args.classes,
                imgsz=args.imgsz,
                batch_size=args.batch_size,
            )
        else:
            source = GridRegionExtractor(scales=args.grid, max_regions=args.max_regions)
    except (ValueError, FileNotFoundError) as error:
        print(f"dclip regions: error: {error}", file=sys.stderr)
        return 2
    # On CPUs a launcher's processes must be told so, or each believes it is the only one (see the training loop).
    state = PartialState(cpu=launched_without_accelerator())
    store = FeatureStore(args.feature_store)
    started = time.perf_counter()
    try:
        boxes = store.region_boxes(
            dataset,
            source,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            process_index=state.process_index,
            num_processes=state.num_processes,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"dclip regions: error: {error}. Finished chunks are kept; rerun to resume.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dclip regions: interrupted; finished chunks are kept, rerun to resume.", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    if not state.is_main_process:
        return 0
    counts = boxes["region_mask"].sum(dim=1) - 1
    labels = boxes["region_labels"][boxes["region_mask"].bool()]
    summary = {
        "images": len(dataset),
        "detections_per_image": round(float(counts.float().mean()), 3),
        "images_without_detection": int((counts == 0).sum()),
        "top_classes": dict(collections.Counter(labels[labels >= 0].tolist()).most_common(10)),
        "seconds": round(seconds, 2),
        "source": source.to_dict(),
        "feature_store": str(store.root),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"{summary['images']} images: {summary['detections_per_image']} detections per image, "
            f"{summary['images_without_detection']} without any, in {seconds:.1f} s; classes {summary['top_classes']}"
        )
    return 0
