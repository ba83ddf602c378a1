import json
from pathlib import Path

import numpy as np
import pytest

from fruits.core import tables
from fruits.core.projection import Projection, load_projection, save_projection
from fruits.stages import pca
from fruits.core.storage import Storage
from helpers.data import synthetic_features, write_features

from helpers.project import make_cfg


def test_choose_k_from_config_or_from_a_variance_target():
    explained = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert pca.choose_k(explained, 2, None) == (2, "pca.k")
    assert pca.choose_k(explained, 2, 0.9)[0] == 3  # 0.5 + 0.3 + 0.1 reaches 0.9 exactly
    assert pca.choose_k(explained, 2, 0.91)[0] == 4
    assert pca.choose_k(explained, 2, 1.0)[0] == 5
    with pytest.raises(ValueError, match="pca.k=9 exceeds the feature dimension 5"):
        pca.choose_k(explained, 9, None)


def numpy_pca(train: np.ndarray, standardize: bool):
    mean = train.mean(axis=0)
    if standardize:  # as Spark's StandardScaler: a constant feature becomes 0
        std = train.std(axis=0, ddof=1)
        centred = (train - mean) * np.divide(1.0, std, out=np.zeros_like(std), where=std != 0)
    else:
        std, centred = None, train - mean
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    eigenvalues = singular**2
    return eigenvalues / eigenvalues.sum(), components.T, mean, std


@pytest.mark.parametrize("standardize, scale", [(False, 1.0), (True, 1.0), (False, 1e-11)])
def test_spark_pca_matches_numpy_svd(spark, tmp_path, standardize, scale):
    # scale 1e-11: the magnitude of Keras' default-initialised features, where Spark's Java LAPACK
    # fallback returned 0.27 cumulative variance instead of 0.99.
    cfg = make_cfg(tmp_path, "pca.k=4", f"pca.standardize={standardize}")
    features = synthetic_features(60, 40, scale).astype(np.float32).astype(np.float64)
    write_features(spark, cfg, features, train_rows=45)
    metrics = pca.run(cfg, spark)

    explained, components, mean, std = numpy_pca(features[:45], standardize)
    curve = np.loadtxt(cfg.env.paths.pca_variance, delimiter=",", skiprows=1)
    np.testing.assert_allclose(curve[:6, 1], explained[:6], rtol=1e-6)
    assert metrics["explained_variance_at_k"] == pytest.approx(explained[:4].sum(), rel=1e-6)
    assert metrics["rows_fitted"] == 45 and metrics["rows_projected"] == 60 and metrics["k"] == 4

    projected = tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).collect()
    order = np.argsort([int(r["path"].rsplit("/", 1)[1][:-4]) for r in projected])
    actual = np.array([projected[i]["pca"] for i in order])
    inputs = (features - mean) / std if standardize else features  # Spark's PCA itself does not centre
    expected = inputs @ components[:, :4]
    signs = np.sign((actual * expected).sum(axis=0))  # each component is defined up to its sign
    np.testing.assert_allclose(actual * signs, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("standardize", [False, True])
def test_the_projection_artifact_gives_spark_mls_own_vectors(spark, tmp_path, standardize):
    """numpy + the .npz artifact (what the app uses) = Spark ML's StandardScaler + PCA transform, to 1e-6."""
    from pyspark.ml.feature import PCA, StandardScaler
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    cfg = make_cfg(tmp_path, "pca.variance=0.9", f"pca.standardize={standardize}")
    features = synthetic_features(50, 30, 1.0)
    features[:, 7] = 2.5  # a constant feature: Spark's scaler maps it to 0
    write_features(spark, cfg, features, train_rows=40)
    metrics = pca.run(cfg, spark)
    explained, *_ = numpy_pca(features[:40], standardize)
    expected_k = int(np.searchsorted(np.cumsum(explained), 0.9) + 1)
    assert metrics["k"] == expected_k and metrics["k_rule"].startswith("smallest k")
    projection = load_projection(cfg.env.paths.pca_projection)
    assert projection.k == expected_k and projection.dimension == 30

    # Spark ML's own transform, fitted independently with k components.
    table = tables.read(spark, cfg.env.paths.features, Storage.of(cfg)).withColumn("v", array_to_vector(F.col("features")))
    train, column = table.where(F.col("split") == "Training"), "v"
    if standardize:
        scaler = StandardScaler(inputCol="v", outputCol="s", withMean=True, withStd=True).fit(train)
        table, train, column = scaler.transform(table), scaler.transform(train), "s"
    model = PCA(k=expected_k, inputCol=column, outputCol="p").fit(train)
    rows = model.transform(table).select("path", "features", vector_to_array("p").alias("p")).orderBy("path").collect()
    spark_vectors = np.array([r["p"] for r in rows])
    numpy_vectors = projection.project(np.array([r["features"] for r in rows]))
    signs = np.sign(model.pc.toArray()[np.abs(projection.components).argmax(axis=0), np.arange(expected_k)])
    np.testing.assert_allclose(numpy_vectors, spark_vectors * signs, rtol=1e-6, atol=1e-6 * np.abs(spark_vectors).max())
    # And the pipeline's own vectors are those.
    written = {r["path"]: r["pca"] for r in tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).collect()}
    np.testing.assert_allclose(np.array([written[r["path"]] for r in rows]), numpy_vectors, rtol=1e-9, atol=1e-9)
    assert json.loads(Path(cfg.env.paths.pca_metrics).read_text())["k"] == expected_k


def test_component_signs_do_not_depend_on_the_eigen_solver():
    """Spark on another cluster (another summation order) may return any component negated: the
    projection is the same whichever signs it gets, and each component's largest loading is positive."""
    components = np.linalg.qr(np.random.default_rng(7).normal(size=(12, 5)))[0]
    flipped = components * np.array([1, -1, -1, 1, -1])
    fixed = pca.with_fixed_signs(components)
    np.testing.assert_array_equal(fixed, pca.with_fixed_signs(flipped))
    assert (fixed[np.abs(fixed).argmax(axis=0), np.arange(5)] > 0).all()
    np.testing.assert_array_equal(np.abs(fixed), np.abs(components))


def test_a_projection_refuses_features_of_another_dimension(tmp_path):
    projection = Projection(np.eye(4)[:, :2], np.zeros(4), np.ones(4), np.array([0.6, 0.3]))
    save_projection(projection, tmp_path / "p.npz")
    loaded = load_projection(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded.project(np.array([[1.0, 2.0, 3.0, 4.0]])), [[1.0, 2.0]])
    with pytest.raises(ValueError, match="features have 3 dimensions, the PCA expects 4"):
        loaded.project(np.ones((1, 3)))
    with pytest.raises(FileNotFoundError, match="run the pca stage first"):
        load_projection(tmp_path / "missing.npz")


def test_transform_projects_each_row_with_the_broadcast_artifact(spark):
    from pyspark.testing import assertDataFrameEqual

    projection = Projection(np.array([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]), np.array([1.0, 0.0, 0.0]),
                            np.array([1.0, 0.5, 1.0]), np.array([0.7, 0.2]))
    features = spark.createDataFrame([("a", "Fig", "Training", [3.0, 4.0, 5.0]), ("b", "Fig", "Test", [1.0, 0.0, 9.0])],
                                     "path string, label string, split string, features array<float>")
    expected = spark.createDataFrame([("a", "Fig", "Training", [2.0, 4.0]), ("b", "Fig", "Test", [0.0, 0.0])],
                                     "path string, label string, split string, pca array<double>")
    assertDataFrameEqual(pca.transform(features, spark.sparkContext.broadcast(projection)), expected)
