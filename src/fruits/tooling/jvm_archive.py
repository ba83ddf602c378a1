"""`make jvm-archive`: the class archive Spark's JVM maps at start (JDK 17 dynamic AppCDS), so that
every stage's JVM starts about 2.5 s sooner. Build tooling: the session (fruits.core.spark) only uses
an archive that exists; this module writes it. spark-submit runs this same file with --workload."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from omegaconf import DictConfig

from fruits.core import logs
from fruits.core.config import load_config
from fruits.core.errors import ConfigError
from fruits.core.spark import class_archive, java_binary, spark_home
from fruits.core.storage import atomic_output


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
    owner_record(archive).write_text(json.dumps({"java": str(java_binary()), "spark_home": str(spark_home())}))
    for orphan in remove_orphans(archive.parent):
        print(f"removed {orphan.name}: its JDK or Spark is gone")
    return archive


def owner_record(archive: Path) -> Path:
    """Beside each archive, the JDK and the Spark it was built from (its name keeps only their hash)."""
    return archive.with_suffix(".json")


def remove_orphans(folder: Path) -> list[Path]:
    """Delete the archives whose JDK or Spark is gone (a virtual environment or a JDK since removed): no
    JVM can map them again, and each weighs ~180 MiB in a folder that every checkout of the machine shares.
    An archive without its record is left alone."""
    removed = []
    for record in sorted(folder.glob("spark-*.json")):
        owner = json.loads(record.read_text())
        if not (Path(owner["java"]).exists() and (Path(owner["spark_home"]) / "jars").is_dir()):
            archive = record.with_suffix(".jsa")
            archive.unlink(missing_ok=True)
            record.unlink()
            removed.append(archive)
    return removed


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
        with tempfile.TemporaryDirectory() as work:  # this very file, run by spark-submit with --workload
            subprocess.run([submit, "--master", cfg.env.spark.master or "local[2]", "--driver-java-options", java_options,
                            __file__, "--workload", work], env=environment, check=True, capture_output=True, text=True)
        if not partial.is_file() or partial.stat().st_size == 0:
            raise RuntimeError(f"the JVM wrote no class archive at {partial}")
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"the class archive's workload failed:\n{err.stderr[-3000:]}") from None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--workload"]:  # inside spark-submit's JVM
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.getOrCreate()
        archive_workload(spark, Path(argv[1]))
        spark.stop()
        return
    archive = build_class_archive(load_config(argv))
    print(f"class archive: {archive} ({archive.stat().st_size >> 20} MiB)")


if __name__ == "__main__":
    logs.run_command(main)
