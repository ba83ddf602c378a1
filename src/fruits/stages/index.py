"""index: the app's nearest-neighbour index, and the metric that matters for the app.

From the pca stage's vectors: the Training rows (PCA vector, label, image path) become the index file
the app searches (`env.paths.knn_index`). Then the accuracy the app would have: every Test row is
answered as the app answers a photo (its identify.neighbours nearest Training vectors vote, weighted
by distance), in Spark with the index broadcast (the Test rows are never collected), for the PCA's k
and for fewer components (the first j of the same projection), so that `dvc exp show` compares
experiments by what they keep for the app, not only by explained variance.

Each answer is an exact search over every Training vector, so answering every Test row would grow
with Test x Training rows. Above identify.accuracy_queries Test rows, a fixed sample of about that many
is answered: the rows whose path hash falls below a threshold, the same rows on every run over the
same data (experiments compare the same images). The cost then grows with the Training rows only.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fruits.core import tables
from fruits.core.config import stage_config
from fruits.core.images import CONTRIBUTED_PREFIX
from fruits.core.neighbours import ExactIndex, NeighbourIndex, abstain_distance, nearest_outside, vote
from fruits.core.projection import checked_projection_sha256
from fruits.core.spark import get_session
from fruits.core.storage import atomic_output, write_record

log = logging.getLogger(__name__)

# What compares experiments (the DVC metrics file); the curve is a DVC plot, timings are diagnostics.
COMPARED = ("training_vectors", "contributed_vectors", "components", "test_rows", "test_rows_answered", "knn_accuracy",
            "knn_accuracy_standard_error", "knn_accuracy_interval_95", "abstained_known", "abstained_held_back")

HASH_DIGITS = 8  # a Test row's place in the accuracy sample: the first 8 hex digits of sha256(path)
HASH_RANGE = 16**HASH_DIGITS


def extract(spark, cfg: DictConfig):
    """The PCA vectors: path, label, split, pca."""
    return tables.read(spark, cfg.env.paths.pca_vectors, cfg)


def build_index(vectors, projection_sha256: str = "", abstain_quantile: float = 1.0) -> NeighbourIndex:
    """The Training rows, collected (k values each: the small part of the table), in path order, with
    the distance beyond which the app is not sure, calibrated on them."""
    rows = vectors.where(vectors.split == "Training").select("path", "label", "pca").orderBy("path").collect()
    if not rows:
        raise ValueError("the PCA vectors hold no Training row: nothing to identify against")
    training = np.array([r["pca"] for r in rows], np.float32)
    return NeighbourIndex(training, np.array([r["label"] for r in rows]), np.array([r["path"] for r in rows]),
                          projection_sha256, abstain_distance(training, abstain_quantile))


def components_curve(k: int, wanted) -> list[int]:
    """The component counts of the accuracy curve: the configured ones up to k, and k itself."""
    return sorted({j for j in wanted if j < k} | {k})


def answers(index: NeighbourIndex, search: ExactIndex, queries: np.ndarray, neighbours: int) -> list[str]:
    """The app's first answer for each query, searched with `search` (the index on its first j components)."""
    found = search.search(queries[:, : search.vectors.shape[1]], neighbours)
    return [vote(index.labels, index.paths, d, i).labels[0] for d, i in zip(found.distances, found.indices, strict=True)]


def contributed(paths) -> int:
    """How many of the index's images are app users' approved photos (their file name says so)."""
    return sum(PurePosixPath(str(path)).name.startswith(CONTRIBUTED_PREFIX) for path in paths)


def path_hash(path: str) -> int:
    """The number the accuracy sample compares with its threshold (what `sample` computes in Spark)."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:HASH_DIGITS], 16)


def sample_threshold(test_rows: int, queries: int) -> int:
    """Test rows whose path hash is below this are answered: about `queries` of test_rows, or all of
    them (HASH_RANGE) when there are no more than that."""
    return HASH_RANGE if test_rows <= queries else math.ceil(HASH_RANGE * queries / test_rows)


def sample(test, threshold: int):
    """The Test rows whose path hash is below threshold (sha256 in Spark as in path_hash)."""
    from pyspark.sql import functions as F

    if threshold >= HASH_RANGE:
        return test
    hashed = F.conv(F.substring(F.sha2(F.col("path"), 256), 1, HASH_DIGITS), 16, 10).cast("long")
    return test.where(hashed < threshold)


def transform(test, broadcast_index, neighbours: int, curve: list[int]):
    """Test rows -> for each component count j of the curve, whether the app's answer is right; the
    distance to the nearest Training image (nearest), and to the nearest of another label (as if the
    photo's label were not in the index: nearest_other_label), both at the PCA's k."""
    from pyspark.sql.functions import pandas_udf

    schema = ", ".join(f"right_{j} boolean" for j in curve) + ", nearest double, nearest_other_label double"

    @pandas_udf(f"struct<{schema}>")
    def right_answers(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        index = broadcast_index.value
        searches = {j: ExactIndex(index.vectors[:, :j]) for j in curve}  # once per task, not per batch
        for labels, pcas in batches:
            queries = np.stack(pcas.to_numpy()) if len(pcas) else np.zeros((0, index.vectors.shape[1]))
            labels = labels.reset_index(drop=True)
            frame = pd.DataFrame({f"right_{j}": pd.Series(answers(index, searches[j], queries, neighbours), dtype=object)
                                  .eq(labels).astype(bool) for j in curve})
            frame["nearest"] = searches[curve[-1]].search(queries, 1).distances[:, 0] if len(queries) else []
            frame["nearest_other_label"] = nearest_outside(index.vectors, index.labels, queries, labels.to_numpy())
            yield frame

    return test.select(right_answers("label", "pca").alias("right")).select("right.*")


def wilson_interval(share: float, rows: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a share measured on rows rows: unlike share
    +- z x standard error it stays within [0, 1] and does not shrink to a point at 0 % or 100 %
    (30 right of 30: 0.886 to 1)."""
    spread = z * z / rows
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / rows + spread / (4 * rows)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_table(right, curve: list[int], abstain_at: float) -> tuple[int, dict[int, float], dict[str, float]]:
    """(rows answered, {components: share answered right}, {known, held_back: share the app is not sure
    of}), aggregated in Spark."""
    from pyspark.sql import functions as F

    def share(column):
        return F.avg(column.cast("double"))

    row = right.agg(F.count(F.lit(1)).alias("rows"), *[share(F.col(f"right_{j}")).alias(f"right_{j}") for j in curve],
                    share(F.col("nearest") > abstain_at).alias("known"),
                    share(F.col("nearest_other_label") > abstain_at).alias("held_back")).first()

    def rounded(value):
        return round(value, 6) if value is not None else None

    return row["rows"], {j: rounded(row[f"right_{j}"]) for j in curve}, {key: rounded(row[key]) for key in ("known", "held_back")}


def load(index: NeighbourIndex, metrics: dict, curve: dict[int, float], cfg: DictConfig) -> None:
    index.save(cfg.env.paths.knn_index)
    write_record(cfg.env.paths.index_metrics, cfg.env.paths.index_diagnostics, metrics, COMPARED)
    with atomic_output(cfg.env.paths.knn_curve) as partial, open(partial, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["components", "knn_accuracy"])
        writer.writerows([j, "" if share is None else f"{share:.6g}"] for j, share in curve.items())


def run(cfg: DictConfig, spark=None) -> dict:
    tables.require("env.paths.pca_vectors", cfg, "pca")
    projection_sha256 = checked_projection_sha256(cfg)  # the app projects photos with it: same run as the vectors
    spark = spark or get_session(cfg)
    started = time.perf_counter()
    vectors = extract(spark, cfg)
    index = build_index(vectors, projection_sha256, cfg.identify.abstain_quantile)
    k = index.vectors.shape[1]
    curve = components_curve(k, cfg.identify.curve_components)
    neighbours = min(cfg.identify.neighbours, len(index.vectors))
    test = vectors.where(vectors.split == "Test")
    test_rows = test.count()
    queries = sample(test, sample_threshold(test_rows, cfg.identify.accuracy_queries))
    broadcast_index = spark.sparkContext.broadcast(index)
    try:
        answered, accuracy, unsure = accuracy_table(transform(queries, broadcast_index, neighbours, curve), curve,
                                                    index.abstain_distance)
    finally:
        broadcast_index.unpersist()
    metrics = {
        "training_vectors": len(index.vectors),
        "contributed_vectors": contributed(index.paths),  # the app users' approved photos among them
        "components": k,
        "labels": len(set(index.labels.tolist())),
        "neighbours": neighbours,
        "test_rows": test_rows,
        "test_rows_answered": answered,  # all of them, or the fixed sample (identify.accuracy_queries)
        "knn_accuracy": accuracy[k],  # what the app answers right on Test images, at the PCA's k
        # binomial standard error of that share over the rows answered, and its 95 % Wilson interval
        # (the error reads 0 at 100 %; the interval still says how sure 30 of 30 is)
        "knn_accuracy_standard_error": (round(math.sqrt(accuracy[k] * (1 - accuracy[k]) / answered), 6)
                                        if answered else None),
        "knn_accuracy_interval_95": ([round(end, 6) for end in wilson_interval(accuracy[k], answered)]
                                     if answered else None),
        "knn_accuracy_by_components": {str(j): share for j, share in accuracy.items()},
        # "not sure" beyond this distance from every Training image (identify.abstain_quantile of their own
        # nearest-other distances); the share of Test photos it leaves unanswered, and the share it catches
        # of Test photos taken as fruits the index lacks (each without its label's images; the rest of those
        # are answered wrongly)
        "abstain_distance": round(index.abstain_distance, 6),
        "abstained_known": unsure["known"],
        "abstained_held_back": unsure["held_back"],
        "seconds": round(time.perf_counter() - started, 3),
    }
    load(index, metrics, accuracy, cfg)
    if answered:
        log.info("index: %d Training vectors (k=%d); the app's answer is right for %.1f%% of %d Test images "
                 "(of %d; %d neighbours vote); not sure of %.1f%% of them, and of %.1f%% taken as unknown fruits",
                 len(index.vectors), k, 100 * accuracy[k], answered, test_rows, neighbours, 100 * unsure["known"],
                 100 * unsure["held_back"])
    else:
        log.warning("index: no Test row answered (%d Test rows): the accuracy is not measured", test_rows)
    return metrics


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Build the app's nearest-neighbour index and measure its accuracy on Test images.", argv))


if __name__ == "__main__":
    main()
