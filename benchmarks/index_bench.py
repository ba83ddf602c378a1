"""Exact vs approximate nearest neighbours for the app: `make bench-index`.

On synthetic vectors shaped like the index (100k Training vectors in PCA space, k = 20 and 50
components, clustered like labels): exact search (numpy) and faiss HNSW behind the same interface,
recall@5 of HNSW against exact, build time and query latency for one photo at a time.
Writes reports/index_bench.json and .md. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fruits.core.neighbours import ExactIndex, HnswIndex, recall_at
from measure import write_results


def clustered(rows: int, dimension: int, labels: int, rng) -> np.ndarray:
    centres = rng.standard_normal((labels, dimension)) * 3
    return (centres[rng.integers(0, labels, rows)] + rng.standard_normal((rows, dimension))).astype(np.float32)


def one_dimension(rows: int, dimension: int, queries: int, n: int) -> dict:
    rng = np.random.default_rng(dimension)
    vectors, asked = clustered(rows, dimension, 155, rng), clustered(queries, dimension, 155, rng)
    started = time.perf_counter()
    exact_index = ExactIndex(vectors)
    exact_build = time.perf_counter() - started
    started = time.perf_counter()
    exact = exact_index.search(asked, n)
    exact_batch = time.perf_counter() - started
    started = time.perf_counter()
    for q in asked[:100]:
        exact_index.search(q, n)
    exact_single_ms = (time.perf_counter() - started) / 100 * 1000
    started = time.perf_counter()
    hnsw_index = HnswIndex(vectors)
    hnsw_build = time.perf_counter() - started
    approximate = hnsw_index.search(asked, n)
    started = time.perf_counter()
    for q in asked[:100]:
        hnsw_index.search(q, n)
    hnsw_single_ms = (time.perf_counter() - started) / 100 * 1000
    row = {"vectors": rows, "dimension": dimension, "queries": queries, "n": n,
           "recall_at_n": round(recall_at(approximate, exact, n), 4),
           "exact_build_s": round(exact_build, 3), "exact_batch_s": round(exact_batch, 3),
           "exact_one_query_ms": round(exact_single_ms, 3), "hnsw_build_s": round(hnsw_build, 2),
           "hnsw_one_query_ms": round(hnsw_single_ms, 3)}
    print(f"  {rows:,} x {dimension}: recall@{n} {row['recall_at_n']:.4f}; one query: exact {row['exact_one_query_ms']} ms, "
          f"HNSW {row['hnsw_one_query_ms']} ms (built in {row['hnsw_build_s']} s)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1_000)
    args = parser.parse_args()
    rows = [one_dimension(args.rows, dimension, args.queries, 5) for dimension in (20, 50)]
    lines = ["| vectors | dimension | recall@5 (HNSW vs exact) | exact, one query (ms) | HNSW, one query (ms) | HNSW build (s) |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['vectors']:,} | {r['dimension']} | {r['recall_at_n']} | {r['exact_one_query_ms']} | "
              f"{r['hnsw_one_query_ms']} | {r['hnsw_build_s']} |" for r in rows]
    print(write_results("index_bench", rows, lines))


if __name__ == "__main__":
    main()
