"""Teacher re-ranking of the student's top-k on the Flickr8k test split (1,000 photos, 5,000 caption queries).

The student (`dclip index`'s exact index over the test photos) ranks every photo for every caption; the teacher
re-scores the student's top 10 / 20 / 50 with its pairwise score over the cached region features of the photos.
Reports text-to-image R@1/5/10 of the student alone and re-ranked, the student's R@k at each k (the ceiling of
re-ranking k candidates), the teacher's frozen base alone (whole gallery, and as a re-ranker of the same top-k: what
the teacher's fusion adds over its base), and the latency re-ranking adds to one query: the teacher's base reading
the query text plus scoring the k candidates (median and p95 over the first `--latency-queries` queries, one query
at a time, as `dclip search --rerank` serves it). Recall is computed for all 5,000 queries in batches of
(query, candidate) pairs.

    PYTHONPATH=. python benchmarks/search/rerank.py --student STUDENT --teacher TEACHER \\
        --data ../shared/data/flickr8k --output benchmarks/search/results.json
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modeling_dclip.atomic import write_json_atomically
from modeling_dclip.data.captions import caption_pairs
from modeling_dclip.data.spec import load_dataset_spec
from modeling_dclip.feature_store import FeatureStore
from modeling_dclip.loading import load_model_and_processor
from modeling_dclip.search.index import build_index
from modeling_dclip.search.rerank import TeacherReranker

RECALLS = (1, 5, 10)


def recall(ranked: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of queries whose true image is among the first `k` of `ranked [Q, >=k]`."""
    return float((ranked[:, :k] == truth[:, None]).any(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--data", required=True, help="Flickr8k folder (dataset_flickr8k.json + images/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--latency-queries", type=int, default=200)
    parser.add_argument("--work-dir", default="outputs/search-bench", help="index and feature store go here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/search/results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timings = {}
    work = Path(args.work_dir)
    store = FeatureStore(work / "features")

    spec = f"karpathy:{args.data}?split={args.split}"
    dataset = load_dataset_spec(spec)
    pairs = caption_pairs(dataset)
    truth = pairs.caption_to_image.numpy()
    student, student_processor = load_model_and_processor(args.student, device="cpu")
    teacher, teacher_processor = load_model_and_processor(args.teacher, device="cpu")

    started = time.perf_counter()
    index = build_index(student, student_processor, spec, work / "index", store=store, info={"model": args.student})
    assert len(index) == len(dataset), index.info["skipped"]
    timings["index_s"] = time.perf_counter() - started

    started = time.perf_counter()
    queries = store.text_embeddings(student, student_processor, pairs.captions)
    _, ranked = index.search(queries, k=max(args.ks))
    timings["student_search_s"] = time.perf_counter() - started

    started = time.perf_counter()
    reranker = TeacherReranker.for_gallery(teacher, teacher_processor, index.items["path"], store)
    timings["teacher_region_features_s"] = time.perf_counter() - started
    started = time.perf_counter()
    texts = store.text_token_features(teacher, teacher_processor, pairs.captions)
    timings["teacher_text_features_s"] = time.perf_counter() - started

    # Recall: the teacher scores every query's top max(ks) candidates in batches of pairs; the re-ranked top-k of a
    # smaller k re-sorts the first k of them (a pair's score does not depend on the other candidates).
    started = time.perf_counter()
    top = max(args.ks)
    teacher_scores = torch.cat(
        [
            reranker.score_batch(
                {key: value[first : first + 100] for key, value in texts.items()}, ranked[first : first + 100, :top]
            )
            for first in range(0, len(truth), 100)
        ]
    ).numpy()
    reranked = {}
    for k in args.ks:
        order = np.argsort(-teacher_scores[:, :k], axis=1, kind="stable")
        reranked[k] = np.take_along_axis(ranked[:, :k], order, axis=1)
    timings["rerank_all_queries_s"] = time.perf_counter() - started

    # Latency: one query at a time, as `dclip search --rerank` serves it: the teacher's base reads the text, then
    # the teacher scores the k candidates.
    latency = {k: [] for k in args.ks}
    for query in range(min(args.latency_queries, len(truth))):
        for k in args.ks:
            began = time.perf_counter()
            reranker.rerank(pairs.captions[query], ranked[query, :k])
            latency[k].append(1000 * (time.perf_counter() - began))

    results = {
        "command": "PYTHONPATH=. python " + shlex.join(sys.argv),
        "student_model": args.student,
        "teacher_model": args.teacher,
        "data": {"spec": spec, "images": len(dataset), "queries": len(truth)},
        "regions": teacher_processor.region_config,
        "student": {f"text_to_image_R@{r}": recall(ranked, truth, r) for r in sorted({*RECALLS, *args.ks})},
        "rerank": {},
        "latency_queries": min(args.latency_queries, len(truth)),
        "threads": args.threads,
        "machine": f"{platform.machine()}, 2 CPU cores shared with other jobs",
        "timings_s": {name: round(value, 1) for name, value in timings.items()},
    }
    # Why re-ranking helps or not: the teacher's frozen base alone (its whole-image and text embeddings, cached with
    # the region and text features), over the whole gallery and as a re-ranker of the same top-k.
    base_scores = texts["text_embeds"] @ reranker.features["image_embeds"].T
    base_ranked = base_scores.argsort(dim=1, descending=True, stable=True).numpy()
    results["teacher_base"] = {f"text_to_image_R@{r}": recall(base_ranked, truth, r) for r in (*RECALLS, top)}
    for k in args.ks:
        candidates = torch.from_numpy(ranked[:, :k].copy())
        order = torch.gather(base_scores, 1, candidates).argsort(dim=1, descending=True, stable=True)
        base_reranked = torch.gather(candidates, 1, order).numpy()
        results["teacher_base"][f"rerank.{k}"] = {
            f"text_to_image_R@{r}": recall(base_reranked, truth, r) for r in RECALLS
        }
    for k in args.ks:
        results["rerank"][str(k)] = {f"text_to_image_R@{r}": recall(reranked[k], truth, r) for r in RECALLS}
        results["rerank"][str(k)]["added_latency_ms_median"] = round(float(np.median(latency[k])), 2)
        results["rerank"][str(k)]["added_latency_ms_p95"] = round(float(np.percentile(latency[k], 95)), 2)
    write_json_atomically(args.output, results)
    print(results["student"], results["rerank"])


if __name__ == "__main__":
    main()
