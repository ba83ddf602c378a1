"""Growth: incremental featurize equals a from-scratch run after images are added, changed, deleted."""

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from fruits.core import backbone, tables
from fruits.stages import featurize, ingest, weights
from fruits.stages.sample import draw_fruit
from fruits.core.storage import Storage

from helpers.project import TINY_SIZE, kill_midway, make_cfg


def jpeg(label: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    draw_fruit(label, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def same_model(cfg, source):
    """cfg runs the model source has (weights, their ONNX graph, provenance): only outputs differ."""
    for key in ("weights", "onnx", "provenance"):
        cfg.env.paths[key] = source.env.paths[key]
    return cfg


@pytest.fixture
def growing(tiny_cfg, tmp_path):
    """A copy of the tiny sample that the test may change, and an incremental output root beside it."""
    images = tmp_path / "images"
    shutil.copytree(tiny_cfg.data.root, images)
    return same_model(make_cfg(tmp_path / "incremental", f"data.root={images}"), tiny_cfg)


def read_tables(spark, cfg):
    features = {r["path"]: r for r in tables.read(spark, cfg.env.paths.features, Storage.of(cfg)).collect()}
    rejects = {r["path"]: r["reject_reason"] for r in tables.read(spark, cfg.env.paths.rejects, Storage.of(cfg)).collect()}
    return features, rejects


def full_run(spark, cfg, root: Path):
    """The same images featurized from scratch, outputs under a fresh root."""
    fresh = same_model(make_cfg(root, f"data.root={cfg.data.root}", f"model.engine={cfg.model.engine}"), cfg)
    assert featurize.run(fresh, spark)["run"]["reused"] == 0
    return read_tables(spark, fresh)


def rejects_files(cfg) -> list[str]:
    version = Path(tables.version_uri(cfg.env.paths.rejects, Storage.of(cfg)))
    return sorted(p.name for p in version.iterdir() if not p.name.startswith((".", "_")))


def assert_same_as_full_run(spark, cfg, root: Path) -> None:
    features, rejects = read_tables(spark, cfg)
    full_features, full_rejects = full_run(spark, cfg, root)
    assert set(features) == set(full_features) and rejects == full_rejects
    for path, row in features.items():
        expected = full_features[path]
        assert (row["label"], row["split"], row["checksum"]) == (expected["label"], expected["split"], expected["checksum"])
        np.testing.assert_allclose(row["features"], expected["features"], rtol=1e-6, atol=1e-6)


def test_add_ten_change_one_delete_one_then_fix_a_reject(spark, growing, tmp_path):
    first = featurize.run(growing, spark)
    assert first["run"]["new"] == first["images"] == 32 and first["run"]["reused"] == 0
    assert rejects_files(growing) == [tables.EMPTY_FILE]  # no rejects: written from the driver, no Spark job

    root = Path(growing.data.root)
    for i in range(10):
        (root / "Training" / "Kiwi" / f"added_{i}.jpg").write_bytes(jpeg("Kiwi", 1000 + i))
    changed = sorted((root / "Training" / "Banana").glob("*.jpg"))[0]
    changed.write_bytes(jpeg("Banana", 2000))
    deleted = sorted((root / "Test" / "Lemon").glob("*.jpg"))[0]
    deleted.unlink()
    broken = root / "Test" / "Kiwi" / "broken.jpg"
    broken.write_bytes(b"not a picture yet")

    grown = featurize.run(growing, spark)
    assert grown["run"] == {"new": 11, "changed": 1, "deleted": 1, "reused": 30, "computed": 12, "rejected": 1,
                            "model_changed_or_first_run": False}
    assert grown["images"] == 42 == grown["featurized"] + grown["rejected"]
    features, rejects = read_tables(spark, growing)
    deleted_key, broken_key = (str(path.relative_to(root)) for path in (deleted, broken))  # rows' keys
    assert deleted_key not in features and rejects == {broken_key: "not an image (format not recognised)"}
    assert rejects_files(growing) != [tables.EMPTY_FILE]
    assert_same_as_full_run(spark, growing, tmp_path / "full-1")

    broken.write_bytes(jpeg("Kiwi", 3000))  # fixed: it leaves the rejects table
    fixed = featurize.run(growing, spark)
    assert fixed["run"]["changed"] == 1 and fixed["run"]["computed"] == 1 and fixed["rejected"] == 0
    assert_same_as_full_run(spark, growing, tmp_path / "full-2")

    again = featurize.run(growing, spark)  # nothing changed: nothing goes through the model
    assert again["run"]["computed"] == 0 and again["run"]["reused"] == 42
    assert again["rejected"] == 0 and rejects_files(growing) == [tables.EMPTY_FILE]
    assert again["model_builds_per_worker"] == {}  # no task even looked the model up


def test_a_new_model_refeaturizes_everything(spark, growing, tmp_path):
    growing.model.engine = "tensorflow"  # the engine that runs the swapped weights file itself
    featurize.run(growing, spark)
    other = weights.seeded_random_backbone(TINY_SIZE, 1.0, 5, weights.calibration_images(growing)[0])
    backbone.save_weights(other, tmp_path / "other.weights.h5")
    growing.env.paths.weights = str(tmp_path / "other.weights.h5")
    metrics = featurize.run(growing, spark)
    assert metrics["run"]["computed"] == 32 and metrics["run"]["reused"] == 0
    assert metrics["run"]["model_changed_or_first_run"] is True
    assert_same_as_full_run(spark, growing, tmp_path / "full")


def test_three_growth_steps_lose_nothing(spark, growing, tmp_path):
    """add; change and delete; add again. After each: inputs = featurized + rejected, the result equals a
    full run, and the ingest manifest agrees with both tables."""
    root = Path(growing.data.root)

    def add(count: int, start: int) -> None:
        for i in range(count):
            (root / "Test" / "Apple Red" / f"grow_{start + i}.jpg").write_bytes(jpeg("Apple Red", start + i))

    def change_and_delete() -> None:
        for path in sorted((root / "Training" / "Lemon").glob("*.jpg"))[:2]:
            path.write_bytes(jpeg("Lemon", hash(path.name) % 10_000))
        sorted((root / "Training" / "Kiwi").glob("*.jpg"))[-1].unlink()
        (root / "Training" / "Kiwi" / "_hidden.jpg").write_bytes(jpeg("Kiwi", 7))  # Spark skips it: a reject

    featurize.run(growing, spark)
    for step, grow in enumerate([lambda: add(5, 100), change_and_delete, lambda: add(3, 200)]):
        grow()
        metrics = featurize.run(growing, spark)
        assert metrics["run"]["deleted"] == (1 if step == 1 else 0), step  # the hidden reject is no deletion
        manifest = ingest.run(growing)
        assert metrics["images"] == metrics["featurized"] + metrics["rejected"] == manifest["images"], step
        features, rejects = read_tables(spark, growing)
        per_split: dict = {}
        for row in features.values():
            per_split.setdefault(row["split"], {}).setdefault(row["label"], 0)
            per_split[row["split"]][row["label"]] += 1
        hidden = [p for p in rejects if "/_" in p]
        for path in hidden:  # the manifest counts the hidden reject under its folder's label
            per_split["Training"]["Kiwi"] += 1
        assert per_split == manifest["per_split"], step
        assert_same_as_full_run(spark, growing, tmp_path / f"full-{step}")


def test_parquet_shards_grow_by_new_shards_and_give_the_same_features(spark, growing, tmp_path):
    """data.layout=parquet: ingest packs the images into shards; growth adds a shard, never rewrites one;
    featurize reads only new or changed content and gives the features of the loose-files layout."""
    loose = featurize.run(growing, spark)
    by_relative, _ = read_tables(spark, growing)  # both layouts key rows by the path inside the images folder

    sharded = same_model(make_cfg(tmp_path / "sharded", f"data.root={growing.data.root}", "data.layout=parquet",
                                  "data.shard_mb=0"), growing)
    packed = ingest.run(sharded)["shards"]
    assert packed["images_packed"] == 32 and packed["shards"] == packed["shards_written"] > 1  # shard_mb=0: many
    first = featurize.run(sharded, spark)
    assert first["images"] == loose["images"] == first["featurized"] and first["layout"] == "parquet"
    features, _ = read_tables(spark, sharded)
    assert set(features) == set(by_relative)
    for path, row in features.items():
        np.testing.assert_allclose(row["features"], by_relative[path]["features"], rtol=1e-6, atol=1e-6)

    shards = Path(sharded.env.paths.shards)
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet")}
    root = Path(sharded.data.root)
    for i in range(5):
        (root / "Test" / "Banana" / f"new_{i}.jpg").write_bytes(jpeg("Banana", 500 + i))
    sorted((root / "Training" / "Apple Red").glob("*.jpg"))[0].write_bytes(jpeg("Apple Red", 600))
    sorted((root / "Training" / "Lemon").glob("*.jpg"))[0].unlink()
    grown = ingest.run(sharded.copy())["shards"]
    assert grown["images_packed"] == 6  # 5 new + 1 changed, into new shards
    assert {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.parquet") if p.name in before} == before
    metrics = featurize.run(sharded, spark)
    assert metrics["run"] == {"new": 5, "changed": 1, "deleted": 1, "reused": 30, "computed": 6, "rejected": 0,
                              "model_changed_or_first_run": False}
    fresh = same_model(make_cfg(tmp_path / "fresh", f"data.root={sharded.data.root}", "data.layout=parquet",
                                f"env.paths.shards={sharded.env.paths.shards}"), growing)
    assert featurize.run(fresh, spark)["run"]["computed"] == 36
    incremental, full = read_tables(spark, sharded)[0], read_tables(spark, fresh)[0]
    assert set(incremental) == set(full)
    for path, row in incremental.items():
        np.testing.assert_allclose(row["features"], full[path]["features"], rtol=1e-6, atol=1e-6)


def uncommitted_versions(cfg) -> list[str]:
    table = Path(cfg.env.paths.features)
    committed = tables.committed_version(str(table), Storage.of(cfg))
    return [p.name for p in table.glob("v-*") if p.name != committed] if table.exists() else []


@pytest.mark.slow
def test_a_run_killed_while_it_writes_leaves_the_previous_tables_and_the_next_run_completes(spark, growing, tmp_path):
    """SIGKILL of a real featurize process (driver and its JVM) while it writes its new version: readers
    still see the previous complete tables; the next run cleans up and equals an uninterrupted run."""
    import sys

    from omegaconf import OmegaConf

    featurize.run(growing, spark)
    before = read_tables(spark, growing)
    for i in range(6):
        (Path(growing.data.root) / "Training" / "Lemon" / f"added_{i}.jpg").write_bytes(jpeg("Lemon", 4000 + i))
    params = tmp_path / "params.yaml"
    OmegaConf.save(growing, params)
    kill_midway([sys.executable, "-m", "fruits.stages.featurize", "--params", str(params)],
                lambda: bool(uncommitted_versions(growing)))
    assert uncommitted_versions(growing), "the kill came after the commit: nothing was interrupted"

    assert read_tables(spark, growing) == before  # the half-written version is not visible
    resumed = featurize.run(growing, spark)
    assert not uncommitted_versions(growing)
    assert resumed["run"]["new"] == 6 and resumed["images"] == 38 == resumed["featurized"] + resumed["rejected"]
    assert_same_as_full_run(spark, growing, tmp_path / "full")
