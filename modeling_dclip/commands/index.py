"""`dclip index`: embed a gallery of images with a student and write a searchable index folder."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="Embed a folder of images (or a dataset spec) and write a faiss index for `dclip search`.",
        description="Embeds every image in chunks kept in the feature store (a killed run resumes where it stopped), "
        "then writes OUTPUT/{embeddings.safetensors,index.faiss,items.parquet,index.json}. Images that cannot be "
        "read are listed and skipped.",
    )
    parser.add_argument("--model", required=True, help="student (or any CLIP dual encoder) folder or Hub id")
    parser.add_argument(
        "--images", required=True, help="a folder of images, or a dataset spec such as karpathy:DIR?split=test"
    )
    parser.add_argument("--output", required=True, help="the index folder to write")
    parser.add_argument("--batch-size", type=int, default=64, help="images encoded at once (default: %(default)s)")
    parser.add_argument(
        "--chunk-size", type=int, default=1024, help="images per kept chunk of embeddings (default: %(default)s)"
    )
    parser.add_argument(
        "--ivf-pq",
        action="store_true",
        help="approximate IVF-PQ index even for a small gallery (default: exact below 100,000 images)",
    )
    parser.add_argument(
        "--rerank-teacher",
        help="a DCLIP teacher whose region features of the gallery are computed now (into the feature store), "
        "for `dclip search --rerank`",
    )
    parser.add_argument(
        "--feature-store", help="feature store folder (default: $DCLIP_FEATURE_STORE, else ~/.cache/dclip/features)"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..feature_store import FeatureStore
    from ..loading import load_model_and_processor
    from ..modeling_dclip import DCLIPTeacherModel
    from ..search.index import build_index

    try:
        if args.batch_size < 1 or args.chunk_size < 1:
            raise ValueError("--batch-size and --chunk-size must be positive integers")
        store = FeatureStore(args.feature_store)
        model, processor = load_model_and_processor(args.model, device=args.device)
        if isinstance(model, DCLIPTeacherModel):
            raise ValueError(f"--model {args.model}: a DCLIP teacher has no image embeddings; index with a student")
        index = build_index(
            model,
            processor,
            args.images,
            args.output,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            ivf_pq=True if args.ivf_pq else None,
            store=store,
            info={"model": args.model},
        )
        for problem in index.info["skipped"]:
            print(f"dclip index: skipped {problem}", file=sys.stderr)
        if args.rerank_teacher:
            from ..search.rerank import load_reranker

            load_reranker(args.rerank_teacher, index.items["path"], store, device=args.device)
            print(f"the teacher's region features of the gallery are in the feature store {store.root}")
    except (ValueError, FileNotFoundError) as error:
        print(f"dclip index: error: {error}", file=sys.stderr)
        return 2
    kind = index.info["index"]["type"]
    print(f"indexed {len(index)} images ({len(index.info['skipped'])} skipped, {kind} index) into {args.output}")
    return 0
