"""The incremental update of a keyed, versioned table pair (fruits.core.tables): which rows of the last
run are reused, which inputs are computed again, and the merged result.

Every row carries its key (the path, relative to the images folder: the same wherever the folder is
read from) and its identity: the content checksum, the size and modification
time the listing gave, and the identity of what computed it (the model). An input whose size and date
are those of its row is kept without being read; the others are read and checksummed, and only those
whose content is new or changed are computed. Rows of deleted inputs are dropped; another identity
recomputes everything. A caller writes both merged tables as one new version and commits them
together, so a killed run never leaves a table that mixes old and half-written rows.
"""

from __future__ import annotations

from typing import NamedTuple


from fruits.core import tables
from fruits.core.listing import contents, read_contents, shard_contents
from fruits.core.storage import Storage

# What identifies an input's row besides its path: what it contained, when it was listed, what computed it.
ROW_IDENTITY = ["checksum", "size", "modified", "model"]


class TablePair(NamedTuple):
    """The two tables one run writes and commits together: a row per input that was computed, and a
    row per input that was rejected (with its reason). Both carry `path` and ROW_IDENTITY."""
    results: str  # URI of each table
    rejects: str
    result_columns: list[str]
    reject_columns: list[str]


class Previous(NamedTuple):
    """The last run's committed tables, and their rows' path and identity (what the plan compares)."""
    results: object
    rejects: object
    rows: object


def read_previous(spark, store: Storage, pair: TablePair, identity: str) -> Previous | None:
    """The last run's tables (Previous), if it used this identity; None otherwise (first run, another model, or tables written before rows had an identity).

    Both tables must be the versions one run committed: a run killed between its two commits is
    treated as no previous run (everything is recomputed; nothing wrong is reused)."""
    from pyspark.sql import functions as F

    versions = {tables.committed_version(path, store) for path in (pair.results, pair.rejects)}
    if len(versions) != 1 or None in versions:
        return None
    previous = []
    for path, columns in ((pair.results, pair.result_columns), (pair.rejects, pair.reject_columns)):
        table = tables.read(spark, path, store)
        if not set(columns) <= set(table.columns):
            return None  # written before rows carried their identity: start afresh
        previous.append(table)
    results, rejects = previous
    rows = results.select("path", *ROW_IDENTITY).unionByName(rejects.select("path", *ROW_IDENTITY))
    # Another model, or rows keyed by absolute path (written before paths were relative): start afresh.
    absolute = F.col("path").rlike("^[A-Za-z][A-Za-z0-9+.-]*:/")
    if rows.where((F.col("model") != identity) | absolute).limit(1).count() or not rows.limit(1).count():
        return None
    # Rows without a checksum are the walk's rejects (files Spark never lists): found again every run,
    # so they take no part in the plan (else they would count as deleted each time).
    return Previous(results, rejects, rows.where(F.col("checksum").isNotNull()))


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


class RunPlan(NamedTuple):
    reused: object  # paths whose previous rows are kept
    to_compute: object  # path, content, checksum of what goes through the model
    deleted: int
    changed: int
    hashed: object  # checksums read to compare (persisted; None when none were read)
    computing: int  # how many images go through the model


def plan_run(spark, folder: str, images, listing, listed: int, previous) -> RunPlan:
    """What this run reuses and what it computes, from the listing (of `listed` rows) and the previous
    rows (None: none). images: the binaryFile frame the listing comes from; None for shards. folder:
    where contents are read, the images folder (env.paths.images) or for shards env.paths.shards."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    nothing, shards = listing.limit(0).select("path"), images is None
    if previous is None:  # first run or a new model: every image, read once
        everything = shard_contents(spark, folder, listing) if shards else contents(images)
        return RunPlan(nothing, everything, 0, 0, None, listed)
    if shards:  # the index knows every checksum: nothing is read to compare
        before = previous.select("path", "checksum")
        kept = listing.join(before, ["path", "checksum"], "left_semi").select("path")
        fresh = listing.join(before, ["path", "checksum"], "left_anti")
        return RunPlan(kept, shard_contents(spark, folder, fresh), before.join(listing, "path", "left_anti").count(),
                       fresh.join(before, "path", "left_semi").count(), None, fresh.count())
    kept, candidates, deleted = plan(listing, previous)
    # Only what changed by size or date is read and checksummed: for a growth run, a short list.
    hashed = (read_contents(spark, folder, [row["path"] for row in candidates.select("path").collect()])
              .select("path", "checksum").join(candidates, "path").persist(StorageLevel.MEMORY_AND_DISK))
    touched = hashed.where(F.col("checksum") == F.col("previous_checksum")).select("path")  # same content
    fresh = hashed.where(F.col("previous_checksum").isNull() | (F.col("checksum") != F.col("previous_checksum")))
    fresh_paths = [row["path"] for row in fresh.select("path").collect()]
    return RunPlan(kept.unionByName(touched), read_contents(spark, folder, fresh_paths), deleted.count(),
                   fresh.where(F.col("previous_checksum").isNotNull()).count(), hashed, len(fresh_paths))


def merge(pair: TablePair, previous: Previous | None, reused, computed, listing, identity: str):
    """The new (results, rejects): the rows computed now (with the size and date of what was read),
    plus the previous rows of reused paths with their size and date in this listing (a shard listing
    has no date)."""
    from pyspark.sql import functions as F

    results, rejects = split_results(pair, computed.withColumn("model", F.lit(identity)))
    if previous is None:
        return results, rejects
    stamp = listing.select("path", "size", "modified")

    def kept(old, columns):
        return old.drop("size", "modified").join(reused, "path").join(stamp, "path").select(*columns)

    return (results.unionByName(kept(previous.results, pair.result_columns)),
            rejects.unionByName(kept(previous.rejects, pair.reject_columns)))


def split_results(pair: TablePair, computed):
    """(results, rejects) of computed rows: those without a reject_reason, and those with one."""
    from pyspark.sql import functions as F

    results = computed.where(F.col("reject_reason").isNull()).select(*pair.result_columns)
    rejects = computed.where(F.col("reject_reason").isNotNull()).select(*pair.reject_columns)
    return results, rejects
