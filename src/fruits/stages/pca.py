"""pca: reduce the 1280-d features with Spark ML's PCA, fitted on the Training split.

The full explained-variance spectrum comes from one fit (Spark computes the whole eigen-decomposition
of the covariance whatever k is), so k is chosen from it, by `pca.k` or by the smallest k reaching
`pca.variance`, without a second pass over the data. The fitted projection for that k is written as
a small numpy artifact (`env.paths.pca_projection`), and every split is projected with it, in Spark:
the pipeline's vectors and the app's projection of one photo are the same computation.
"""

from __future__ import annotations

import csv
import io
import logging
import time

import numpy as np
from omegaconf import DictConfig

from fruits.core import tables
from fruits.core.backbone import FEATURE_DIM
from fruits.core.config import stage_config
from fruits.core.errors import ConfigError
from fruits.core.images import TRAINING
from fruits.core.projection import Projection, save_projection
from fruits.core.spark import get_session
from fruits.core.storage import Storage, file_digest, write_record, write_text
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

# What compares experiments (the DVC metrics file); timings go to the diagnostics file. version: the
# committed vectors', which the index stage's DVC dependency (this file, on EMR) must see change.
COMPARED = ("k", "k_rule", "explained_variance_at_k", "components_for_90pct", "components_for_95pct", "rows_fitted",
            "version")

VECTOR = "features_vector"
SCALED = "features_scaled"
OUTPUT = "pca_vector"


def choose_k(explained: np.ndarray, k: int | None, variance: float | None) -> tuple[int, str]:
    """(k, why): the configured k, or the smallest k whose cumulative explained variance reaches it."""
    cumulative = np.cumsum(explained)
    if variance is not None:
        reached = np.nonzero(cumulative >= variance - 1e-12)[0]
        chosen = int(reached[0]) + 1 if len(reached) else len(explained)
        return chosen, f"smallest k with cumulative explained variance >= {variance}"
    if k > len(explained):
        raise ValueError(f"pca.k={k} exceeds the feature dimension {len(explained)}")
    return int(k), "pca.k"


def extract(spark, cfg: DictConfig):
    """The featurize output: path, label, split, features."""
    return tables.read(spark, cfg.env.paths.features, Storage.of(cfg))


def fit_full_spectrum(train, standardize: bool):
    """(scaler model or None, PCA model with every component), Spark ML on the Training rows."""
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    train = train.withColumn(VECTOR, array_to_vector(F.col("features")))
    scaler = None
    column = VECTOR
    if standardize:
        scaler = StandardScaler(inputCol=VECTOR, outputCol=SCALED, withMean=True, withStd=True).fit(train)
        train = scaler.transform(train)
        column = SCALED
    dimension = len(train.select(VECTOR).first()[0])
    pca = PCA(k=dimension, inputCol=column, outputCol=OUTPUT).fit(train)
    return scaler, pca


def with_fixed_signs(components: np.ndarray) -> np.ndarray:
    """Each component (a column) turned so that its largest loading is positive. An eigenvector's sign
    is arbitrary: the same features summed in another order (other partitions, another cluster) can
    flip it, and with it that coordinate of every PCA vector."""
    largest = np.abs(components).argmax(axis=0)
    signs = np.sign(components[largest, np.arange(components.shape[1])])
    return components * np.where(signs == 0, 1.0, signs)


def projection_for(scaler, full_model, k: int) -> Projection:
    """The first k components of the fitted models, as the engine-free artifact."""
    components = with_fixed_signs(full_model.pc.toArray()[:, :k])
    dimension = components.shape[0]
    if scaler is None:
        shift, factor = np.zeros(dimension), np.ones(dimension)
    else:  # Spark's StandardScaler: (x - mean) * (1 / std), 0 for a constant feature
        std = scaler.std.toArray()
        shift = scaler.mean.toArray()
        factor = np.divide(1.0, std, out=np.zeros_like(std), where=std != 0)
    return Projection(components, shift, factor, full_model.explainedVariance.toArray()[:k])


def transform(features, broadcast_projection):
    """path, label, split, features -> path, label, split, pca (array<double>, k values)."""
    from pyspark.sql.functions import pandas_udf

    @pandas_udf("array<double>")
    def project(batch):
        import pandas as pd

        vectors = broadcast_projection.value.project(np.stack(batch.to_numpy())) if len(batch) else []
        return pd.Series(list(vectors), index=batch.index, dtype=object)

    return features.select("path", "label", "split", project("features").alias("pca"))


def variance_curve(explained: np.ndarray, rank: int) -> list[tuple[int, float, float]]:
    """(component, share, cumulative share), up to the rank of the fitted data."""
    cumulative = np.cumsum(explained)
    return [(i + 1, float(explained[i]), float(cumulative[i])) for i in range(min(rank, len(explained)))]


def load(vectors, projection: Projection, curve, cfg: DictConfig) -> str:
    """The PCA vectors (Parquet), the projection artifact, the variance curve (a DVC plot).

    The vectors are written as a new version, the projection and the curve replaced atomically, then
    the vectors committed with the projection's checksum: a run killed before the commit leaves the
    previous vectors, and readers can tell that the projection beside them is not theirs."""
    version = tables.new_version()
    tables.write_version(vectors, cfg.env.paths.pca_vectors, version)
    saved = save_projection(projection, cfg.env.paths.pca_projection)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["component", "explained_variance", "cumulative_explained_variance"])
    writer.writerows([component, f"{share:.8g}", f"{cumulative:.8g}"] for component, share, cumulative in curve)
    write_text(cfg.env.paths.pca_variance, text.getvalue())
    tables.commit(cfg.env.paths.pca_vectors, version, Storage.of(cfg), {"projection_sha256": file_digest(saved)})
    return version


def check_k(settings: DictConfig) -> None:
    """pca.k within the features' dimension (the backbone's), refused before any work."""
    if settings.variance is None and settings.k > FEATURE_DIM:
        raise ConfigError(f"pca.k={settings.k} is larger than the feature dimension {FEATURE_DIM}: use at most {FEATURE_DIM}")


def run(cfg: DictConfig, spark=None) -> dict:
    from pyspark.sql import functions as F

    check_k(cfg.pca)
    tables.require("env.paths.features", cfg, "featurize")
    spark = spark or get_session(cfg)
    started = time.perf_counter()
    features = extract(spark, cfg)
    train = features.where(F.col("split") == TRAINING)
    rows_fitted = train.count()
    if rows_fitted < 2:
        raise ValueError(f"pca needs at least 2 Training rows in {cfg.env.paths.features}, found {rows_fitted}")
    scaler, full = fit_full_spectrum(train, cfg.pca.standardize)
    explained = full.explainedVariance.toArray()
    k, why = choose_k(explained, cfg.pca.k, cfg.pca.variance)
    projection = projection_for(scaler, full, k)
    broadcast_projection = spark.sparkContext.broadcast(projection)
    try:
        curve = variance_curve(explained, min(rows_fitted - 1, len(explained)))
        version = load(transform(features, broadcast_projection), projection, curve, cfg)
    finally:
        broadcast_projection.unpersist()
    cumulative = np.cumsum(explained)
    metrics = {
        "k": k,
        "k_rule": why,
        "explained_variance_at_k": round(float(cumulative[k - 1]), 6),
        "components_for_90pct": int(np.searchsorted(cumulative, 0.9) + 1),
        "components_for_95pct": int(np.searchsorted(cumulative, 0.95) + 1),
        "dimension": len(explained),
        "rows_fitted": rows_fitted,
        "rows_projected": tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).count(),
        "standardize": bool(cfg.pca.standardize),
        "version": version,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_record(cfg.env.paths.pca_metrics, cfg.env.paths.pca_diagnostics, metrics, COMPARED)
    log.info("pca: k=%d (%s) keeps %.1f%% of the variance", k, why, 100 * metrics["explained_variance_at_k"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Fit the PCA on the Training features and project every split.", argv))


if __name__ == "__main__":
    run_command(main)
