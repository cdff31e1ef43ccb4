"""`dclip search`: the gallery images of an index closest to a text or an image, optionally re-ranked by a
DCLIP teacher."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="Search an index written by `dclip index` with a text or an image.",
        description="Prints the k best gallery images with their scores, best first. With --rerank, the student's "
        "top --rerank-k images are re-ordered by a DCLIP teacher's pairwise score (text queries only).",
    )
    parser.add_argument("--index", required=True, help="index folder written by `dclip index`")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("text", nargs="?", help="a text query")
    query.add_argument("--image", help="an image file as the query")
    parser.add_argument("-k", type=int, default=10, help="results shown (default: %(default)s)")
    parser.add_argument("--model", help="the student to embed the query with (default: the index's own)")
    parser.add_argument("--rerank", metavar="TEACHER", help="re-rank the student's top --rerank-k with this teacher")
    parser.add_argument(
        "--rerank-k", type=int, default=50, help="candidates the teacher re-scores (default: %(default)s)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--feature-store", help="feature store folder (default: $DCLIP_FEATURE_STORE, else ~/.cache/dclip/features)"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        results = _search(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"dclip search: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results["results"]:
            teacher = f"  teacher {result['teacher_score']:.4f}" if "teacher_score" in result else ""
            print(f"{result['rank']:>3}  {result['score']:.4f}{teacher}  {result['path']}")
    return 0


def _search(args: argparse.Namespace) -> dict:
    import numpy as np

    from ..encoding import encode_images, encode_texts
    from ..loading import load_model_and_processor
    from ..search.index import load_index

    if args.k < 1 or args.rerank_k < 1:
        raise ValueError("-k and --rerank-k must be positive integers")
    if args.rerank and args.image:
        raise ValueError("--rerank needs a text query: the teacher scores (text, image) pairs")
    index = load_index(args.index)
    model_name = args.model or index.info.get("model")
    if not model_name:
        raise ValueError(f"{args.index}: the index does not name its model; give --model")
    model, processor = load_model_and_processor(model_name, device=args.device)
    if args.image:
        query = encode_images(model, processor, [args.image])
    else:
        if not args.text.strip():
            raise ValueError("the text query is empty")
        query = encode_texts(model, processor, [args.text])
    if query.shape[1] != index.embeddings.shape[1]:
        raise ValueError(
            f"model {model_name} embeds into {query.shape[1]} dimensions, the index {args.index} holds "
            f"{index.embeddings.shape[1]}: search with the model that built the index"
        )
    scores, ids = index.search(query, max(args.k, args.rerank_k if args.rerank else 0))
    scores, ids = scores[0], ids[0]
    teacher_scores = None
    if args.rerank:
        from ..feature_store import FeatureStore
        from ..search.rerank import load_reranker

        store = FeatureStore(args.feature_store)
        reranker = load_reranker(args.rerank, index.items["path"], store, device=args.device)
        student = dict(zip(ids.tolist(), scores.tolist()))
        reranked, teacher_scores = reranker.rerank(args.text, ids[: args.rerank_k])
        # Beyond the re-ranked candidates the student's order stands.
        ids = np.concatenate([reranked, ids[args.rerank_k :]])
        scores = [student[i] for i in ids.tolist()]
    results = []
    for rank, (item, score) in enumerate(zip(ids[: args.k].tolist(), list(scores)[: args.k]), start=1):
        row = index.items[int(item)]
        result = {"rank": rank, "id": int(item), "path": row["path"], "score": float(score)}
        if row["captions"]:
            result["captions"] = row["captions"]
        if teacher_scores is not None and rank <= len(teacher_scores):
            result["teacher_score"] = float(teacher_scores[rank - 1])
        results.append(result)
    return {
        "index": args.index,
        "query": {"text": args.text} if args.text else {"image": args.image},
        "model": model_name,
        "rerank": {"teacher": args.rerank, "k": args.rerank_k} if args.rerank else None,
        "results": results,
    }
