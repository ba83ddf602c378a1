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
from fruits.core.config import load_config
from fruits.core.errors import ConfigError
from fruits.core.storage import atomic_output

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


def class_archive(cfg: DictConfig) -> Path | None:
    """This machine's class archive for Spark's JVM (env.paths.class_archives; None when unset): named
    after the JDK and Spark's jars, so an upgrade of either looks for a new one and never maps a stale
    one (the JVM would refuse it, with a warning, and load every class again)."""
    import hashlib

    import pyspark

    folder, java = cfg.env.paths.get("class_archives"), java_binary()
    if not folder or java is None:
        return None
    spark_home = Path(os.environ.get("SPARK_HOME") or Path(pyspark.__file__).parent)  # as spark-submit finds it
    identity = hashlib.sha256()
    for part in (java, *sorted((spark_home / "jars").glob("*.jar"))):
        stat = part.stat()
        identity.update(f"{part.name} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return Path(folder) / f"spark-{identity.hexdigest()[:16]}.jsa"


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


def archive_workload(spark, folder: Path) -> None:
    """What the stages do, small: list and read files (binaryFile), run an Arrow Python function, write
    and read Parquet, aggregate, fit a PCA: the classes these load are the ones the archive keeps."""
    import pyarrow as pa
    from pyspark.ml.feature import PCA
    from pyspark.ml.linalg import Vectors
    from pyspark.sql import functions as F

    images = folder / "images" / "Training" / "Apple"
    images.mkdir(parents=True, exist_ok=True)
    for number in range(8):
        (images / f"{number}.jpg").write_bytes(bytes(range(number + 1)))

    def sizes(batches):
        for batch in batches:
            yield pa.RecordBatch.from_pydict({"path": batch.column("path"),
                                              "bytes": pa.compute.binary_length(batch.column("content"))})

    files = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(folder / "images"))
    files.select("path", "content").mapInArrow(sizes, "path string, bytes int").write.parquet(str(folder / "table"))
    spark.read.parquet(str(folder / "table")).groupBy("bytes").agg(F.count("path")).collect()
    vectors = spark.createDataFrame([(Vectors.dense([float(i), float(i % 3), 1.0]),) for i in range(8)], ["features"])
    PCA(k=2, inputCol="features").fit(vectors).transform(vectors).collect()


def build_class_archive(cfg: DictConfig) -> Path:
    """Write this machine's class archive (JDK 17 dynamic AppCDS): spark-submit runs archive_workload
    in a JVM started with -XX:ArchiveClassesAtExit, which writes the classes it loaded as it exits;
    spark-submit is that JVM, so it returns once the archive is written. Written under a temporary
    name, renamed when complete."""
    archive, submit = class_archive(cfg), shutil.which("spark-submit")
    if archive is None:
        raise ConfigError("env.paths.class_archives is not set (or no java found): no class archive to build")
    if archive.is_file():
        return archive
    if submit is None:
        raise RuntimeError("spark-submit is not on PATH (pyspark installs it beside the interpreter)")
    with atomic_output(archive) as partial:  # a failed build leaves nothing a later JVM could map
        run_archive_workload(cfg, submit, partial)
    return archive


def run_archive_workload(cfg: DictConfig, submit: str, partial: Path) -> None:
    """spark-submit archive_workload in a JVM that writes its class archive to partial as it exits."""
    import subprocess
    import tempfile

    java_options = " ".join(part for part in (cfg.env.spark.get("featurize_java_options"),
                                              f"-XX:ArchiveClassesAtExit={partial.resolve()}") if part)
    environment = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    if not logs.verbose():
        environment.setdefault("SPARK_SUBMIT_OPTS", f"-Dlog4j2.configurationFile={logs.SPARK_LOG_CONFIG.as_uri()}")
    try:
        with tempfile.TemporaryDirectory() as work:
            script = Path(work) / "workload.py"
            script.write_text("import sys\nfrom pathlib import Path\nfrom pyspark.sql import SparkSession\n"
                              "from fruits.core.spark import archive_workload\n"
                              "spark = SparkSession.builder.getOrCreate()\n"
                              "archive_workload(spark, Path(sys.argv[1]))\nspark.stop()\n")
            subprocess.run([submit, "--master", cfg.env.spark.master or "local[2]", "--driver-java-options", java_options,
                            str(script), work], env=environment, check=True, capture_output=True, text=True)
        if not partial.is_file() or partial.stat().st_size == 0:
            raise RuntimeError(f"the JVM wrote no class archive at {partial}")
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"the class archive's workload failed:\n{err.stderr[-3000:]}") from None


if __name__ == "__main__":
    archive = build_class_archive(load_config(sys.argv[1:]))
    print(f"class archive: {archive} ({archive.stat().st_size >> 20} MiB)")
