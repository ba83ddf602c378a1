"""featurize: images -> 1280-d MobileNetV2 features, with Spark.

The weights are read once on the driver and broadcast; each Python worker builds the model once
(`weights=None`, filled from the broadcast) and keeps it for every later task and batch. A pandas
Iterator UDF decodes, resizes and predicts in fixed-size batches. Files that cannot be decoded go to
a rejects table with the reason; the job checks inputs = featurized + rejected.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fruits.core import backbone
from fruits.core.config import stage_config
from fruits.core.images import RejectedImage, parse_image_path, prepare
from fruits.core.spark import PidCounts, get_session
from fruits.core.storage import list_files, write_json

log = logging.getLogger(__name__)

RESULT_SCHEMA = "split string, label string, features array<float>, reject_reason string"


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
                arrays.append(prepare(contents[i], input_size))
                good.append(i)
            except RejectedImage as err:
                reasons[i] = str(err)
            except Exception as err:  # anything unforeseen is a reject with its reason, not a lost file
                reasons[i] = f"unexpected {type(err).__name__}: {err}"
        if arrays:
            vectors = extract(np.stack(arrays))
            for i, vector in zip(good, vectors, strict=True):
                features[i] = vector
    return pd.DataFrame({"split": splits, "label": labels, "features": features, "reject_reason": reasons})


def build_udf(broadcast_weights, weights_key: str, cfg: DictConfig, builds_accumulator=None):
    """The pandas Iterator UDF (path, content) -> struct; the model is cached per worker process."""
    from pyspark.sql.functions import pandas_udf

    input_size, alpha = cfg.model.input_size, cfg.model.alpha
    batch_size, tf_threads = cfg.featurize.batch_size, cfg.featurize.tf_threads

    @pandas_udf(RESULT_SCHEMA)
    def featurize_images(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        builds_before = backbone.BUILD_COUNT.get(weights_key, 0)
        extract = backbone.cached_extractor(
            weights_key, lambda: broadcast_weights.value, input_size, alpha, tf_threads
        )
        if builds_accumulator is not None:
            builds_accumulator.add({os.getpid(): backbone.BUILD_COUNT[weights_key] - builds_before})
        for paths, contents in batches:
            yield featurize_batch(extract, paths.tolist(), contents.tolist(), input_size, batch_size)

    return featurize_images


def image_glob(extensions) -> str:
    """A case-insensitive glob for binaryFile's pathGlobFilter: *.{jpg,JPG,...}."""
    names = sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})
    return "*.{" + ",".join(names) + "}"


def partition_settings(listed, images_per_partition: int) -> dict[str, str]:
    """File-source settings for about images_per_partition images per task.

    By default Spark counts 4 MB of "open cost" per file, so small images come 32 to a task and the
    per-task overhead (~0.4 s with busy cores) rivals the model time. Counting each file at its mean
    size instead makes partitions of about images_per_partition images (fewer when the data is small,
    still one per core at least, as Spark splits by bytes per core).
    """
    mean_size = max(1, sum(f.size for f in listed) // max(1, len(listed)))
    return {
        "spark.sql.files.openCostInBytes": str(mean_size),
        "spark.sql.files.maxPartitionBytes": str(2 * mean_size * images_per_partition),
    }


def extract(spark, cfg: DictConfig):
    """Every image file under env.paths.images (recursively): path, content."""
    return (
        spark.read.format("binaryFile")
        .option("recursiveFileLookup", "true")
        .option("pathGlobFilter", image_glob(cfg.data.extensions))
        .load(cfg.env.paths.images)
        .select("path", "content")
    )


def transform(images, featurize_udf):
    """path, content -> path, split, label, features, reject_reason (one UDF call per row)."""
    from pyspark.sql import functions as F

    result = featurize_udf(F.col("path"), F.col("content"))
    return images.select(
        "path",
        result["split"].alias("split"),
        result["label"].alias("label"),
        result["features"].alias("features"),
        result["reject_reason"].alias("reject_reason"),
    )


def split_results(results, listing_rejects):
    """(features, rejects): featurized rows, and every reject with its reason, including the files the
    listing found that Spark's reader never returns (listing_rejects: path, reject_reason)."""
    from pyspark.sql import functions as F

    features = results.where(F.col("reject_reason").isNull()).select("path", "label", "split", "features")
    rejects = results.where(F.col("reject_reason").isNotNull()).select("path", "reject_reason")
    return features, rejects.unionByName(listing_rejects)


def load(features, rejects, cfg: DictConfig) -> None:
    """Features and rejects to Parquet."""
    features.write.mode("overwrite").parquet(cfg.env.paths.features)
    rejects.write.mode("overwrite").parquet(cfg.env.paths.rejects)


def unreadable_by_spark(listed) -> list[tuple[str, str]]:
    """(uri, reject_reason) for listed files that Spark's file source never returns: empty files and
    hidden names (a path part starting with '.' or '_'). Listed here so that they are not lost."""
    rejects = []
    for file in listed:
        if any(part.startswith((".", "_")) for part in file.relative.split("/")):
            rejects.append((file.uri, "hidden name (a part starts with '.' or '_'): Spark skips it, rename it"))
        elif file.size == 0:
            rejects.append((file.uri, "empty file"))
    return rejects


def check_accounting(inputs: int, featurized: int, rejected: int) -> None:
    """Nothing lost: every input file is featurized or rejected with a reason."""
    if inputs != featurized + rejected:
        raise RuntimeError(
            f"featurize lost files: {inputs} inputs but {featurized} featurized + {rejected} rejected "
            f"= {featurized + rejected}"
        )


def broadcast_weights(spark, cfg: DictConfig):
    """Read the weights file once on the driver and broadcast its arrays; returns (broadcast, key)."""
    path = Path(cfg.env.paths.weights)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} not found: run the weights stage first "
                                "(python -m fruits.stages.weights)")
    arrays = backbone.load_weight_arrays(path, cfg.model.input_size, cfg.model.alpha)
    return spark.sparkContext.broadcast(arrays), backbone.weights_key(path, cfg.model.input_size, cfg.model.alpha)


def run(cfg: DictConfig, spark=None) -> dict:
    from pyspark import StorageLevel

    spark = spark or get_session(cfg)
    started = time.perf_counter()
    weights, weights_key = broadcast_weights(spark, cfg)
    builds = spark.sparkContext.accumulator({}, PidCounts())
    # Our own listing is the ground truth of what came in: Spark's file source skips some files.
    listed = list_files(cfg.env.paths.images, cfg, cfg.data.extensions)
    for setting, value in partition_settings(listed, cfg.featurize.images_per_partition).items():
        spark.conf.set(setting, value)
    images = extract(spark, cfg)
    results = transform(images, build_udf(weights, weights_key, cfg, builds)).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        listing_rejects = spark.createDataFrame(unreadable_by_spark(listed), "path string, reject_reason string")
        load(*split_results(results, listing_rejects), cfg)
        seconds = time.perf_counter() - started
        inputs = len(listed)
        featurized = spark.read.parquet(cfg.env.paths.features).count()
        rejects = spark.read.parquet(cfg.env.paths.rejects)
        rejected = rejects.count()
        reasons = {row["reject_reason"]: row["count"] for row in rejects.groupBy("reject_reason").count().collect()}
        partitions = images.rdd.getNumPartitions()
    finally:
        results.unpersist()
        weights.unpersist()
    check_accounting(inputs, featurized, rejected)
    provenance_file = Path(cfg.env.paths.provenance)
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    metrics = {
        "images": inputs,
        "featurized": featurized,
        "rejected": rejected,
        "reject_reasons": reasons,
        "seconds": round(seconds, 3),
        "images_per_second": round(inputs / seconds, 2) if seconds else None,
        "partitions": partitions,
        "model_builds_per_worker": {str(pid): count for pid, count in builds.value.items()},
        "input_size": cfg.model.input_size,
        "weights_pretrained": provenance.get("pretrained"),
        "weights_imagenet": provenance.get("imagenet"),
        "weights_source": provenance.get("source"),
        "weights_sha256": provenance.get("sha256"),
    }
    write_json(cfg.env.paths.featurize_metrics, metrics)
    log.info("featurize: %d images, %d featurized, %d rejected, %.1f img/s", inputs, featurized, rejected,
             metrics["images_per_second"] or 0)
    if provenance.get("warning"):
        log.warning(provenance["warning"])
    return metrics


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Featurize the images with MobileNetV2 on Spark.", argv))


if __name__ == "__main__":
    main()
