"""Parquet tables that change atomically, on local disk and on S3 alike.

A table is a folder: one version folder per run that wrote it (`v-<time>-<random>/`, written by Spark)
and `_commit.json`, which names the current version. A run writes its whole version, then the commit
file (a rename on local disk, a single PUT on S3: both atomic), then deletes the versions the commit
file does not name. A reader goes through the commit file, so it sees the previous complete version or
the new one, never a mix, whatever point a killed run reached; and nothing is ever copied (S3 has no
rename). Spark skips names that start with '_', so the commit file never reads as data.
"""

from __future__ import annotations

import json
import time

from omegaconf import DictConfig

from fruits.core.ids import stamped_id
from fruits.core.spark import session_settings
from fruits.core.storage import Storage, filesystem, is_s3

COMMIT_FILE = "_commit.json"
EMPTY_FILE = "part-00000-empty.parquet"  # the one file of a version written by write_empty_version


class NoTable(FileNotFoundError):
    """No committed version: the stage that writes the table has not completed yet."""


def _commit_path(path: str) -> str:
    return f"{path.rstrip('/')}/{COMMIT_FILE}"


def commit_record(uri: str, store: Storage) -> dict | None:
    """The table's commit record (version, time, and the facts its writer committed with it), or None."""
    fs, path = filesystem(uri, store)
    try:
        return json.loads(fs.cat_file(_commit_path(path)))
    except FileNotFoundError:
        return None


def committed_version(uri: str, store: Storage) -> str | None:
    """The name of the table's current version folder, or None if no run has committed one."""
    record = commit_record(uri, store)
    return None if record is None else record["version"]


def version_uri(uri: str, store: Storage) -> str:
    """The folder Spark reads: the committed version of the table at uri."""
    version = committed_version(uri, store)
    if version is None:
        raise NoTable(f"{uri} has no committed table ({COMMIT_FILE} is missing): run the stage that writes it "
                      "first (dvc repro); a run that was killed before committing left only data that is ignored")
    return f"{uri.rstrip('/')}/{version}"


def require(setting: str, cfg: DictConfig, stage: str) -> None:
    """Before any work: the table named by setting (e.g. env.paths.features) has a committed version."""
    from omegaconf import OmegaConf

    uri = OmegaConf.select(cfg, setting)
    if committed_version(uri, Storage.of(cfg)) is None:
        raise NoTable(f"{setting}={uri} has no committed table: run the {stage} stage first (dvc repro)")


def read(spark, uri: str, store: Storage):
    """The committed version of the table, as a Spark DataFrame."""
    return spark.read.parquet(version_uri(uri, store))


def arrow_dataset(uri: str, store: Storage):
    """The committed version as a pyarrow dataset, for reads on the driver that need no Spark job
    (it skips '_' and '.' names, as Spark does)."""
    import pyarrow.dataset as ds

    fs, path = filesystem(version_uri(uri, store), store)
    return ds.dataset(path, format="parquet", filesystem=fs)


def row_count(uri: str, store: Storage) -> int:
    """Rows of the committed version, from the Parquet footers alone."""
    return arrow_dataset(uri, store).count_rows()


def value_counts(uri: str, column: str, store: Storage) -> dict:
    """{value: rows} of one column of the committed version, read a batch at a time (bounded memory)."""
    import pyarrow.compute as pc

    counts: dict = {}
    for batch in arrow_dataset(uri, store).to_batches(columns=[column]):
        for item in pc.value_counts(batch.column(0)).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return counts


def new_version() -> str:
    """A version name that sorts by time and never repeats (two runs in the same second differ)."""
    return f"v-{stamped_id()}"


def write_version(frame, uri: str, version: str) -> None:
    """Write frame as a version of the table, not yet visible to readers."""
    writer = frame.write
    # Parquet tries a dictionary for every column and gives it up on float vectors (nearly every value
    # differs), after spending ~40 % of the write on it (1,920 x 1,280 floats: 0.62-0.83 s -> 0.35-0.45 s
    # without, same size): off for those columns only; labels and splits keep theirs.
    for column in float_array_columns(frame.schema):
        for leaf in ("list.element", "array"):  # the element's path as three-level and two-level list
            writer = writer.option(f"parquet.enable.dictionary#{column}.{leaf}", "false")
    with session_settings(frame.sparkSession, two_level_lists(frame.schema)):
        writer.parquet(f"{uri.rstrip('/')}/{version}")


def write_empty_version(schema, uri: str, version: str, store: Storage) -> None:
    """Write a version without rows, from the driver: what Spark writes for an empty frame (one
    Parquet file that holds the schema), without a Spark job (in featurize, the empty rejects job of
    a run with no rejects cost 0.2-0.3 s of a 10 s run). schema: the frame's Spark schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = filesystem(uri, store)
    folder = f"{path.rstrip('/')}/{version}"
    fs.makedirs(folder, exist_ok=True)
    fields = [pa.field(field.name, arrow_type(field.dataType), field.nullable) for field in schema.fields]
    with fs.open(f"{folder}/{EMPTY_FILE}", "wb") as file:
        pq.write_table(pa.schema(fields).empty_table(), file)


def arrow_type(kind):
    """The Arrow type Spark reads back as this Spark SQL type (timestamps: microseconds, UTC, as Spark's
    own Arrow conversion gives them). Only the types the project's tables hold."""
    import pyarrow as pa
    from pyspark.sql import types as T

    simple = {T.StringType: pa.string(), T.LongType: pa.int64(), T.IntegerType: pa.int32(),
              T.DoubleType: pa.float64(), T.FloatType: pa.float32(), T.BooleanType: pa.bool_(),
              T.BinaryType: pa.binary(), T.TimestampType: pa.timestamp("us", tz="UTC")}
    if type(kind) in simple:
        return simple[type(kind)]
    if isinstance(kind, T.ArrayType):
        return pa.list_(pa.field("element", arrow_type(kind.elementType), kind.containsNull))
    raise TypeError(f"no Arrow type for the Spark type {kind.simpleString()} in an empty table version")


def two_level_lists(schema) -> dict[str, str]:
    """The session setting that writes vectors without null elements as Parquet's two-level list (a
    repeated float), when the frame has such vectors and nothing else that setting changes (decimals,
    maps, other arrays). Spark's three-level writer spends per element on the group around it:
    1,920 x 1,280 floats took 0.52-0.63 s to write, 0.28-0.34 s as two levels (C1 JIT, the featurize
    stage's). Every Parquet reader takes both forms; Spark reads the vectors back as array<float>."""
    from pyspark.sql.types import AtomicType, DecimalType

    vectors = float_array_columns(schema)
    others = [field.dataType for field in schema.fields if field.name not in vectors]
    plain = all(isinstance(kind, AtomicType) and not isinstance(kind, DecimalType) for kind in others)
    no_nulls = all(not field.dataType.containsNull for field in schema.fields if field.name in vectors)
    return {"spark.sql.parquet.writeLegacyFormat": "true"} if vectors and plain and no_nulls else {}


def float_array_columns(schema) -> list[str]:
    """Top-level columns that hold arrays of floats or doubles (feature vectors)."""
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    return [field.name for field in schema.fields
            if isinstance(field.dataType, ArrayType) and isinstance(field.dataType.elementType, (FloatType, DoubleType))]


def commit(uri: str, version: str, store: Storage, facts: dict | None = None) -> None:
    """Make a fully written version the table's current one, then drop the others. facts: what else
    this version goes with (e.g. the checksum of a file written beside it), committed in the same step."""
    fs, path = filesystem(uri, store)
    record = json.dumps({"version": version, "committed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         **(facts or {})})
    if is_s3(uri):
        fs.pipe_file(_commit_path(path), record.encode())  # one PUT: readers see the old or the new object
    else:
        staged = f"{path.rstrip('/')}/_commit.next"  # a rename within one folder is atomic
        fs.pipe_file(staged, record.encode())
        fs.mv(staged, _commit_path(path))
    clean(uri, store)


def write(frame, uri: str, store: Storage) -> str:
    """Write frame as the table's new version and commit it. Returns the version name."""
    version = new_version()
    write_version(frame, uri, version)
    commit(uri, version, store)
    return version


def clean(uri: str, store: Storage) -> list[str]:
    """Delete everything in the table folder but the commit file and the committed version: versions a
    killed run left half-written or a finished run superseded, and files of an older layout. Returns
    the names deleted."""
    fs, path = filesystem(uri, store)
    fs.invalidate_cache(path)  # Spark writes beside this client: its cached listing may be stale
    if not fs.exists(path):
        return []
    keep = {COMMIT_FILE, committed_version(uri, store)}
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep:
            fs.rm(entry, recursive=True)
            removed.append(name)
    return sorted(removed)
