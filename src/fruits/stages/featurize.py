"""featurize: images -> 1280-d MobileNetV2 features, with Spark, incrementally.

extract: the listing of the images (fruits.core.listing) and the previous run's tables; transform: an
Arrow function (mapInArrow) that decodes, resizes and predicts in fixed-size batches; load: both tables
as one new version, committed together. The model's payload is read once on the driver and broadcast;
each Python worker builds the model once (fruits.core.engines) and keeps it for every later task and
batch. Files that cannot be decoded go to the rejects table with the reason, and the run checks
inputs = featurized + rejected. Only new or changed images go through the model
(fruits.core.increments).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fruits.core import engines, increments, listing, tables
from fruits.core.config import stage_config
from fruits.core.errors import ConfigError
from fruits.core.images import RejectedImage, decode_into, parse_image_path, to_model_input
from fruits.core.increments import ROW_IDENTITY
from fruits.core.spark import PidCounts, Progress, get_session, session_settings
from fruits.core.storage import Storage, filesystem, iter_files, write_record
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

FEATURE_COLUMNS = ["path", "label", "split", "features", *ROW_IDENTITY]
REJECT_COLUMNS = ["path", "reject_reason", *ROW_IDENTITY]
INPUT_COLUMNS = ["path", "content", "checksum", "size", "modified"]
# What compares experiments (the DVC metrics file); the rest of the record goes to the diagnostics file.
# version: the committed tables', which the next stage's DVC dependency (this file, on EMR) must see change.
COMPARED = ("images", "featurized", "rejected", "run", "images_per_second", "engine", "input_size",
            "weights_pretrained", "version")
FEATURE_FILE_ROWS = 25_000  # ~128 MB of 1280-d float vectors: one Parquet row group per file


def table_pair(cfg: DictConfig) -> increments.TablePair:
    """The features and rejects tables, updated together."""
    return increments.TablePair(cfg.env.paths.features, cfg.env.paths.rejects, FEATURE_COLUMNS, REJECT_COLUMNS)


def featurize_batch(
    extract: Callable[[np.ndarray], np.ndarray],
    paths: list[str],
    contents: list[bytes | None],
    input_size: int,
    batch_size: int,
) -> pd.DataFrame:
    """One Arrow batch -> split, label, features (None if rejected), reject_reason (None if not).

    Decodes and predicts batch_size images at a time, so memory stays bounded whatever the Arrow
    batch size. Each photo is decoded into its row of one batch array (no per-photo arrays to stack).
    """
    rows = len(paths)
    splits: list[str | None] = [None] * rows
    labels: list[str | None] = [None] * rows
    features: list[np.ndarray | None] = [None] * rows
    reasons: list[str | None] = [None] * rows
    batch = np.empty((min(batch_size, rows), input_size, input_size, 3), np.uint8)
    for start in range(0, rows, batch_size):
        good = []
        for i in range(start, min(start + batch_size, rows)):
            try:
                splits[i], labels[i] = parse_image_path(paths[i])
                decode_into(batch[len(good)], contents[i])
                good.append(i)
            except RejectedImage as err:
                reasons[i] = str(err)
            except Exception as err:  # anything unforeseen is a reject with its reason, not a lost file
                reasons[i] = f"unexpected {type(err).__name__}: {err}"
        if good:
            vectors = extract(to_model_input(batch[: len(good)]))
            for i, vector in zip(good, vectors, strict=True):
                features[i] = vector
    return pd.DataFrame({"split": splits, "label": labels, "features": features, "reject_reason": reasons})


def result_schema():
    """What the model's Arrow function returns per image: the input's columns but the content, and the
    split, label, features and reject reason. Its vectors never hold a null element: declared so, they
    are written as a two-level Parquet list (fruits.core.tables.two_level_lists)."""
    from pyspark.sql.types import (
        ArrayType,
        FloatType,
        LongType,
        StringType,
        StructField,
        StructType,
        TimestampType,
    )

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
    cached per worker process, with featurize.threads threads (null: the cores its task owns)."""
    input_size, alpha, engine = cfg.model.input_size, cfg.model.alpha, cfg.model.engine
    batch_size, threads = cfg.featurize.batch_size, cfg.featurize.threads

    def model():
        from pyspark import TaskContext

        builds_before = engines.BUILD_COUNT.get(identity, 0)
        extract = engines.cached_extractor(identity, lambda: broadcast_weights.value, engine, input_size, alpha,
                                           threads or TaskContext.get().cpus())
        if builds_accumulator is not None:
            builds_accumulator.add({os.getpid(): engines.BUILD_COUNT[identity] - builds_before})
        return extract

    def featurize_images(batches):
        extract = None  # looked up at the first batch: an empty partition (nothing to compute) builds nothing
        for images in batches:
            extract = extract or model()
            paths, contents = images.column("path").to_pylist(), images.column("content").to_pylist()
            yield to_arrow(images, featurize_batch(extract, paths, contents, input_size, batch_size))

    return featurize_images


def transform(images, featurize_udf):
    """path, content, checksum, size, modified -> path, checksum, size, modified, split, label, features,
    reject_reason (the model runs once per row)."""
    return images.select(*INPUT_COLUMNS).mapInArrow(featurize_udf, result_schema())


def load(features, rejects, cfg: DictConfig, feature_rows: int, no_rejects: bool) -> str:
    """Both tables written in full as one new version, then committed one after the other (readers see
    the previous versions until then; a killed run leaves them). feature_rows: at most how many rows
    features holds; no_rejects: rejects is known to be empty. Returns the version."""
    version = tables.new_version()
    cores = features.sparkSession.sparkContext.defaultParallelism
    tables.write_version(features.coalesce(feature_files(feature_rows, cores)), cfg.env.paths.features, version)
    store = Storage.of(cfg)
    if no_rejects:  # the usual run: a Spark job would only write the schema
        tables.write_empty_version(rejects.schema, cfg.env.paths.rejects, version, store)
    else:  # rejects are few: one wave of tasks, not one (mostly empty) file per model partition
        tables.write_version(rejects.coalesce(cores), cfg.env.paths.rejects, version)
    for path in (cfg.env.paths.features, cfg.env.paths.rejects):
        tables.commit(path, version, store)
    return version


def feature_files(rows: int, cores: int) -> int:
    """How many files the features are written as: one per core (one wave of write tasks), more when
    that makes files above FEATURE_FILE_ROWS rows. Not one per model partition: those hold
    images_per_partition rows, 2.6 MB files, ~20,000 of them for 10M images."""
    return max(1, cores, math.ceil(rows / FEATURE_FILE_ROWS))


def check_accounting(inputs: int, featurized: int, rejected: int) -> None:
    """Nothing lost: every input file is featurized or rejected with a reason."""
    if inputs != featurized + rejected:
        raise RuntimeError(
            f"featurize lost files: {inputs} inputs but {featurized} featurized + {rejected} rejected "
            f"= {featurized + rejected}"
        )


def broadcast_weights(spark, cfg: DictConfig):
    """Read the engine's payload once on the driver and broadcast it: the weight arrays (TensorFlow) or
    the serialized ONNX model, weights inside (onnxruntime). Returns (broadcast, model identity)."""
    payload = engines.engine(cfg.model.engine).payload(cfg)
    return spark.sparkContext.broadcast(payload), engines.model_identity(cfg)


def check_inputs(cfg: DictConfig) -> None:
    """Before Spark starts: the images (or shards) and the model files this run needs, each error naming
    its setting and what to do."""
    store = Storage.of(cfg)
    if cfg.data.layout == "parquet":
        fs, shard_index = filesystem(cfg.env.paths.shard_index, store)
        if not fs.exists(shard_index):
            raise ConfigError(f"env.paths.shard_index={cfg.env.paths.shard_index} not found: data.layout=parquet "
                              "needs ingest's shards (python -m fruits.stages.ingest)")
    elif next(iter_files(cfg.env.paths.images, store, cfg.data.extensions), None) is None:
        raise ConfigError(f"env.paths.images={cfg.env.paths.images} (from data.root) is missing or holds no "
                          f"{'/'.join(cfg.data.extensions)} image: run the sample or ingest stage, or set data.root")
    engines.engine(cfg.model.engine).check(cfg)


class Listed(NamedTuple):
    """What the listing holds: how many images (None: not counted, a first run counts them as it
    computes), their bytes, the largest."""
    images: int | None
    total_bytes: int
    largest: int


def size_listing(spark, cfg: DictConfig, listed, walked: listing.Walk, first_run: bool, shards: bool) -> Listed:
    """The listing's size. A first run (or a new model) reads every listed image once: the model's job
    counts them, and the walk sizes its tasks (a listing job would only count the same files, 0.2-0.3 s
    a run). Otherwise listing tasks of about images_per_partition files each (none above
    LISTED_SIZE_BOUND), not Spark's 32 per 4 MB of "open cost"."""
    from pyspark.sql import functions as F

    if first_run and not shards:
        return Listed(None, walked.readable_bytes, walked.largest)
    settings = {} if shards else listing.files_per_partition(cfg.featurize.images_per_partition,
                                                             listing.LISTED_SIZE_BOUND)
    with session_settings(spark, settings):
        return Listed(*listed.agg(F.count("path"), F.coalesce(F.sum("size"), F.lit(0)),
                                  F.coalesce(F.max("size"), F.lit(0))).first())


class Inputs(NamedTuple):
    """What extract found: the images (None for shards), their listing, what Spark's listing skips
    (walked), the previous run's tables (None: first run or another model), the listing's size, the plan."""
    images: object
    listed_rows: object
    walked: listing.Walk
    previous: increments.Previous | None
    sizes: Listed
    work: increments.RunPlan


class Outcome(NamedTuple):
    """What one run did, counted before its commit (the plan reads the tables the commit replaces)."""
    listed: int
    reused: int
    computed: int
    rejected_now: int
    partitions: int
    version: str  # of both tables, as committed
    model: str  # the model's identity (engines.model_identity): rows of another are recomputed
    seconds: float = 0.0
    builds: dict | None = None  # model builds per Python worker (pid: count), once the run has ended


class Committed(NamedTuple):
    """The committed tables, read back (Parquet footers and one small column, no Spark job)."""
    featurized: int
    reasons: dict  # reject reason: files


def extract(spark, cfg: DictConfig, identity: str) -> Inputs:
    """The listing (once: the listing and the reads come from one frame), what Spark's file source skips
    (empty files, hidden names: a streaming walk finds them so that nothing is lost), the previous run's
    tables, and the plan: what is reused, what goes through the model. The frames it persists are
    released by run."""
    from pyspark import StorageLevel

    shards, paths, store = cfg.data.layout == "parquet", cfg.env.paths, Storage.of(cfg)
    images = None if shards else listing.image_files(spark, paths.images, cfg.data.extensions)
    listed_rows = (listing.extract_shard_index(spark, paths.shard_index) if shards else listing.listing(images)).persist(
        StorageLevel.MEMORY_AND_DISK)
    walked = listing.Walk([], 0, 0, 0) if shards else listing.walk(  # shards hold every file ingest saw
        iter_files(paths.images, store, cfg.data.extensions))
    previous = increments.read_previous(spark, store, table_pair(cfg), identity)
    sizes = size_listing(spark, cfg, listed_rows, walked, previous is None, shards)
    work = increments.plan_run(spark, paths.shards if shards else paths.images, images, listed_rows,
                               walked.readable if sizes.images is None else sizes.images,
                               previous.rows if previous else None)
    return Inputs(images, listed_rows, walked, previous, sizes, work._replace(
        reused=work.reused.persist(StorageLevel.MEMORY_AND_DISK)))


def compute_and_commit(spark, cfg: DictConfig, inputs: Inputs, computed, identity: str) -> Outcome:
    """Run the model over what the plan computes, merge with what it reuses, write and commit."""
    from pyspark.sql import functions as F

    work, previous, sizes = inputs.work, inputs.previous, inputs.sizes
    reused_count = 0 if previous is None else work.reused.count()
    settings = listing.partition_settings(work.computing, sizes.total_bytes, sizes.largest,
                                          spark.sparkContext.defaultParallelism, cfg.featurize.images_per_partition,
                                          cfg.data.layout == "parquet")
    with session_settings(spark, settings):  # the model's partitions are cut when it first runs
        partitions = work.to_compute.rdd.getNumPartitions()
        with Progress(spark, "featurize", work.computing, partitions, cfg.featurize.progress_seconds):
            computed_count, rejected_now = computed.agg(F.count(F.lit(1)), F.count("reject_reason")).first()
    unreadable = inputs.walked.unreadable
    rejected_now += len(unreadable)
    features, rejects = increments.merge(table_pair(cfg), previous, work.reused, computed, inputs.listed_rows, identity)
    unreadable_rows = spark.createDataFrame(
        [(path, reason, None, None, None, identity) for path, reason in unreadable],
        "path string, reject_reason string, checksum string, size long, modified timestamp, model string")
    # No rejects now and none to keep: the rejects table is written without a Spark job.
    no_rejects = rejected_now == 0 and (previous is None or tables.row_count(cfg.env.paths.rejects, Storage.of(cfg)) == 0)
    version = load(features, rejects.unionByName(unreadable_rows), cfg, computed_count + reused_count, no_rejects)
    listed = computed_count if sizes.images is None else sizes.images  # a first run: what went through the model
    return Outcome(listed, reused_count, computed_count, rejected_now, partitions, version, identity)


def clean_tables(cfg: DictConfig) -> None:
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        if removed := tables.clean(table, Storage.of(cfg)):
            log.warning("featurize: removed %s from %s (left by an interrupted run or an older layout)",
                        ", ".join(removed), table)


def run(cfg: DictConfig, spark=None) -> dict:
    from pyspark import StorageLevel

    check_inputs(cfg)
    spark = spark or get_session(cfg, cfg.env.spark.get("featurize_java_options"))
    started = time.perf_counter()
    clean_tables(cfg)
    weights, identity = broadcast_weights(spark, cfg)
    builds = spark.sparkContext.accumulator({}, PidCounts())
    inputs = extract(spark, cfg, identity)
    computed = transform(inputs.work.to_compute, build_udf(weights, identity, cfg, builds)).persist(
        StorageLevel.MEMORY_AND_DISK)
    try:
        outcome = compute_and_commit(spark, cfg, inputs, computed, identity)
        outcome = outcome._replace(seconds=time.perf_counter() - started, builds=builds.value)
    finally:
        for frame in (computed, inputs.listed_rows, inputs.work.reused, inputs.work.hashed, weights):
            if frame is not None:
                frame.unpersist()
    # What was committed, read back: the accounting checks the tables, not the plan.
    store = Storage.of(cfg)
    committed = Committed(tables.row_count(cfg.env.paths.features, store),
                          tables.value_counts(cfg.env.paths.rejects, "reject_reason", store))
    check_accounting(outcome.listed + len(inputs.walked.unreadable), committed.featurized, sum(committed.reasons.values()))
    provenance_file = Path(cfg.env.paths.provenance)
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    metrics = stage_metrics(cfg, inputs, outcome, committed, provenance)
    write_record(cfg.env.paths.featurize_metrics, cfg.env.paths.featurize_diagnostics, metrics, COMPARED)
    log.info("featurize: %d images (%d new, %d changed, %d deleted, %d reused), %d featurized, %d rejected, "
             "%.1f img/s computed", metrics["images"], metrics["run"]["new"], inputs.work.changed, inputs.work.deleted,
             outcome.reused, committed.featurized, metrics["rejected"], metrics["images_per_second"] or 0)
    if provenance.get("warning"):
        log.warning(provenance["warning"])
    return metrics


def stage_metrics(cfg: DictConfig, inputs: Inputs, outcome: Outcome, committed: Committed, provenance: dict) -> dict:
    """The stage's metrics: the accounting (inputs = featurized + rejected), what this run did, its
    rate, and what computed it."""
    work, seconds = inputs.work, outcome.seconds
    return {
        "images": outcome.listed + len(inputs.walked.unreadable),
        "featurized": committed.featurized,
        "rejected": sum(committed.reasons.values()),
        "reject_reasons": committed.reasons,
        "run": {"new": outcome.computed - work.changed, "changed": work.changed, "deleted": work.deleted,
                "reused": outcome.reused, "computed": outcome.computed, "rejected": outcome.rejected_now,
                "model_changed_or_first_run": inputs.previous is None},
        "seconds": round(seconds, 3),
        "images_per_second": round(outcome.computed / seconds, 2) if seconds else None,
        "partitions": outcome.partitions,
        "model_builds_per_worker": {str(pid): count for pid, count in (outcome.builds or {}).items()},
        "model": outcome.model,
        "version": outcome.version,
        "layout": cfg.data.layout,
        "engine": cfg.model.engine,
        "input_size": cfg.model.input_size,
        "weights_pretrained": provenance.get("pretrained"),
        "weights_imagenet": provenance.get("imagenet"),
        "weights_source": provenance.get("source"),
        "weights_sha256": provenance.get("sha256"),
    }


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Featurize the images with MobileNetV2 on Spark.", argv))


if __name__ == "__main__":
    run_command(main)
