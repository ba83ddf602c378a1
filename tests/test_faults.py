"""Runs that die: a pca process killed while it writes, a Python worker that crashes mid-task. Real
processes, stopped at a point reached by polling; the results are compared with uninterrupted runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from fruits.core import tables
from fruits.core.projection import checked_projection_sha256, load_projection
from fruits.stages import featurize, index, pca
from fruits.core.storage import Storage

from helpers.project import kill_midway, make_cfg
from helpers.data import synthetic_features, write_features


def vectors_of(spark, cfg) -> dict[str, list[float]]:
    return {row["path"]: list(row["pca"]) for row in tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).collect()}


def uncommitted(uri: str, cfg) -> list[str]:
    committed = tables.committed_version(uri, Storage.of(cfg))
    return [p.name for p in Path(uri).glob("v-*") if p.name != committed] if Path(uri).exists() else []


@pytest.mark.slow
def test_a_pca_run_killed_while_it_writes_leaves_the_previous_outputs_and_the_next_run_completes(spark, tmp_path):
    cfg = make_cfg(tmp_path / "run", "pca.k=3")
    features = synthetic_features(400, 64, 1.0)
    write_features(spark, cfg, features, train_rows=300)
    pca.run(cfg, spark)
    before, projection_before = vectors_of(spark, cfg), Path(cfg.env.paths.pca_projection).read_bytes()
    metrics_before = Path(cfg.env.paths.pca_metrics).read_text()

    cfg.pca.k = 5
    params = tmp_path / "params.yaml"
    OmegaConf.save(cfg, params)
    kill_midway([sys.executable, "-m", "fruits.stages.pca", "--params", str(params)],
                lambda: uncommitted(cfg.env.paths.pca_vectors, cfg))
    assert uncommitted(cfg.env.paths.pca_vectors, cfg), "the kill came after the commit: nothing was interrupted"

    # What a later stage reads is the previous run's, whole: vectors, metrics, and the projection, or,
    # if the kill fell after the projection was replaced, a refusal to mix the two runs.
    assert vectors_of(spark, cfg) == before and Path(cfg.env.paths.pca_metrics).read_text() == metrics_before
    if Path(cfg.env.paths.pca_projection).read_bytes() != projection_before:
        with pytest.raises(tables.NoTable, match="not the projection the committed"):
            checked_projection_sha256(cfg.env.paths.pca_vectors, cfg.env.paths.pca_projection, Storage.of(cfg))

    resumed = pca.run(cfg, spark)
    assert resumed["k"] == 5 and not uncommitted(cfg.env.paths.pca_vectors, cfg)
    fresh = make_cfg(tmp_path / "fresh", "pca.k=5")
    write_features(spark, fresh, features, train_rows=300)
    pca.run(fresh, spark)
    got, expected = vectors_of(spark, cfg), vectors_of(spark, fresh)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[p] for p in sorted(got)], [expected[p] for p in sorted(got)], rtol=1e-6, atol=1e-6)
    # The projection beside the vectors is theirs.
    checked_projection_sha256(cfg.env.paths.pca_vectors, cfg.env.paths.pca_projection, Storage.of(cfg))


def test_the_index_refuses_a_projection_that_is_not_the_one_of_the_committed_vectors(spark, tmp_path):
    cfg = make_cfg(tmp_path, "pca.k=3")
    write_features(spark, cfg, synthetic_features(60, 16, 1.0), train_rows=40)
    pca.run(cfg, spark)
    projection = load_projection(cfg.env.paths.pca_projection)
    projection.components[0, 0] += 1.0  # as if a killed run had replaced it
    from fruits.core.projection import save_projection

    save_projection(projection, cfg.env.paths.pca_projection)
    with pytest.raises(tables.NoTable, match="re-run the pca stage"):
        index.run(cfg, spark)


@pytest.mark.slow
def test_a_worker_that_crashes_midway_is_retried_without_duplicate_or_missing_rows(tiny_cfg, tmp_path, spark):
    """local[2,2]: two cores, a task may fail twice. A Python worker exits (os._exit) in partition 1's
    first attempt after sending its first batch (injected by tests/helpers/crashing_featurize.py, not by the
    stage); Spark retries the task; the tables hold each image once."""
    tiny_cfg.env.spark.master = "local[2,2]"
    tiny_cfg.featurize.images_per_partition = 4  # 8 partitions of 4 images, in Arrow batches of 2
    tiny_cfg.env.spark.conf["spark.sql.execution.arrow.maxRecordsPerBatch"] = "2"
    params = tmp_path / "params.yaml"
    OmegaConf.save(tiny_cfg, params)
    crashing = Path(__file__).parent / "helpers" / "crashing_featurize.py"  # the stage, its Arrow function wrapped
    done = subprocess.run([sys.executable, str(crashing), "--params", str(params)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Lost task 1.0" in done.stderr and "Python worker exited unexpectedly" in done.stderr, done.stderr[-3000:]
    metrics = json.loads(Path(tiny_cfg.env.paths.featurize_diagnostics).read_text())
    assert metrics["images"] == metrics["featurized"] == 32 and metrics["partitions"] == 8

    rows = tables.read(spark, tiny_cfg.env.paths.features, Storage.of(tiny_cfg)).select("path", "features").collect()
    assert len(rows) == len({row["path"] for row in rows}) == 32
    reference = make_cfg(tmp_path / "reference")
    reference.data.root = tiny_cfg.data.root
    for key in ("images", "weights", "onnx", "provenance"):
        reference.env.paths[key] = tiny_cfg.env.paths[key]
    featurize.run(reference, spark)
    expected = {row["path"]: row["features"] for row in tables.read(spark, reference.env.paths.features, Storage.of(reference)).collect()}
    assert expected.keys() == {row["path"] for row in rows}
    for row in rows:
        np.testing.assert_allclose(row["features"], expected[row["path"]], rtol=1e-5, atol=1e-5)
