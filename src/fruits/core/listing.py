"""The image listing: what Spark's binaryFile source will read, how to cut it into tasks, and what it
will skip.

Spark lists a folder (local or S3) once; the listing (path, size, modified) and the contents both come
from that frame, the contents read only when a plan uses them. A `path` here is relative to
env.paths.images (`<split>/<label>/<file>`), as in ingest's shard index: a row keeps its key when the
same images are read from another folder (DVC runs a queued experiment in a workspace of its own). Spark's file source skips empty files
and hidden names: `walk` finds those in one streaming pass, so that a stage can reject them with a
reason instead of losing them. The partition settings make the model's tasks equal in image count.
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple


from fruits.core.storage import SHARD_GLOB

LISTED_SIZE_BOUND = 64 * 2**20  # for partitioning the listing only: larger images make bigger listing tasks


def image_glob(extensions) -> str:
    """A case-insensitive glob for binaryFile's pathGlobFilter: *.{jpg,JPG,...}."""
    names = sorted({e.lower() for e in extensions} | {e.upper() for e in extensions})
    return "*.{" + ",".join(names) + "}"


def image_reader(spark, extensions):
    """Spark's binaryFile reader of the files below a folder whose extension is one of extensions."""
    return (spark.read.format("binaryFile")
            .option("recursiveFileLookup", "true")
            .option("pathGlobFilter", image_glob(extensions)))


def image_files(spark, images: str, extensions):
    """Every image file under images (env.paths.images; recursively), as Spark's binaryFile source finds
    them, each path relative to that folder. Spark lists the folder here, once (on S3, one LIST per 1,000
    objects): the listing and a full read both come from this frame; the contents are read only when a
    plan uses them."""
    return relative_paths(image_reader(spark, extensions).load(images), listed_root(str(images)))


SCHEME = r"^[a-zA-Z][a-zA-Z0-9+.-]*:(//)?"  # file:/a, file:///a, s3://b/k, s3a://b/k: dropped before comparing


def listed_root(images: str) -> str:
    """The images folder (env.paths.images) as the listed paths read once their scheme is dropped: an
    absolute local path (resolved against the driver's working directory, as Hadoop resolves a relative
    one), or bucket/key for an object store whatever its scheme (s3, s3a, s3n). Public APIs only: no
    call into the JVM."""
    if re.match(SCHEME, images) and not images.startswith("file:"):
        return re.sub(SCHEME, "", images).rstrip("/")
    return os.path.abspath(re.sub(SCHEME, "", images) if images.startswith("file:") else images).rstrip("/")


def relative_paths(files, root: str):
    """files with each `path` made relative to root (compared without their scheme); a path outside it
    fails the job, naming it."""
    from pyspark.sql import functions as F

    prefix = f"{root}/"
    bare = F.regexp_replace(F.col("path"), SCHEME, "")
    inside = bare.startswith(prefix)
    relative = bare.substr(len(prefix) + 1, 2**31 - 1)
    outside = F.raise_error(F.concat(F.lit(f"listed outside {root}: "), F.col("path")))
    return files.withColumn("path", F.when(inside, relative).otherwise(outside))


def listing(images):
    """The listing of binaryFile rows, without their content: path, size, modified."""
    from pyspark.sql import functions as F

    return images.select("path", F.col("length").alias("size"), F.col("modificationTime").alias("modified"))


def extract_shard_index(spark, shard_index: str):
    """data.layout=parquet: the listing is ingest's shard index (env.paths.shard_index: path, size,
    checksum; no date)."""
    from pyspark.sql import functions as F

    return spark.read.parquet(shard_index).select(
        "path", "size", F.lit(None).cast("timestamp").alias("modified"), "checksum")


def shard_contents(spark, shards: str, wanted):
    """path, content, checksum, size, modified of the wanted listing rows, from the shards folder
    (env.paths.shards): old versions of a changed image stay in their shard, the checksum picks the
    current one."""
    shards = spark.read.parquet(f"{shards}/{SHARD_GLOB}").select("path", "content", "checksum")
    return shards.join(wanted.select("path", "checksum", "size", "modified"), ["path", "checksum"])


def contents(images):
    """path, content, checksum, size, modified of binaryFile rows: the size and date of the bytes read,
    which a file changed since the listing keeps."""
    from pyspark.sql import functions as F

    return images.select("path", "content", F.sha2("content", 256).alias("checksum"),
                         F.col("length").alias("size"), F.col("modificationTime").alias("modified"))


def read_contents(spark, images: str, paths: list[str]):
    """contents() of the given image files (paths relative to images, env.paths.images)."""
    if not paths:
        return spark.createDataFrame([], "path string, content binary, checksum string, size long, modified timestamp")
    folder = str(images).rstrip("/")
    files = spark.read.format("binaryFile").load([escape_glob(f"{folder}/{path}") for path in paths])
    return contents(relative_paths(files, listed_root(str(images))))


def escape_glob(uri: str) -> str:
    """A path Spark's reader takes literally (Hadoop expands [, ], {, }, *, ? in the paths it loads)."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", uri)


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


class Walk(NamedTuple):
    """One streaming pass over the image files (only the skipped ones are kept in memory)."""
    unreadable: list[tuple[str, str]]  # (path, reject_reason) of the files Spark's file source never returns
    readable: int  # the others: how many, their bytes, the largest
    readable_bytes: int
    largest: int


def walk(files) -> Walk:
    """What Spark's file source will skip (empty files and hidden names: a path part starting with
    '.' or '_'), so that those are rejects and not lost, and the size of what it will read."""
    unreadable, readable, total, largest = [], 0, 0, 0
    for file in files:
        if any(part.startswith((".", "_")) for part in file.relative.split("/")):
            unreadable.append((file.relative, "hidden name (a part starts with '.' or '_'): Spark skips it, rename it"))
        elif file.size == 0:
            unreadable.append((file.relative, "empty file"))
        else:
            readable, total, largest = readable + 1, total + file.size, max(largest, file.size)
    return Walk(unreadable, readable, total, largest)
