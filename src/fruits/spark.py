"""The Spark session, from config only: no master is hard-coded, so the same job runs under
`local[N]` and under spark-submit on YARN (EMR)."""

from __future__ import annotations

import logging
import os
import shutil
import sys

from omegaconf import DictConfig

log = logging.getLogger(__name__)


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
    builder = SparkSession.builder.appName(f"{cfg.project}-{cfg.env.name}")
    if cfg.env.spark.master:
        builder = builder.config("spark.master", cfg.env.spark.master)
    for key, value in cfg.env.spark.conf.items():
        builder = builder.config(key, str(value))
    # Bounds the raw bytes held per Arrow batch; decoding happens model-batch by model-batch.
    builder = builder.config("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.featurize.arrow_batch_rows))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark
