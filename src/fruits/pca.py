"""pca: reduce the 1280-d features with Spark ML's PCA, fitted on the Training split.

The full explained-variance spectrum comes from one fit (Spark computes the whole eigen-decomposition
of the covariance whatever k is), so k is chosen from it, by `pca.k` or by the smallest k reaching
`pca.variance`, and the fitted components are truncated to k without a second pass over the data.
"""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

log = logging.getLogger(__name__)

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


def lapack_implementation(spark) -> str:
    """Which LAPACK Spark ML uses: native (JNI) or the Java fallback (wrong on tiny-magnitude data)."""
    return spark._jvm.dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName()


def extract(spark, cfg: DictConfig):
    """The featurize output, with the features as an ML vector."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    features = spark.read.parquet(cfg.env.paths.features)
    return features.withColumn(VECTOR, array_to_vector(F.col("features")))


def fit_full_spectrum(train, standardize: bool):
    """(scaler model or None, PCA model with every component). One pass for the covariance."""
    from pyspark.ml.feature import PCA, StandardScaler

    scaler = None
    column = VECTOR
    if standardize:
        scaler = StandardScaler(inputCol=VECTOR, outputCol=SCALED, withMean=True, withStd=True).fit(train)
        train = scaler.transform(train)
        column = SCALED
    dimension = len(train.select(VECTOR).first()[0])
    pca = PCA(k=dimension, inputCol=column, outputCol=OUTPUT).fit(train)
    return scaler, pca


def truncate(full_model, k: int, spark_context):
    """A PCAModel keeping the first k components of full_model (Spark's own class, saved as Spark saves it)."""
    from pyspark.ml.common import _py2java
    from pyspark.ml.feature import PCAModel
    from pyspark.ml.linalg import DenseMatrix, DenseVector

    components = full_model.pc.toArray()[:, :k]
    explained = full_model.explainedVariance.toArray()[:k]
    java_model = spark_context._jvm.org.apache.spark.ml.feature.PCAModel(
        full_model.uid,
        _py2java(spark_context, DenseMatrix(components.shape[0], k, components.flatten(order="F").tolist())),
        _py2java(spark_context, DenseVector(explained.tolist())),
    )
    model = PCAModel(java_model)
    model._set(k=k, inputCol=full_model.getInputCol(), outputCol=full_model.getOutputCol())
    model._transfer_params_to_java()
    return model


def transform(features, pipeline_model):
    """path, label, split, pca (array<double>) for every split."""
    from pyspark.ml.functions import vector_to_array

    projected = pipeline_model.transform(features)
    return projected.select("path", "label", "split", vector_to_array(OUTPUT).alias("pca"))


def write_variance_curve(path: Path, explained: np.ndarray, rank: int) -> None:
    """The scree and cumulative curves (a DVC plot), up to the rank of the fitted data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cumulative = np.cumsum(explained)
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["component", "explained_variance", "cumulative_explained_variance"])
        for i in range(min(rank, len(explained))):
            writer.writerow([i + 1, f"{explained[i]:.8g}", f"{cumulative[i]:.8g}"])


def run(cfg: DictConfig, spark=None) -> dict:
    from pyspark.ml import PipelineModel
    from pyspark.sql import functions as F

    from fruits.spark import get_session
    from fruits.storage import write_json

    spark = spark or get_session(cfg)
    started = time.perf_counter()
    lapack = lapack_implementation(spark)
    if lapack != "JNILAPACK":
        log.warning("Spark ML uses %s, not native LAPACK: install libblas3 liblapack3 (make check-system)", lapack)
    features = extract(spark, cfg)
    train = features.where(F.col("split") == "Training")
    rows_fitted = train.count()
    if rows_fitted < 2:
        raise ValueError(f"pca needs at least 2 Training rows in {cfg.env.paths.features}, found {rows_fitted}")
    scaler, full = fit_full_spectrum(train, cfg.pca.standardize)
    explained = full.explainedVariance.toArray()
    k, why = choose_k(explained, cfg.pca.k, cfg.pca.variance)
    stages = ([scaler] if scaler else []) + [truncate(full, k, spark.sparkContext)]
    pipeline_model = PipelineModel(stages)
    pipeline_model.write().overwrite().save(cfg.env.paths.pca_model)
    transform(features, pipeline_model).write.mode("overwrite").parquet(cfg.env.paths.pca_vectors)

    rank = min(rows_fitted - 1, len(explained))
    write_variance_curve(Path(cfg.env.paths.metrics) / "pca_variance.csv", explained, rank)
    cumulative = np.cumsum(explained)
    metrics = {
        "k": k,
        "k_rule": why,
        "explained_variance_at_k": round(float(cumulative[k - 1]), 6),
        "components_for_90pct": int(np.searchsorted(cumulative, 0.9) + 1),
        "components_for_95pct": int(np.searchsorted(cumulative, 0.95) + 1),
        "dimension": len(explained),
        "rows_fitted": rows_fitted,
        "rows_projected": spark.read.parquet(cfg.env.paths.pca_vectors).count(),
        "standardize": bool(cfg.pca.standardize),
        "lapack": lapack,
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json(Path(cfg.env.paths.metrics) / "pca.json", metrics)
    log.info("pca: k=%d (%s) keeps %.1f%% of the variance", k, why, 100 * metrics["explained_variance_at_k"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    from fruits.config import stage_config
    from fruits.steps import dispatch

    dispatch("pca", stage_config("Fit the PCA on the Training features and project every split.", argv), run)


if __name__ == "__main__":
    main()
