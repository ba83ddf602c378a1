"""Nearest neighbours in PCA space, engine-free: the Training vectors with their labels and paths, an
exact search (numpy) or an approximate one (faiss HNSW) behind one interface, and the weighted vote
that turns neighbours into an answer. Used by the index stage (Spark) and by the app (no Spark).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fruits.core.storage import atomic_output

EXACT_UP_TO = 1_000_000  # vectors: above this, `kind: auto` builds the approximate index
VOTE_EPSILON = 1e-9  # keeps an exact match (distance 0) finite


@dataclass(frozen=True)
class Neighbours:
    distances: np.ndarray  # (queries, n) Euclidean, nearest first
    indices: np.ndarray  # (queries, n) rows of the index


class ExactIndex:
    """Brute force in numpy: exact, memory = the vectors (float64), fast to ~1M vectors of k <= 100."""

    kind = "exact"

    def __init__(self, vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float64)  # float64: a photo's own image is at 0
        self.norms = (self.vectors**2).sum(1)

    def search(self, queries: np.ndarray, n: int, block: int = 1024) -> Neighbours:
        queries = np.atleast_2d(np.asarray(queries, np.float64))
        n = min(n, len(self.vectors))
        if not len(queries):
            return Neighbours(np.zeros((0, n)), np.zeros((0, n), np.int64))
        distances, indices = [], []
        for start in range(0, len(queries), block):  # bounded memory: a block of queries at a time
            q = queries[start : start + block]
            squared = (q**2).sum(1)[:, None] - 2 * q @ self.vectors.T + self.norms[None, :]
            nearest = np.argpartition(squared, n - 1, axis=1)[:, :n]
            order = np.take_along_axis(squared, nearest, 1).argsort(1, kind="stable")
            nearest = np.take_along_axis(nearest, order, 1)
            distances.append(np.sqrt(np.maximum(np.take_along_axis(squared, nearest, 1), 0)))
            indices.append(nearest)
        return Neighbours(np.concatenate(distances), np.concatenate(indices))


class HnswIndex:
    """Approximate search (faiss HNSW, M links per node): sub-linear queries for millions of vectors."""

    kind = "hnsw"

    def __init__(self, vectors: np.ndarray, links: int = 32, search_depth: int = 256, build_depth: int = 200):
        import faiss

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], links)
        self.index.hnsw.efConstruction = build_depth
        self.index.hnsw.efSearch = search_depth
        self.index.add(vectors)

    def search(self, queries: np.ndarray, n: int) -> Neighbours:
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        squared, indices = self.index.search(queries, n)
        return Neighbours(np.sqrt(np.maximum(squared, 0)), indices)


def build_search(vectors: np.ndarray, kind: str = "auto"):
    """The search structure for these vectors: exact, hnsw, or auto (exact up to EXACT_UP_TO vectors)."""
    if kind not in ("auto", "exact", "hnsw"):
        raise ValueError(f"identify.index_kind={kind} is not one of auto, exact, hnsw")
    if kind == "hnsw" or (kind == "auto" and len(vectors) > EXACT_UP_TO):
        return HnswIndex(vectors)
    return ExactIndex(vectors)


def recall_at(approximate: Neighbours, exact: Neighbours, n: int) -> float:
    """Share of the exact n nearest that the approximate search also returns in its first n."""
    hits = [len(set(a[:n]) & set(e[:n])) for a, e in zip(approximate.indices, exact.indices, strict=True)]
    return sum(hits) / (n * len(hits))


def nearest_outside(vectors: np.ndarray, vector_groups: np.ndarray, queries: np.ndarray, query_groups: np.ndarray,
                    block: int = 256) -> np.ndarray:
    """Each query's distance to its nearest vector of another group (inf when there is none). With rows
    as groups: a Training vector's nearest other image; with labels: a Test photo's nearest image of
    another label, i.e. its nearest neighbour if its label were not in the index."""
    vectors = np.asarray(vectors, np.float64)
    queries = np.atleast_2d(np.asarray(queries, np.float64))
    norms, nearest = (vectors**2).sum(1), np.full(len(queries), np.inf)
    for start in range(0, len(queries), block):  # bounded memory: (block x vectors) distances at a time
        q = queries[start : start + block]
        squared = (q**2).sum(1)[:, None] - 2 * q @ vectors.T + norms[None, :]
        squared[query_groups[start : start + block, None] == vector_groups[None, :]] = np.inf
        nearest[start : start + block] = np.sqrt(np.maximum(squared.min(1, initial=np.inf), 0))
    return nearest


def abstain_distance(vectors: np.ndarray, quantile: float, sample: int = 5000) -> float:
    """The distance beyond which the app says it is not sure: this quantile of the Training vectors'
    distances to their nearest other Training image (a fixed sample of at most `sample` of them: the
    cost stays linear in the index). A photo of a fruit the index holds is usually about that close to
    one of its images; one farther than nearly all of them is likely a fruit the index lacks."""
    if len(vectors) < 2:
        return float("inf")
    rows = np.arange(len(vectors))
    chosen = np.random.default_rng(0).choice(rows, min(sample, len(rows)), replace=False)
    distances = nearest_outside(vectors, rows, vectors[chosen], chosen)
    return float(np.quantile(distances, quantile))


@dataclass(frozen=True)
class Vote:
    labels: list[str]  # best first
    scores: list[float]  # each label's share of the weight, summing to 1
    nearest: list[tuple[str, float, str]]  # (label, distance, path) of each neighbour


def vote(labels: np.ndarray, paths: np.ndarray, neighbours_distances: np.ndarray, neighbours_indices: np.ndarray) -> Vote:
    """One query's answer: each neighbour votes for its label with weight 1 / distance; the scores are
    the labels' shares of the total weight (the confidence of the first is its share)."""
    weights: dict[str, float] = {}
    nearest = []
    for distance, index in zip(neighbours_distances, neighbours_indices, strict=True):
        if index < 0:  # an approximate search found fewer than asked
            continue
        label = str(labels[index])
        weights[label] = weights.get(label, 0.0) + 1.0 / (float(distance) + VOTE_EPSILON)
        nearest.append((label, float(distance), str(paths[index])))
    total = sum(weights.values()) or 1.0
    ranked = sorted(weights.items(), key=lambda item: (-item[1], item[0]))
    return Vote([label for label, _ in ranked], [w / total for _, w in ranked], nearest)


@dataclass(frozen=True)
class NeighbourIndex:
    """The Training vectors in PCA space, their labels and image paths: what the app searches."""

    vectors: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    projection_sha256: str = ""  # of the projection that made the vectors ("": not recorded)
    abstain_distance: float = float("inf")  # farther than this from every vector: not sure (inf: always sure)

    def save(self, path: str | Path) -> None:
        """One .npz file, written aside then renamed: a reader never sees half of it."""
        with atomic_output(path) as partial, open(partial, "wb") as stream:  # a stream: savez adds no suffix
            np.savez(stream, vectors=self.vectors.astype(np.float32), labels=self.labels.astype(str),
                     paths=self.paths.astype(str), projection_sha256=np.array(self.projection_sha256),
                     abstain_distance=np.array(self.abstain_distance))

    @classmethod
    def load(cls, path: str | Path) -> NeighbourIndex:
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} not found: run the index stage first (dvc repro, or "
                                    "python -m fruits.stages.index)")
        return cls.read(Path(path).read_bytes())

    @classmethod
    def read(cls, content: bytes) -> NeighbourIndex:
        """The index from a file's bytes (the app checksums the same bytes it loads)."""
        with np.load(io.BytesIO(content), allow_pickle=False) as data:
            made_by = str(data["projection_sha256"]) if "projection_sha256" in data.files else ""
            far = float(data["abstain_distance"]) if "abstain_distance" in data.files else float("inf")
            return cls(data["vectors"], data["labels"], data["paths"], made_by, far)
