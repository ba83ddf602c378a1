import json
from pathlib import Path

import numpy as np
import pytest

from fruits import pca

from conftest import make_cfg


def test_choose_k_from_config_or_from_a_variance_target():
    explained = np.array([0.5, 0.3, 0.1, 0.05, 0.05])
    assert pca.choose_k(explained, 2, None) == (2, "pca.k")
    assert pca.choose_k(explained, 2, 0.9)[0] == 3  # 0.5 + 0.3 + 0.1 reaches 0.9 exactly
    assert pca.choose_k(explained, 2, 0.91)[0] == 4
    assert pca.choose_k(explained, 2, 1.0)[0] == 5
    with pytest.raises(ValueError, match="pca.k=9 exceeds the feature dimension 5"):
        pca.choose_k(explained, 9, None)


def synthetic_features(rows: int, dim: int, scale: float, seed: int = 0) -> np.ndarray:
    """Low-rank structure plus noise, like image features: a few strong, well-separated directions."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 6)))[0].T
    strengths = np.array([12.0, 7.0, 4.0, 2.5, 1.5, 1.0])[:, None]
    return scale * (rng.normal(size=(rows, 6)) @ (strengths * basis) + 0.05 * rng.normal(size=(rows, dim)) + 3.0)


def write_features(spark, cfg, features: np.ndarray, train_rows: int) -> None:
    rows = [
        (f"file:/d/{'Training' if i < train_rows else 'Test'}/L{i % 3}/{i}.jpg", f"L{i % 3}",
         "Training" if i < train_rows else "Test", [float(v) for v in features[i]])
        for i in range(len(features))
    ]
    df = spark.createDataFrame(rows, "path string, label string, split string, features array<float>")
    df.write.mode("overwrite").parquet(cfg.env.paths.features)


def numpy_pca(train: np.ndarray, standardize: bool):
    mean = train.mean(axis=0)
    std = train.std(axis=0, ddof=1) if standardize else None
    centred = (train - mean) / std if standardize else train - mean
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
    curve = np.loadtxt(Path(cfg.env.paths.metrics) / "pca_variance.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(curve[:6, 1], explained[:6], rtol=1e-6)
    assert metrics["explained_variance_at_k"] == pytest.approx(explained[:4].sum(), rel=1e-6)
    assert metrics["rows_fitted"] == 45 and metrics["rows_projected"] == 60 and metrics["k"] == 4

    projected = spark.read.parquet(cfg.env.paths.pca_vectors).collect()
    order = np.argsort([int(r["path"].rsplit("/", 1)[1][:-4]) for r in projected])
    actual = np.array([projected[i]["pca"] for i in order])
    inputs = (features - mean) / std if standardize else features  # Spark's PCA itself does not centre
    expected = inputs @ components[:, :4]
    signs = np.sign((actual * expected).sum(axis=0))  # each component is defined up to its sign
    np.testing.assert_allclose(actual * signs, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_variance_target_picks_k_and_the_saved_model_reloads(spark, tmp_path):
    from pyspark.ml import PipelineModel

    cfg = make_cfg(tmp_path, "pca.variance=0.9")
    features = synthetic_features(50, 30, 1.0)
    write_features(spark, cfg, features, train_rows=40)
    metrics = pca.run(cfg, spark)
    explained, *_ = numpy_pca(features[:40], False)
    expected_k = int(np.searchsorted(np.cumsum(explained), 0.9) + 1)
    assert metrics["k"] == expected_k and metrics["k_rule"].startswith("smallest k")
    model = PipelineModel.load(cfg.env.paths.pca_model)
    assert model.stages[-1].getK() == expected_k
    assert model.stages[-1].pc.numCols == expected_k
    assert json.loads((Path(cfg.env.paths.metrics) / "pca.json").read_text())["k"] == expected_k


def test_spark_uses_native_lapack(spark):
    assert pca.lapack_implementation(spark) == "JNILAPACK", "install libblas3 liblapack3 (make check-system)"
