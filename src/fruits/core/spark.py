"""The Spark session, from config only (`env.spark`): no master is hard-coded, so the same job runs
under `local[N]` and under spark-submit on YARN (EMR)."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from fruits.core import logs

log = logging.getLogger(__name__)


def java_binary() -> Path | None:
    """The java that spark-submit runs: $JAVA_HOME/bin/java, else the first on PATH."""
    found = Path(os.environ["JAVA_HOME"]) / "bin" / "java" if os.environ.get("JAVA_HOME") else shutil.which("java")
    return Path(found).resolve() if found and Path(found).exists() else None


def check_java() -> None:
    """Spark needs a JVM; say so plainly instead of a py4j stack trace."""
    if java_binary() is None:
        raise RuntimeError(
            "no Java runtime found (JAVA_HOME/bin/java, or java on PATH): Spark 3.5 needs Java 8, 11 or 17 "
            "(Debian: apt-get install openjdk-17-jre-headless, or set JAVA_HOME)"
        )


def session_conf(spark_cfg: DictConfig, java_options: str | None = None) -> dict[str, str]:
    """Spark settings of env.spark.conf, with java_options added to the driver JVM's (in local mode the
    executors' too), after any the config sets."""
    conf = {key: str(value) for key, value in spark_cfg.conf.items()}
    if java_options:
        conf["spark.driver.extraJavaOptions"] = " ".join(
            part for part in (conf.get("spark.driver.extraJavaOptions"), java_options) if part)
    return conf


def spark_home() -> Path:
    """The Spark that spark-submit runs: $SPARK_HOME, else pyspark's own (the virtual environment's)."""
    import pyspark

    return Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)


def class_archive(cfg: DictConfig) -> Path | None:
    """This machine's class archive for Spark's JVM (env.paths.class_archives; None when unset): named
    after the JDK and Spark's jars, so an upgrade of either looks for a new one and never maps a stale
    one (the JVM would refuse it, with a warning, and load every class again)."""
    import hashlib

    folder, java = cfg.env.paths.get("class_archives"), java_binary()
    if not folder or java is None:
        return None
    identity = hashlib.sha256()
    for part in (java, *sorted((spark_home() / "jars").glob("*.jar"))):
        stat = part.stat()
        identity.update(f"{part.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return Path(folder).expanduser() / f"spark-{identity.hexdigest()[:16]}.jsa"


def archive_option(cfg: DictConfig) -> str | None:
    """-XX:SharedArchiveFile when this machine's archive exists: the JVM maps the classes it holds
    instead of loading, verifying and parsing them (measured: the featurize stage on 1,920 images,
    14.7 s against 17.2 s, four alternating rounds)."""
    archive = class_archive(cfg)
    return f"-XX:SharedArchiveFile={archive.resolve()}" if archive is not None and archive.is_file() else None


def get_session(cfg: DictConfig, java_options: str | None = None):
    """The Spark session of env.spark; java_options (a stage's own JVM flags) count only if this starts
    the JVM (a session already running keeps its own). A JVM started here maps the class archive
    when there is one (`make jvm-archive`)."""
    from pyspark.sql import SparkSession

    check_java()
    if not java_options or "ArchiveClassesAtExit" not in java_options:
        java_options = " ".join(part for part in (java_options, archive_option(cfg)) if part) or None
    # Workers must run this interpreter (the venv's), not whatever `python3` is first on PATH.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if not logs.verbose():  # the driver JVM (local mode: the executors too) reads it when it starts
        os.environ.setdefault("SPARK_SUBMIT_OPTS", f"-Dlog4j2.configurationFile={logs.SPARK_LOG_CONFIG.as_uri()}")
    spark_cfg = cfg.env.spark
    builder = SparkSession.builder.appName(spark_cfg.app_name)
    if spark_cfg.master:
        builder = builder.config("spark.master", spark_cfg.master)
    for key, value in session_conf(spark_cfg, java_options).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


@contextmanager
def session_settings(spark, settings: dict[str, str]):
    """Spark SQL settings for the plans run inside the block, then the previous values back (a shared
    session, as in the tests or a notebook, keeps its own)."""
    before = {key: spark.conf.get(key, None) for key in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)


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


class Progress:
    """A status line on the driver while the model runs: images done, img/s and time left, every
    `every` seconds, from Spark's status tracker (completed tasks of the active stage that has
    `tasks` tasks, each about images/tasks images). Silent for a job shorter than `every` seconds.

        with Progress(spark, "featurize", images=20_000, tasks=40):
            computed.count()
    """

    def __init__(self, spark, label: str, images: int, tasks: int, every: float = 10.0):
        self.tracker, self.label, self.images, self.tasks, self.every = spark.sparkContext.statusTracker(), label, images, tasks, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._report, daemon=True)
        self.lines: list[str] = []

    def __enter__(self):
        self.started = time.monotonic()
        if self.images and self.tasks:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def done_tasks(self) -> int | None:
        """Completed tasks of the active stage that runs the model (the one with `tasks` tasks)."""
        for stage_id in self.tracker.getActiveStageIds():
            info = self.tracker.getStageInfo(stage_id)
            if info is not None and info.numTasks == self.tasks:
                return info.numCompletedTasks
        return None

    def _report(self) -> None:
        while not self._stop.wait(self.every):
            done = self.done_tasks()
            if done is None:
                continue
            line = progress_line(self.label, self.images * done / self.tasks, self.images, time.monotonic() - self.started)
            self.lines.append(line)
            log.info(line)


def progress_line(label: str, done: float, total: int, seconds: float) -> str:
    """'featurize: ~4,096 of 20,000 images (20%), 135 img/s, about 1 min 58 s left' (pure)."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f"about {format_seconds((total - done) / rate)} left" if rate > 0 else "rate not known yet"
    return f"{label}: ~{done:,.0f} of {total:,} images ({100 * done / total:.0f}%), {rate:.0f} img/s, {left}"


def format_seconds(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
