"""The Spark session, from config only (`env.spark`): no master is hard-coded, so the same job runs
under `local[N]` and under spark-submit on YARN (EMR)."""

from __future__ import annotations

import os
import shutil
import sys

from omegaconf import DictConfig


def check_java() -> None:
    """Spark needs a JVM; say so plainly instead of a py4j stack trace."""
    if not (os.environ.get("JAVA_HOME") or shutil.which("java")):
        raise RuntimeError(
            "no Java runtime found: Spark 3.5 needs Java 8, 11 or 17 "
            "(Debian: apt-get install openjdk-17-jre-headless, or set JAVA_HOME)"
        )


def get_session(cfg: DictConfig):
    from pyspark.sql import SparkSession

    check_java()
    # Workers must run this interpreter (the venv's), not whatever `python3` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark_cfg = cfg.env.spark
    builder = SparkSession.builder.appName(spark_cfg.app_name)
    if spark_cfg.master:
        builder = builder.config("spark.master", spark_cfg.master)
    for key, value in spark_cfg.conf.items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


class PidCounts:
    """Accumulator param: {worker pid: count}, summed across tasks (e.g. model builds per worker)."""

    @staticmethod
    def zero(value):
        return {}

    @staticmethod
    def addInPlace(left, right):
        for pid, count in right.items():
            left[pid] = left.get(pid, 0) + count
        return left
