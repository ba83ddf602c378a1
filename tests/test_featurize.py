import io
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fruits.core import backbone, increments, listing, tables
from fruits.stages import featurize, weights
from fruits.stages.sample import draw_fruit
from fruits.core.storage import Storage

from helpers.project import TINY_SIZE, make_cfg, reference_features


# --- pure parts, no Spark -------------------------------------------------------------------------

def fake_extract(batch):
    return np.full((len(batch), 3), batch.mean(axis=(1, 2, 3))[:, None], np.float32)


def test_featurize_batch_keeps_order_and_rejects_in_place():
    good = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(good, "PNG")
    paths = [f"file:/d/Training/Fig/{i}.png" for i in range(5)] + ["file:/loose.png"]
    contents = [good.getvalue(), b"", good.getvalue(), b"junk", good.getvalue(), good.getvalue()]
    out = featurize.featurize_batch(fake_extract, paths, contents, 96, batch_size=2)
    assert out["reject_reason"].tolist() == [
        None, "empty file", None, "not an image (format not recognised)", None,
        "path 'file:/loose.png' is not <Training|Test>/<label>/<file>",
    ]
    assert [f is None for f in out["features"]] == [False, True, False, True, False, True]
    assert out["label"].tolist()[:5] == ["Fig"] * 5 and out["split"][0] == "Training"
    np.testing.assert_allclose(out["features"][0], [1.0, 1.0, 1.0])


def test_each_photo_gets_its_own_pixels_whatever_is_rejected_beside_it():
    """Photos are decoded into the rows of one batch array reused from batch to batch: a reject in
    between neither shifts nor leaves stale pixels, and each vector is that of the photo alone."""
    from fruits.core.images import prepare

    def png(shade):
        out = io.BytesIO()
        Image.new("RGB", (10 + shade % 7, 12), (shade, 255 - shade, 40)).save(out, "PNG")
        return out.getvalue()

    contents = [png(10), b"junk", png(60), png(110), b"", png(160), png(210)]
    paths = [f"file:/d/Test/Fig/{i}.png" for i in range(len(contents))]
    out = featurize.featurize_batch(lambda batch: batch.reshape(len(batch), -1), paths, contents, 16, batch_size=3)
    for content, vector, reason in zip(contents, out["features"], out["reject_reason"], strict=True):
        if content in (b"junk", b""):
            assert vector is None and reason
        else:
            np.testing.assert_array_equal(vector, prepare(content, 16).ravel())


def arrow_images(rows: int):
    import pyarrow as pa

    return pa.RecordBatch.from_pydict({
        "path": [f"file:/d/Training/Fig/{i}.png" for i in range(rows)], "content": [b"bytes"] * rows,
        "checksum": [f"sum{i}" for i in range(rows)], "size": list(range(rows)),
        "modified": pa.array([datetime(2026, 1, 2, tzinfo=timezone.utc)] * rows, pa.timestamp("us", tz="UTC"))})


def test_to_arrow_keeps_the_input_columns_and_puts_each_vector_or_a_null_in_place():
    images = arrow_images(3)
    result = pd.DataFrame({"split": ["Training", None, "Training"], "label": ["Fig", None, "Fig"],
                           "features": [np.array([1, 2], np.float32), None, np.array([3, 4], np.float32)],
                           "reject_reason": [None, "empty file", None]})
    out = featurize.to_arrow(images, result)
    assert out.schema.names == featurize.result_schema().fieldNames()
    for name in ("path", "checksum", "size", "modified"):
        assert out.column(name).equals(images.column(name))
    assert out.column("features").to_pylist() == [[1.0, 2.0], None, [3.0, 4.0]]
    assert out.column("reject_reason").to_pylist() == [None, "empty file", None]
    assert out.column("label").to_pylist() == ["Fig", None, "Fig"]


def test_to_arrow_of_a_batch_of_rejects_only_has_no_vectors():
    result = pd.DataFrame({"split": [None, None], "label": [None, None], "features": [None, None],
                           "reject_reason": ["empty file", "cut"]})
    out = featurize.to_arrow(arrow_images(2), result)
    assert out.column("features").to_pylist() == [None, None] and out.num_rows == 2


def test_accounting_check_fails_loudly():
    featurize.check_accounting(10, 8, 2)
    with pytest.raises(RuntimeError, match="lost files: 10 inputs but 8 featurized \\+ 1 rejected"):
        featurize.check_accounting(10, 8, 1)


# --- each Spark transform alone, on a tiny DataFrame -------------------------------------------------

def test_transform_featurizes_each_row_with_the_broadcast_weights(spark, tiny_project, tiny_weights):
    from pyspark.testing import assertDataFrameEqual

    files = sorted((tiny_project / "images" / "Training" / "Kiwi").glob("*.jpg"))[:3]
    when = datetime(2026, 1, 2, tzinfo=timezone.utc)
    rows = [(f"file:{f}", f.read_bytes(), f"sum{i}", i, when) for i, f in enumerate(files)]
    images = spark.createDataFrame(rows + [("file:/d/Test/Kiwi/bad.jpg", b"junk", "sumbad", 4, when)],
                                   "path string, content binary, checksum string, size long, modified timestamp")
    udf = featurize.build_udf(spark.sparkContext.broadcast(tiny_weights), "transform-test",
                              make_cfg(tiny_project, "model.engine=tensorflow"))
    expected_features = reference_features(tiny_weights, [f.read_bytes() for f in files])
    expected = spark.createDataFrame(
        [(f"file:{f}", f"sum{i}", i, when, "Training", "Kiwi", [float(v) for v in vector], None)
         for i, (f, vector) in enumerate(zip(files, expected_features, strict=True))]
        + [("file:/d/Test/Kiwi/bad.jpg", "sumbad", 4, when, "Test", "Kiwi", None, "not an image (format not recognised)")],
        "path string, checksum string, size long, modified timestamp, split string, label string, "
        "features array<float>, reject_reason string")
    assertDataFrameEqual(featurize.transform(images, udf), expected, rtol=1e-5, atol=1e-5)


IDENTITY = "checksum string, size long, modified timestamp, model string"


def test_split_results_separates_features_and_rejects(spark):
    from pyspark.testing import assertDataFrameEqual

    results = spark.createDataFrame(
        [("a", "Training", "Fig", [1.0], None, "c1", 3, None, "m"), ("b", "Test", "Fig", None, "empty file", "c2", 0, None, "m")],
        f"path string, split string, label string, features array<float>, reject_reason string, {IDENTITY}")
    features, rejects = increments.split_results(
        increments.TablePair("features", "rejects", featurize.FEATURE_COLUMNS, featurize.REJECT_COLUMNS), results)
    assertDataFrameEqual(features, spark.createDataFrame(
        [("a", "Fig", "Training", [1.0], "c1", 3, None, "m")], f"path string, label string, split string, features array<float>, {IDENTITY}"))
    assertDataFrameEqual(rejects, spark.createDataFrame([("b", "empty file", "c2", 0, None, "m")], f"path string, reject_reason string, {IDENTITY}"))


def test_plan_keeps_unchanged_reads_new_or_touched_and_finds_deleted(spark):
    from datetime import datetime

    from pyspark.testing import assertDataFrameEqual

    day1, day2 = datetime(2026, 1, 1), datetime(2026, 1, 2)
    listing = spark.createDataFrame([("same", 10, day1), ("grown", 12, day1), ("touched", 10, day2), ("new", 5, day2)],
                                    "path string, size long, modified timestamp")
    previous = spark.createDataFrame(
        [("same", "c1", 10, day1, "m"), ("grown", "c2", 10, day1, "m"), ("touched", "c3", 10, day1, "m"),
         ("gone", "c4", 7, day1, "m")], f"path string, {IDENTITY}")
    kept, candidates, deleted = increments.plan(listing, previous)
    assertDataFrameEqual(kept, spark.createDataFrame([("same",)], "path string"))
    assertDataFrameEqual(candidates, spark.createDataFrame([("grown", "c2"), ("touched", "c3"), ("new", None)],
                                                           "path string, previous_checksum string"))
    assertDataFrameEqual(deleted, spark.createDataFrame([("gone",)], "path string"))


# --- the Spark job ---------------------------------------------------------------------------------

def read_features(spark, cfg):
    rows = tables.read(spark, cfg.env.paths.features, Storage.of(cfg)).orderBy("path").collect()
    return {row["path"]: row for row in rows}


def image_file(cfg, path: str) -> Path:
    """The file of a row's path (rows are keyed inside env.paths.images)."""
    return Path(cfg.env.paths.images) / path


def test_spark_features_equal_a_direct_single_process_call(spark, tiny_cfg, tiny_weights):
    tiny_cfg.model.engine = "tensorflow"  # the reference engine, to 1e-5 (onnxruntime: its own test, 1e-4)
    metrics = featurize.run(tiny_cfg, spark)
    rows = read_features(spark, tiny_cfg)
    assert metrics["images"] == metrics["featurized"] == len(rows) == 32 and metrics["rejected"] == 0
    paths = sorted(rows)
    expected = reference_features(tiny_weights, [image_file(tiny_cfg, p).read_bytes() for p in paths])
    actual = np.array([rows[p]["features"] for p in paths], dtype=np.float32)
    assert actual.shape == (32, backbone.FEATURE_DIM)
    np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=1e-5)
    for path in paths:
        assert (rows[path]["split"], rows[path]["label"]) == Path(path).parts[:2]
    written = json.loads((Path(tiny_cfg.env.paths.metrics) / "featurize.json").read_text())
    assert written["featurized"] == 32 and written["weights_pretrained"] is False
    # The DVC metrics file holds what compares experiments; timings and per-worker counts are diagnostics.
    assert set(written) == set(featurize.COMPARED) and "seconds" not in written
    diagnostics = json.loads(Path(tiny_cfg.env.paths.featurize_diagnostics).read_text())
    assert {"seconds", "partitions", "model_builds_per_worker"} <= set(diagnostics)
    assert {key: diagnostics[key] for key in written} == written


def test_the_onnxruntime_engine_gives_the_tensorflow_features_built_once_per_worker(spark, tiny_cfg, tiny_weights):
    tiny_cfg.model.engine = "onnxruntime"
    tiny_cfg.featurize.images_per_partition = 3
    metrics = featurize.run(tiny_cfg, spark)
    assert metrics["engine"] == "onnxruntime" and metrics["model"].endswith("/onnxruntime")
    builds = metrics["model_builds_per_worker"]
    # At most once per process over 8+ partitions (0 where an earlier test left this model in the worker).
    assert metrics["partitions"] >= 8 > len(builds) and set(builds.values()) <= {0, 1}, builds
    rows = read_features(spark, tiny_cfg)
    expected = reference_features(tiny_weights, [image_file(tiny_cfg, p).read_bytes() for p in sorted(rows)])
    actual = np.array([rows[p]["features"] for p in sorted(rows)])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_model_is_built_once_per_worker_process_not_per_partition(spark, tiny_cfg, tmp_path):
    # Fresh weights (another seed): no worker has this model cached yet.
    calibration, _ = weights.calibration_images(tiny_cfg)
    other = weights.seeded_random_backbone(TINY_SIZE, 1.0, 11, calibration)
    weights_file = tmp_path / "other.weights.h5"
    backbone.save_weights(other, weights_file)
    tiny_cfg.env.paths.weights = str(weights_file)
    with pytest.raises(FileNotFoundError, match="not the export of .*other.weights.h5"):
        featurize.run(tiny_cfg, spark)  # onnxruntime: the ONNX graph on disk is of the other weights
    tiny_cfg.model.engine = "tensorflow"  # these weights have no ONNX export: the TensorFlow path
    tiny_cfg.featurize.images_per_partition = 3
    metrics = featurize.run(tiny_cfg, spark)
    builds = metrics["model_builds_per_worker"]
    assert metrics["partitions"] >= 8 > len(builds)
    assert set(builds.values()) == {1}, builds
    # And the workers used these weights, not a model cached for earlier ones.
    rows = read_features(spark, tiny_cfg)
    expected = reference_features(other.get_weights(), [image_file(tiny_cfg, p).read_bytes() for p in sorted(rows)])
    np.testing.assert_allclose(np.array([rows[p]["features"] for p in sorted(rows)]), expected, atol=1e-5, rtol=1e-5)


def write_image(path: Path, image: Image.Image, fmt: str, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **options)


def test_bad_files_are_rejected_with_a_reason_and_nothing_is_lost(spark, tiny_cfg, tmp_path):
    root = tmp_path / "messy"
    fruit = draw_fruit("Kiwi", 1)
    write_image(root / "Training" / "Pêche plate" / "é 1.jpg", fruit, "JPEG")
    write_image(root / "Training" / "Kiwi" / "cmyk.jpg", fruit.convert("CMYK"), "JPEG")
    write_image(root / "Training" / "Kiwi" / "gray.jpg", fruit.convert("L"), "JPEG")
    write_image(root / "Test" / "Kiwi" / "alpha.png", fruit.convert("RGBA"), "PNG")
    write_image(root / "Test" / "Kiwi" / "palette.png", fruit.convert("P"), "PNG")
    write_image(root / "Test" / "Kiwi" / "UPPER.JPG", fruit, "JPEG")
    (root / "Training" / "Kiwi" / "empty.jpg").write_bytes(b"")
    (root / "Training" / "Kiwi" / "text.jpg").write_text("not a picture")
    truncated = io.BytesIO()
    fruit.save(truncated, "JPEG")
    (root / "Test" / "Kiwi" / "truncated.jpg").write_bytes(truncated.getvalue()[:300])
    shutil.copy(root / "Test" / "Kiwi" / "UPPER.JPG", root / "loose.jpg")
    (root / "Test" / "Kiwi" / "notes.txt").write_text("ignored: not an image extension")
    shutil.copy(root / "Test" / "Kiwi" / "UPPER.JPG", root / "Test" / "Kiwi" / "_hidden.jpg")
    tiny_cfg.env.paths.images = str(root)

    metrics = featurize.run(tiny_cfg, spark)
    rows = read_features(spark, tiny_cfg)
    rejects = {Path(r["path"]).name: r["reject_reason"] for r in tables.read(spark, tiny_cfg.env.paths.rejects, Storage.of(tiny_cfg)).collect()}
    assert metrics["images"] == 11 == metrics["featurized"] + metrics["rejected"]
    assert {Path(p).name for p in rows} == {"é 1.jpg", "cmyk.jpg", "gray.jpg", "alpha.png", "palette.png", "UPPER.JPG"}
    assert rejects["empty.jpg"] == "empty file"
    assert rejects["text.jpg"].startswith("not an image")
    assert rejects["truncated.jpg"].startswith("corrupt image")
    assert "is not <Training|Test>/<label>/<file>" in rejects["loose.jpg"]
    assert rejects["_hidden.jpg"].startswith("hidden name")
    accented = next(r for p, r in rows.items() if Path(p).name == "é 1.jpg")
    assert (accented["split"], accented["label"]) == ("Training", "Pêche plate")
    assert metrics["reject_reasons"]["empty file"] == 1


def test_missing_weights_file_is_named(spark, tiny_cfg, tmp_path):
    tiny_cfg.env.paths.weights = str(tmp_path / "nope.weights.h5")
    with pytest.raises(FileNotFoundError, match="nope.weights.h5 not found: run the weights stage"):
        featurize.run(tiny_cfg, spark)


def spark_file_partitions(sizes: list[int], settings: dict[str, str], parallelism: int) -> list[int]:
    """Files per partition as Spark 3.5 packs them (FilePartition.maxSplitBytes, getFilePartitions)."""
    open_cost = int(settings.get("spark.sql.files.openCostInBytes", 4 * 2**20))
    max_bytes = int(settings.get("spark.sql.files.maxPartitionBytes", 128 * 2**20))
    minimum = int(settings.get("spark.sql.files.minPartitionNum", parallelism))
    split = min(max_bytes, max(open_cost, sum(size + open_cost for size in sizes) // minimum))
    counts, current, files = [], 0, 0
    for size in sorted(sizes, reverse=True):
        if files and current + size > split:
            counts.append(files)
            current, files = 0, 0
        current += size + open_cost
        files += 1
    return counts + [files] if files else counts


@pytest.mark.parametrize(("images", "cores", "expected"), [
    (1920, 2, [480] * 4),  # 2 waves on 2 cores (at most 512 a task), equal counts whatever the sizes
    (1000, 2, [500, 500]),
    (1025, 2, [257, 257, 257, 254]),
    (7, 2, [4, 3]),
    (1, 8, [1]),
])
def test_partition_settings_cut_equal_counts_in_whole_waves(images, cores, expected):
    sizes = [3000 + (7919 * i) % 9000 for i in range(images)]  # unequal sizes, up to 4x apart
    settings = listing.partition_settings(images, sum(sizes), max(sizes), cores, 512)
    assert spark_file_partitions(sizes, settings, cores) == expected


@pytest.mark.parametrize(("rows", "cores", "files"), [
    (1920, 2, 2),  # one write task per core, not one per model partition (4 here)
    (0, 2, 2),
    (10_000_000, 32, 400),  # 25,000 rows (~128 MB) a file, not 20,000 files of 512 rows
    (100, 0, 1),
])
def test_features_are_written_in_one_wave_of_files_of_bounded_rows(rows, cores, files):
    assert featurize.feature_files(rows, cores) == files


def test_odd_names_are_read_literally(spark, tmp_path):
    """Explicit paths go through Hadoop's glob: brackets, braces, stars must not be patterns."""
    names = ["a[1].jpg", "b c.jpg", "é%20.jpg", "x{y}.jpg", "q?.jpg"]
    for name in names:
        write_image(tmp_path / "Training" / "Kiwi" / name, draw_fruit("Kiwi", 1), "JPEG")
    (tmp_path / "Training" / "Kiwi" / "a1.jpg").write_bytes(b"decoy: a[1] as a pattern would match me")
    cfg = make_cfg(tmp_path / "out", f"data.root={tmp_path}")
    paths = [f"Training/Kiwi/{name}" for name in names]
    read = {row["path"]: row["checksum"] for row in listing.read_contents(spark, cfg.env.paths.images, paths).collect()}
    assert set(read) == set(paths)
