"""featurize: images -> 1280-d MobileNetV2 features, with Spark, incrementally.

The weights are read once on the driver and broadcast; each Python worker builds the model once
(`weights=None`, filled from the broadcast) and keeps it for every later task and batch. An Arrow
function (mapInArrow) decodes, resizes and predicts in fixed-size batches. Files that cannot be
decoded go to a rejects table with the reason; the job checks inputs = featurized + rejected.

Incremental: every row carries the image's content checksum (sha256) and the model identity. Spark
lists the inputs without reading them (binaryFile metadata); an image whose size and modification
time are those of its row is kept as it is; the others are read and checksummed, and only those whose
content is new or changed go through the model. Rows of deleted images are dropped; a new model
identity re-featurizes everything. Both tables are rewritten as new versions of fruits.core.tables and
committed together, so a killed run never leaves a table that mixes old and half-written rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fruits.core import backbone, tables
from fruits.core.config import ConfigError, stage_config
from fruits.core.images import RejectedImage, parse_image_path, pixels, to_model_input
from fruits.core.spark import PidCounts, Progress, get_session, lighten_worker_imports, session_settings
from fruits.core.storage import SHARD_GLOB, filesystem, iter_files, write_json

log = logging.getLogger(__name__)

# What identifies an image's row besides its path: what it contained, and when it was listed.
ROW_IDENTITY = ["checksum", "size", "modified", "model"]
FEATURE_COLUMNS = ["path", "label", "split", "features", *ROW_IDENTITY]
REJECT_COLUMNS = ["path", "reject_reason", *ROW_IDENTITY]
# Tests only: a Python worker dies (os._exit) in this partition's first attempt, after its first batch.
CRASH_VARIABLE = "FRUITS_TEST_CRASH_PARTITION"
LISTED_SIZE_BOUND = 64 * 2**20  # for partitioning the listing only: larger images make bigger listing tasks
FEATURE_FILE_ROWS = 25_000  # ~128 MB of 1280-d float vectors: one Parquet row group per file


def featurize_batch(
    extract: Callable[[np.ndarray], np.ndarray],
    paths: list[str],
    contents: list[bytes | None],
    input_size: int,
    batch_size: int,
) -> pd.DataFrame:
    """One Arrow batch -> split, label, features (None if rejected), reject_reason (None if not).

    Decodes and predicts batch_size images at a time, so memory stays bounded whatever the Arrow
    batch size.
    """
    rows = len(paths)
    splits: list[str | None] = [None] * rows
    labels: list[str | None] = [None] * rows
    features: list[np.ndarray | None] = [None] * rows
    reasons: list[str | None] = [None] * rows
    for start in range(0, rows, batch_size):
        good, arrays = [], []
        for i in range(start, min(start + batch_size, rows)):
            try:
                splits[i], labels[i] = parse_image_path(paths[i])
                arrays.append(pixels(contents[i], input_size))
                good.append(i)
            except RejectedImage as err:
                reasons[i] = str(err)
            except Exception as err:  # anything unforeseen is a reject with its reason, not a lost file
                reasons[i] = f"unexpected {type(err).__name__}: {err}"
        if arrays:
            vectors = extract(to_model_input(np.stack(arrays)))
            for i, vector in zip(good, vectors, strict=True):
                features[i] = vector
    return pd.DataFrame({"split": splits, "label": labels, "features": features, "reject_reason": reasons})


INPUT_COLUMNS = ["path", "content", "checksum", "size", "modified"]


def result_schema():
    """What the model's Arrow function returns per image: the input's columns but the content, and the
    split, label, features and reject reason. Its vectors never hold a null element: declared so, they
    are written as a two-level Parquet list (fruits.core.tables.two_level_lists)."""
    from pyspark.sql.types import (ArrayType, FloatType, LongType, StringType, StructField, StructType,
                                   TimestampType)

    return StructType([StructField("path", StringType()), StructField("checksum", StringType()),
                       StructField("size", LongType()), StructField("modified", TimestampType()),
                       StructField("split", StringType()), StructField("label", StringType()),
                       StructField("features", ArrayType(FloatType(), containsNull=False)),
                       StructField("reject_reason", StringType())])


def to_arrow(images, result: pd.DataFrame):
    """The output batch of one input Arrow batch: its columns but the content (as they came), then
    featurize_batch's result. The vectors go to Arrow as one buffer: Spark's pandas path converted
    them float by float (92 ms per 480 images, 6 % of the model's time)."""
    import pyarrow as pa

    rejected = result["reject_reason"].notna().to_numpy()
    vectors = [vector for vector in result["features"] if vector is not None]
    width = len(vectors[0]) if vectors else 0
    flat = np.stack(vectors).astype(np.float32, copy=False).ravel() if vectors else np.empty(0, np.float32)
    offsets = np.concatenate([[0], np.cumsum(np.where(rejected, 0, width))]).astype(np.int32)
    features = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=pa.array(rejected),
                                        type=pa.list_(pa.field("element", pa.float32(), nullable=False)))
    columns = [images.column(name) for name in INPUT_COLUMNS if name != "content"]
    columns += [pa.array(result["split"], pa.string()), pa.array(result["label"], pa.string()), features,
                pa.array(result["reject_reason"], pa.string())]
    return pa.RecordBatch.from_arrays(columns, names=result_schema().fieldNames())


def build_udf(broadcast_weights, identity: str, cfg: DictConfig, builds_accumulator=None):
    """The Arrow function for mapInArrow: batches of INPUT_COLUMNS -> result_schema(); the model is
    cached per worker process."""
    input_size, alpha, engine = cfg.model.input_size, cfg.model.alpha, cfg.model.engine
    batch_size, threads = cfg.featurize.batch_size, cfg.featurize.threads

    def model():
        builds_before = backbone.BUILD_COUNT.get(identity, 0)
        extract = backbone.cached_extractor(
            identity, lambda: broadcast_weights.value, input_size, alpha, threads, engine
        )
        if builds_accumulator is not None:
            builds_accumulator.add({os.getpid(): backbone.BUILD_COUNT[identity] - builds_before})
        return extract

    def featurize_images(batches):
        lighten_worker_imports()
        extract = None  # looked up at the first batch: an empty partition (nothing to compute) builds nothing
        for number, images in enumerate(batches):
            extract = extract or model()
            if number == 1 and injected_crash():
                os._exit(70)
            paths, contents = images.column("path").to_pylist(), images.column("content").to_pylist()
            yield to_arrow(images, featurize_batch(extract, paths, contents, input_size, batch_size))

    return featurize_images


def injected_crash() -> bool:
    """True in the first attempt of the partition CRASH_VARIABLE names (set by a test, never otherwise)."""
    partition = os.environ.get(CRASH_VARIABLE)
    if partition is None:
        return False
    from pyspark import TaskContext

    task = TaskContext.get()
    return task is not None and task.partitionId() == int(partition) and task.attemptNumber() == 0


def image_glob(extensions) -> str:
    """A case-insensitive glob for binaryFile's pathGlobFilter: *.{jpg,JPG,...}."""
    names = sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})
    return "*.{" + ",".join(names) + "}"


def partition_settings(images: int, total_bytes: int, largest_bytes: int, cores: int, images_per_partition: int,
                       shards: bool = False) -> dict[str, str]:
    """File-source settings that cut the images into equal counts, a whole number of waves per core.

    Spark packs files into a partition until their sizes plus an "open cost" per file reach
    maxPartitionBytes. Partitions by bytes leave unequal image counts (431 to 534 of 1,920 were
    measured), and the model's time goes by count: the last task ran alone for a second. An open cost
    above per_task x the largest file makes the count decide: every partition but the last holds
    exactly per_task images, per_task being the images over cores x waves, and a wave at most
    images_per_partition images per task (bounded retries, a live progress line). Shards (Parquet)
    split by bytes only: their split size is per_task images' worth of bytes.
    """
    cores = max(1, cores)
    waves = max(1, math.ceil(images / (cores * images_per_partition)))
    per_task = max(1, math.ceil(images / (cores * waves)))
    if shards:
        return {"spark.sql.files.maxPartitionBytes": str(max(1, math.ceil(total_bytes / (cores * waves))))}
    return files_per_partition(per_task, largest_bytes)


def files_per_partition(files: int, largest_bytes: int) -> dict[str, str]:
    """File-source settings for exactly `files` files per partition (the last one: the rest), for
    files of at most largest_bytes: the open cost per file outweighs every size."""
    open_cost = files * max(1, largest_bytes) + 1
    return {
        "spark.sql.files.openCostInBytes": str(open_cost),
        "spark.sql.files.maxPartitionBytes": str(files * open_cost),
        # Else Spark caps a partition at the total / default parallelism, which can split one off.
        "spark.sql.files.minPartitionNum": "1",
    }


def escape_glob(uri: str) -> str:
    """A path Spark's reader takes literally (Hadoop expands [, ], {, }, *, ? in the paths it loads)."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", uri)


def image_reader(spark, cfg: DictConfig):
    return (spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", image_glob(cfg.data.extensions)))


def image_files(spark, cfg: DictConfig):
    """Every image file under env.paths.images (recursively), as Spark's binaryFile source finds them.
    Spark lists the folder here, once (on S3, one LIST per 1,000 objects): the listing and a full read
    both come from this frame; the contents are read only when a plan uses them."""
    return image_reader(spark, cfg).load(cfg.env.paths.images)


def extract(images):
    """The listing of binaryFile rows, without their content: path, size, modified."""
    from pyspark.sql import functions as F

    return images.select("path", F.col("length").alias("size"), F.col("modificationTime").alias("modified"))


def extract_shard_index(spark, cfg: DictConfig):
    """data.layout=parquet: the listing is ingest's shard index (path, size, checksum; no date)."""
    from pyspark.sql import functions as F

    return spark.read.parquet(cfg.env.paths.shard_index).select(
        "path", "size", F.lit(None).cast("timestamp").alias("modified"), "checksum")


def shard_contents(spark, cfg: DictConfig, wanted):
    """path, content, checksum, size, modified of the wanted listing rows, from the shards: old versions
    of a changed image stay in their shard, the checksum picks the current one."""
    shards = spark.read.parquet(f"{cfg.env.paths.shards}/{SHARD_GLOB}").select("path", "content", "checksum")
    return shards.join(wanted.select("path", "checksum", "size", "modified"), ["path", "checksum"])


def contents(images):
    """path, content, checksum, size, modified of binaryFile rows: the size and date of the bytes read,
    which a file changed since the listing keeps."""
    from pyspark.sql import functions as F

    return images.select("path", "content", F.sha2("content", 256).alias("checksum"),
                         F.col("length").alias("size"), F.col("modificationTime").alias("modified"))


def read_contents(spark, paths: list[str]):
    """contents() of the given image files."""
    if not paths:
        return spark.createDataFrame([], "path string, content binary, checksum string, size long, modified timestamp")
    return contents(spark.read.format("binaryFile").load([escape_glob(p) for p in paths]))


def read_previous(spark, cfg: DictConfig, identity: str):
    """(features, rejects, their rows' path and identity) of the last run, if it used this model
    identity; None otherwise (first run, another model, or tables written before rows had an identity).

    Both tables must be the versions one run committed: a run killed between its two commits is
    treated as no previous run (everything is recomputed; nothing wrong is reused)."""
    from pyspark.sql import functions as F

    versions = {tables.committed_version(path, cfg) for path in (cfg.env.paths.features, cfg.env.paths.rejects)}
    if len(versions) != 1 or None in versions:
        return None
    previous = []
    for path, columns in ((cfg.env.paths.features, FEATURE_COLUMNS), (cfg.env.paths.rejects, REJECT_COLUMNS)):
        table = tables.read(spark, path, cfg)
        if not set(columns) <= set(table.columns):
            return None  # written before rows carried their identity: start afresh
        previous.append(table)
    features, rejects = previous
    rows = features.select("path", *ROW_IDENTITY).unionByName(rejects.select("path", *ROW_IDENTITY))
    if rows.where(F.col("model") != identity).limit(1).count() or not rows.limit(1).count():
        return None
    # Rows without a checksum are the walk's rejects (files Spark never lists): found again every run,
    # so they take no part in the plan (else they would count as deleted each time).
    return features, rejects, rows.where(F.col("checksum").isNotNull())


def plan(listing, previous):
    """listing (path, size, modified) against the previous rows: (kept, candidates, deleted).

    kept: paths whose size and modification time are unchanged (their rows are reused without reading
    the file); candidates: path, previous checksum (null if new) of everything else, to be read;
    deleted: previous paths no longer listed.
    """
    from pyspark.sql import functions as F

    before = previous.select("path", F.col("checksum").alias("previous_checksum"),
                             F.col("size").alias("previous_size"), F.col("modified").alias("previous_modified"))
    joined = listing.join(before, "path", "left")
    same = (F.col("size") == F.col("previous_size")) & (F.col("modified") == F.col("previous_modified"))
    kept = joined.where(same).select("path")
    candidates = joined.where(~same | F.col("previous_checksum").isNull()).select("path", "previous_checksum")
    deleted = previous.select("path").join(listing.select("path"), "path", "left_anti")
    return kept, candidates, deleted


def transform(images, featurize_udf):
    """path, content, checksum, size, modified -> path, checksum, size, modified, split, label, features,
    reject_reason (the model runs once per row)."""
    return images.select(*INPUT_COLUMNS).mapInArrow(featurize_udf, result_schema())


def merge(previous_tables, reused, computed, listing, identity: str):
    """The new (features, rejects): the rows computed now (with the size and date of what was read),
    plus the previous rows of reused paths with their size and date in this listing (a shard listing
    has no date)."""
    from pyspark.sql import functions as F

    features, rejects = split_results(computed.withColumn("model", F.lit(identity)))
    if previous_tables is None:
        return features, rejects
    stamp = listing.select("path", "size", "modified")

    def kept(old, columns):
        return old.drop("size", "modified").join(reused, "path").join(stamp, "path").select(*columns)

    old_features, old_rejects = previous_tables
    return (features.unionByName(kept(old_features, FEATURE_COLUMNS)),
            rejects.unionByName(kept(old_rejects, REJECT_COLUMNS)))


def split_results(results):
    """(features, rejects) of rows carrying path, label, split, features, reject_reason and their identity."""
    from pyspark.sql import functions as F

    features = results.where(F.col("reject_reason").isNull()).select(*FEATURE_COLUMNS)
    rejects = results.where(F.col("reject_reason").isNotNull()).select(*REJECT_COLUMNS)
    return features, rejects


def load(features, rejects, cfg: DictConfig, feature_rows: int, no_rejects: bool) -> str:
    """Both tables written in full as one new version, then committed one after the other (readers see
    the previous versions until then; a killed run leaves them). feature_rows: at most how many rows
    features holds; no_rejects: rejects is known to be empty. Returns the version."""
    version = tables.new_version()
    cores = features.sparkSession.sparkContext.defaultParallelism
    tables.write_version(features.coalesce(feature_files(feature_rows, cores)), cfg.env.paths.features, version)
    if no_rejects:  # the usual run: a Spark job would only write the schema
        tables.write_empty_version(rejects.schema, cfg.env.paths.rejects, version, cfg)
    else:  # rejects are few: one wave of tasks, not one (mostly empty) file per model partition
        tables.write_version(rejects.coalesce(cores), cfg.env.paths.rejects, version)
    for path in (cfg.env.paths.features, cfg.env.paths.rejects):
        tables.commit(path, version, cfg)
    return version


def feature_files(rows: int, cores: int) -> int:
    """How many files the features are written as: one per core (one wave of write tasks), more when
    that makes files above FEATURE_FILE_ROWS rows. Not one per model partition: those hold
    images_per_partition rows, 2.6 MB files, ~20,000 of them for 10M images."""
    return max(1, cores, math.ceil(rows / FEATURE_FILE_ROWS))


class Walk(NamedTuple):
    """One streaming pass over the image files (only the skipped ones are kept in memory)."""
    unreadable: list[tuple[str, str]]  # (uri, reject_reason) of the files Spark's file source never returns
    readable: int  # the others: how many, their bytes, the largest
    readable_bytes: int
    largest: int


def walk(files) -> Walk:
    """What Spark's file source will skip (empty files and hidden names: a path part starting with
    '.' or '_'), so that those are rejects and not lost, and the size of what it will read."""
    unreadable, readable, total, largest = [], 0, 0, 0
    for file in files:
        if any(part.startswith((".", "_")) for part in file.relative.split("/")):
            unreadable.append((file.uri, "hidden name (a part starts with '.' or '_'): Spark skips it, rename it"))
        elif file.size == 0:
            unreadable.append((file.uri, "empty file"))
        else:
            readable, total, largest = readable + 1, total + file.size, max(largest, file.size)
    return Walk(unreadable, readable, total, largest)


class RunPlan(NamedTuple):
    reused: object  # paths whose previous rows are kept
    to_compute: object  # path, content, checksum of what goes through the model
    deleted: int
    changed: int
    hashed: object  # checksums read to compare (persisted; None when none were read)
    computing: int  # how many images go through the model


def plan_run(spark, cfg: DictConfig, images, listing, listed: int, previous) -> RunPlan:
    """What this run reuses and what it computes, from the listing (of `listed` rows) and the previous
    rows (None: none). images: the binaryFile frame the listing comes from; None for shards."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    nothing, shards = listing.limit(0).select("path"), images is None
    if previous is None:  # first run or a new model: every image, read once
        everything = shard_contents(spark, cfg, listing) if shards else contents(images)
        return RunPlan(nothing, everything, 0, 0, None, listed)
    if shards:  # the index knows every checksum: nothing is read to compare
        before = previous.select("path", "checksum")
        kept = listing.join(before, ["path", "checksum"], "left_semi").select("path")
        fresh = listing.join(before, ["path", "checksum"], "left_anti")
        return RunPlan(kept, shard_contents(spark, cfg, fresh), before.join(listing, "path", "left_anti").count(),
                       fresh.join(before, "path", "left_semi").count(), None, fresh.count())
    kept, candidates, deleted = plan(listing, previous)
    # Only what changed by size or date is read and checksummed: for a growth run, a short list.
    hashed = (read_contents(spark, [row["path"] for row in candidates.select("path").collect()])
              .select("path", "checksum").join(candidates, "path").persist(StorageLevel.MEMORY_AND_DISK))
    touched = hashed.where(F.col("checksum") == F.col("previous_checksum")).select("path")  # same content
    fresh = hashed.where(F.col("previous_checksum").isNull() | (F.col("checksum") != F.col("previous_checksum")))
    fresh_paths = [row["path"] for row in fresh.select("path").collect()]
    return RunPlan(kept.unionByName(touched), read_contents(spark, fresh_paths), deleted.count(),
                   fresh.where(F.col("previous_checksum").isNotNull()).count(), hashed, len(fresh_paths))


def check_accounting(inputs: int, featurized: int, rejected: int) -> None:
    """Nothing lost: every input file is featurized or rejected with a reason."""
    if inputs != featurized + rejected:
        raise RuntimeError(
            f"featurize lost files: {inputs} inputs but {featurized} featurized + {rejected} rejected "
            f"= {featurized + rejected}"
        )


def broadcast_weights(spark, cfg: DictConfig):
    """Read the model once on the driver and broadcast it: the weight arrays (TensorFlow) or the
    serialized ONNX model, weights inside (onnxruntime). Returns (broadcast, model identity)."""
    path, engine = Path(cfg.env.paths.weights), cfg.model.engine
    identity = backbone.model_identity(path, cfg.model.input_size, cfg.model.alpha, engine)
    if engine == "onnxruntime":
        onnx = backbone.verified_onnx(cfg.env.paths.onnx, path, cfg.env.paths.provenance)
        return spark.sparkContext.broadcast(onnx.read_bytes()), identity
    arrays = backbone.load_weight_arrays(path, cfg.model.input_size, cfg.model.alpha)
    return spark.sparkContext.broadcast(arrays), identity


def check_inputs(cfg: DictConfig) -> None:
    """Before Spark starts: the images (or shards) and the weights this run needs, each error naming
    its setting and what to do."""
    if cfg.data.layout == "parquet":
        fs, shard_index = filesystem(cfg.env.paths.shard_index, cfg)
        if not fs.exists(shard_index):
            raise ConfigError(f"env.paths.shard_index={cfg.env.paths.shard_index} not found: data.layout=parquet "
                              "needs ingest's shards (python -m fruits.stages.ingest)")
    elif next(iter_files(cfg.env.paths.images, cfg, cfg.data.extensions), None) is None:
        raise ConfigError(f"env.paths.images={cfg.env.paths.images} (from data.root) is missing or holds no "
                          f"{'/'.join(cfg.data.extensions)} image: run the sample or ingest stage, or set data.root")
    backbone.check_weights_file(cfg.env.paths.weights, cfg.env.paths.provenance)
    if cfg.model.engine == "onnxruntime":
        backbone.verified_onnx(cfg.env.paths.onnx, cfg.env.paths.weights, cfg.env.paths.provenance)


def run(cfg: DictConfig, spark=None) -> dict:
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    check_inputs(cfg)
    spark = spark or get_session(cfg, cfg.env.spark.get("featurize_java_options"))
    started = time.perf_counter()
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        if removed := tables.clean(table, cfg):
            log.warning("featurize: removed %s from %s (left by an interrupted run or an older layout)",
                        ", ".join(removed), table)
    weights, identity = broadcast_weights(spark, cfg)
    builds = spark.sparkContext.accumulator({}, PidCounts())
    shards = cfg.data.layout == "parquet"
    images = None if shards else image_files(spark, cfg)  # listed once, for the listing and the reads
    listing = (extract_shard_index(spark, cfg) if shards else extract(images)).persist(StorageLevel.MEMORY_AND_DISK)
    # Spark's file source skips empty files and hidden names: a streaming walk finds them, so that
    # nothing is lost (only those are held in memory). Shards hold every file ingest saw.
    walked = Walk([], 0, 0, 0) if shards else walk(iter_files(cfg.env.paths.images, cfg, cfg.data.extensions))
    unreadable = walked.unreadable
    previous = read_previous(spark, cfg, identity)
    if previous is None and not shards:
        # A first run (or a new model) reads every listed image once: the model's job counts them, and
        # the walk sizes its tasks. A listing job would only count the same files (0.2-0.3 s a run).
        listed, listed_bytes, largest = None, walked.readable_bytes, walked.largest
    else:
        # Listing tasks of about images_per_partition files each (taking no image above
        # LISTED_SIZE_BOUND), not Spark's 32 per 4 MB of "open cost".
        with session_settings(spark, {} if shards else files_per_partition(cfg.featurize.images_per_partition,
                                                                           LISTED_SIZE_BOUND)):
            listed, listed_bytes, largest = listing.agg(
                F.count("path"), F.coalesce(F.sum("size"), F.lit(0)), F.coalesce(F.max("size"), F.lit(0))).first()
    work = plan_run(spark, cfg, images, listing, walked.readable if listed is None else listed,
                    previous and previous[2])
    udf = build_udf(weights, identity, cfg, builds)
    computed = transform(work.to_compute, udf).persist(StorageLevel.MEMORY_AND_DISK)
    reused = work.reused.persist(StorageLevel.MEMORY_AND_DISK)
    settings = partition_settings(work.computing, listed_bytes, largest, spark.sparkContext.defaultParallelism,
                                  cfg.featurize.images_per_partition, shards)
    try:
        # Counted before the commit: the plan reads the previous tables, which the commit replaces.
        reused_count = 0 if previous is None else reused.count()
        with session_settings(spark, settings):  # the model's partitions are cut when it first runs
            partitions = work.to_compute.rdd.getNumPartitions()
            with Progress(spark, "featurize", work.computing, partitions, cfg.featurize.progress_seconds):
                computed_count, rejected_now = computed.agg(F.count(F.lit(1)), F.count("reject_reason")).first()
        rejected_now += len(unreadable)
        if listed is None:  # a first run: what Spark listed is what went through the model
            listed = computed_count
        features, rejects = merge(previous and previous[:2], reused, computed, listing, identity)
        unreadable_rows = spark.createDataFrame(
            [(uri, reason, None, None, None, identity) for uri, reason in unreadable],
            "path string, reject_reason string, checksum string, size long, modified timestamp, model string")
        # No rejects now and none to keep: the rejects table is written without a Spark job.
        no_rejects = rejected_now == 0 and (previous is None or tables.row_count(cfg.env.paths.rejects, cfg) == 0)
        load(features, rejects.unionByName(unreadable_rows), cfg, computed_count + reused_count, no_rejects)
        seconds = time.perf_counter() - started
        # What was committed, read back (Parquet footers and one small column, no Spark job): the
        # accounting below checks the tables, not the plan.
        featurized = tables.row_count(cfg.env.paths.features, cfg)
        reasons = tables.value_counts(cfg.env.paths.rejects, "reject_reason", cfg)
        rejected = sum(reasons.values())
    finally:
        computed.unpersist()
        listing.unpersist()
        reused.unpersist()
        if work.hashed is not None:
            work.hashed.unpersist()
        weights.unpersist()
    inputs = listed + len(unreadable)
    check_accounting(inputs, featurized, rejected)
    provenance_file = Path(cfg.env.paths.provenance)
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    metrics = {
        "images": inputs,
        "featurized": featurized,
        "rejected": rejected,
        "reject_reasons": reasons,
        "run": {"new": computed_count - work.changed, "changed": work.changed, "deleted": work.deleted,
                "reused": reused_count, "computed": computed_count, "rejected": rejected_now,
                "model_changed_or_first_run": previous is None},
        "seconds": round(seconds, 3),
        "images_per_second": round(computed_count / seconds, 2) if seconds else None,
        "partitions": partitions,
        "model_builds_per_worker": {str(pid): count for pid, count in builds.value.items()},
        "model": identity,
        "layout": cfg.data.layout,
        "engine": cfg.model.engine,
        "input_size": cfg.model.input_size,
        "weights_pretrained": provenance.get("pretrained"),
        "weights_imagenet": provenance.get("imagenet"),
        "weights_source": provenance.get("source"),
        "weights_sha256": provenance.get("sha256"),
    }
    write_json(cfg.env.paths.featurize_metrics, metrics)
    log.info("featurize: %d images (%d new, %d changed, %d deleted, %d reused), %d featurized, %d rejected, "
             "%.1f img/s computed", inputs, metrics["run"]["new"], work.changed, work.deleted, reused_count,
             featurized, rejected, metrics["images_per_second"] or 0)
    if provenance.get("warning"):
        log.warning(provenance["warning"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Featurize the images with MobileNetV2 on Spark.", argv))


if __name__ == "__main__":
    main()
