"""Scale figures of the search index: exact (`IndexFlatIP`) and IVF-PQ side by side on random unit vectors.

Each index is a `SearchIndex` as `dclip index` builds it (float16 embeddings, id table, faiss index; IVF-PQ's
candidates re-scored against the embeddings). For each gallery size: build time, resident memory added by the
whole `SearchIndex` (RSS delta) and by the faiss index alone (serialised size), single-query latency p50/p99 at k=10,
and IVF-PQ's recall@10 against the exact index (the fraction of the exact top-10 it returns).

    PYTHONPATH=. python benchmarks/search/scale.py --sizes 100000 1000000 --dim 256
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time

import faiss
import numpy as np
import psutil
import torch

from modeling_dclip.atomic import write_json_atomically
from modeling_dclip.search.index import SearchIndex


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 100_000):  # in blocks, so that float64 temporaries stay small
        block = rng.standard_normal((min(100_000, count - start), dim), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return vectors


def rss() -> int:
    return psutil.Process().memory_info().rss


def measure(vectors: np.ndarray, queries: np.ndarray, ivf_pq: bool, k: int) -> tuple[dict, np.ndarray]:
    gc.collect()
    before = rss()
    started = time.perf_counter()
    index = SearchIndex.from_embeddings(torch.from_numpy(vectors), [str(i) for i in range(len(vectors))], ivf_pq=ivf_pq)
    build_s = time.perf_counter() - started
    memory = rss() - before
    settings = index.info["index"]
    latencies, found = [], []
    index.search(queries[:5], k)  # warm-up
    for query in queries:
        started = time.perf_counter()
        _, ids = index.search(query[None, :], k)
        latencies.append(1000 * (time.perf_counter() - started))
        found.append(ids[0])
    result = {
        "settings": settings,
        "build_s": round(build_s, 3),
        "rss_delta_mb": round(memory / 2**20, 1),
        "faiss_index_mb": round(faiss.serialize_index(index.index).nbytes / 2**20, 1),
        "query_ms_p50": round(float(np.percentile(latencies, 50)), 3),
        "query_ms_p99": round(float(np.percentile(latencies, 99)), 3),
    }
    del index
    return result, np.stack(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256, help="the student's embedding width")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/search/scale.json")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    results = {
        "command": "PYTHONPATH=. python benchmarks/search/scale.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "k"
        )
        + f" -k {args.k}",  # fmt: skip
        "dim": args.dim,
        "k": args.k,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {psutil.cpu_count()} CPU cores (shared with other jobs)",
        "faiss": faiss.__version__,
        "sizes": {},
    }
    queries = unit_vectors(args.queries, args.dim, seed=1)
    for size in args.sizes:
        vectors = unit_vectors(size, args.dim, seed=0)
        exact, exact_ids = measure(vectors, queries, ivf_pq=False, k=args.k)
        approximate, approximate_ids = measure(vectors, queries, ivf_pq=True, k=args.k)
        approximate["recall@10_vs_exact"] = round(
            float(np.mean([len(set(a) & set(e)) / args.k for a, e in zip(approximate_ids, exact_ids)])), 4
        )
        results["sizes"][str(size)] = {"exact": exact, "ivfpq": approximate}
        print(size, json.dumps(results["sizes"][str(size)]), flush=True)
        del vectors
    write_json_atomically(args.output, results)


if __name__ == "__main__":
    main()
