"""Tables committed atomically (fruits.core.tables): readers see one complete version, never a mix."""

import os

import pytest

from fruits.core import tables
from fruits.core.storage import Storage
from helpers.project import make_cfg


def rows(spark, uri, cfg):
    return sorted(tuple(r) for r in tables.read(spark, uri, Storage.of(cfg)).collect())


def test_a_written_table_reads_back_and_its_folder_holds_only_the_committed_version(spark, tmp_path):
    cfg, uri = make_cfg(tmp_path), str(tmp_path / "table")
    first = tables.write(spark.createDataFrame([(1, "a"), (2, "b")], "n int, s string"), uri, Storage.of(cfg))
    second = tables.write(spark.createDataFrame([(3, "c")], "n int, s string"), uri, Storage.of(cfg))

    assert first != second
    assert rows(spark, uri, cfg) == [(3, "c")]
    assert sorted(os.listdir(uri)) == sorted([tables.COMMIT_FILE, second])


def test_a_version_written_but_not_committed_is_invisible_then_cleaned(spark, tmp_path):
    """What a run killed while writing leaves: readers keep the previous version; the next clean drops it."""
    cfg, uri = make_cfg(tmp_path), str(tmp_path / "table")
    tables.write(spark.createDataFrame([(1, "old")], "n int, s string"), uri, Storage.of(cfg))
    half = tables.new_version()
    tables.write_version(spark.createDataFrame([(2, "new")], "n int, s string"), uri, half)

    assert rows(spark, uri, cfg) == [(1, "old")]
    assert tables.clean(uri, Storage.of(cfg)) == [half]
    assert rows(spark, uri, cfg) == [(1, "old")]


def test_reading_a_table_never_committed_names_it(spark, tmp_path):
    cfg, uri = make_cfg(tmp_path), str(tmp_path / "features")
    tables.write_version(spark.createDataFrame([(1,)], "n int"), uri, tables.new_version())

    with pytest.raises(tables.NoTable, match="features has no committed table"):
        tables.read(spark, uri, Storage.of(cfg))
    assert tables.committed_version(uri, Storage.of(cfg)) is None



def test_a_table_is_counted_without_spark_as_spark_counts_it(spark, tmp_path):
    """featurize's accounting reads the committed footers and one column with pyarrow, no Spark job:
    the same numbers as Spark's, over a version of several files."""
    cfg, uri = make_cfg(tmp_path), str(tmp_path / "rejects")
    rows = [(1, "empty file"), (2, None), (3, "empty file"), (4, "cut")]
    tables.write(spark.createDataFrame(rows, "n int, reason string").repartition(3), uri, Storage.of(cfg))

    frame = tables.read(spark, uri, Storage.of(cfg))
    assert tables.row_count(uri, Storage.of(cfg)) == frame.count() == 4
    spark_counts = {row["reason"]: row["count"] for row in frame.groupBy("reason").count().collect()}
    assert tables.value_counts(uri, "reason", Storage.of(cfg)) == spark_counts == {"empty file": 2, "cut": 1, None: 1}


def test_float_vectors_are_written_without_a_dictionary_and_labels_with_one(spark, tmp_path):
    """Dictionary encoding is switched off for float-array columns only: on real features Parquet tries
    it and gives it up (at a cost that shows in no file); these few repeated values would keep it."""
    import pyarrow.parquet as pq

    cfg, uri = make_cfg(tmp_path), str(tmp_path / "features")
    frame = spark.createDataFrame([(f"L{i % 2}", [0.5, 1.0, float(i % 3)]) for i in range(64)],
                                  "label string, features array<float>").coalesce(1)
    assert tables.float_array_columns(frame.schema) == ["features"]
    tables.write(frame, uri, Storage.of(cfg))

    files = [f for f in (tmp_path / "features" / tables.committed_version(uri, Storage.of(cfg))).iterdir() if f.suffix == ".parquet"]
    chunks = [pq.ParquetFile(files[0]).metadata.row_group(0).column(i) for i in range(2)]
    dictionary = {chunk.path_in_schema: chunk.has_dictionary_page for chunk in chunks}
    assert dictionary == {"label": True, "features.list.element": False}
    assert sorted(tuple(r) for r in tables.read(spark, uri, Storage.of(cfg)).select("label").collect())[0] == ("L0",)


def test_vectors_without_null_elements_are_written_as_two_level_lists_and_read_back_equal(spark, tmp_path):
    """The two-level form is the fast write; vectors that may hold nulls, and frames with columns the
    legacy setting also changes (decimals), keep Spark's standard three levels."""
    import pyarrow.parquet as pq
    from pyspark.sql.types import ArrayType, DecimalType, FloatType, StringType, StructField, StructType

    cfg = make_cfg(tmp_path)
    rows = [(f"L{i % 2}", [0.25 * i, -1.5, float(i % 3)]) for i in range(16)]

    def written(element_nulls: bool, name: str):
        schema = StructType([StructField("label", StringType()),
                             StructField("features", ArrayType(FloatType(), containsNull=element_nulls))])
        frame = spark.createDataFrame(rows, schema).coalesce(1)
        tables.write(frame, str(tmp_path / name), Storage.of(cfg))
        folder = tmp_path / name / tables.committed_version(str(tmp_path / name), Storage.of(cfg))
        file = next(f for f in folder.iterdir() if f.suffix == ".parquet")
        chunk = pq.ParquetFile(file).metadata.row_group(0).column(1)
        back = {(r["label"], tuple(r["features"])) for r in tables.read(spark, str(tmp_path / name), Storage.of(cfg)).collect()}
        return chunk.path_in_schema, chunk.has_dictionary_page, back

    before = spark.conf.get("spark.sql.parquet.writeLegacyFormat")
    expected = {(label, tuple(vector)) for label, vector in rows}
    assert written(False, "two") == ("features.array", False, expected)
    assert written(True, "three") == ("features.list.element", False, expected)
    assert spark.conf.get("spark.sql.parquet.writeLegacyFormat") == before
    with_decimal = StructType([StructField("price", DecimalType(10, 2)),
                               StructField("features", ArrayType(FloatType(), containsNull=False))])
    assert tables.two_level_lists(with_decimal) == {}


def test_an_empty_version_written_without_spark_reads_as_spark_writes_one(spark, tmp_path):
    """featurize writes a run's empty rejects table from the driver: no Spark job, and Spark, pyarrow
    and a later union read it as the version Spark would have written."""
    cfg = make_cfg(tmp_path)
    schema = "path string, reject_reason string, checksum string, size long, modified timestamp, model string"
    empty = spark.createDataFrame([], schema)
    by_spark, by_driver = str(tmp_path / "by_spark"), str(tmp_path / "by_driver")
    tables.write(empty, by_spark, Storage.of(cfg))

    version = tables.new_version()
    spark.sparkContext.setJobGroup("empty-version", "write_empty_version")
    try:
        tables.write_empty_version(empty.schema, by_driver, version, Storage.of(cfg))
    finally:
        spark.sparkContext.setJobGroup(None, None)
    tables.commit(by_driver, version, Storage.of(cfg))

    assert spark.sparkContext.statusTracker().getJobIdsForGroup("empty-version") == []
    read = tables.read(spark, by_driver, Storage.of(cfg))
    assert read.schema == tables.read(spark, by_spark, Storage.of(cfg)).schema
    assert read.count() == 0 and tables.row_count(by_driver, Storage.of(cfg)) == 0
    assert tables.value_counts(by_driver, "reject_reason", Storage.of(cfg)) == {}
    row = spark.createDataFrame([("a.jpg", "cut", "00", 3, None, "m")], schema)
    assert read.unionByName(row).count() == 1
