"""Spark's JVM class archive: fruits.core.spark maps it (class_archive, archive_option), fruits.tooling.jvm_archive
builds it."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.project import make_cfg

from fruits.core import spark as spark_setup

REPO = Path(__file__).resolve().parents[1]


def fake_spark_home(tmp_path: Path) -> Path:
    home = tmp_path / "spark-home"
    (home / "jars").mkdir(parents=True)
    (home / "jars" / "spark-core.jar").write_bytes(b"core")
    (home / "jars" / "spark-sql.jar").write_bytes(b"sql")
    return home


def test_the_archive_is_named_after_the_jdk_and_spark_jars_and_used_only_once_written(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_HOME", str(fake_spark_home(tmp_path)))  # where spark-submit finds the jars
    cfg = make_cfg(tmp_path, f"env.paths.class_archives={tmp_path / 'jvm'}")
    archive = spark_setup.class_archive(cfg)
    assert archive.parent == tmp_path / "jvm" and archive.suffix == ".jsa"
    assert spark_setup.archive_option(cfg) is None  # not built yet: the JVM starts as it always did

    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"archive")
    assert spark_setup.archive_option(cfg) == f"-XX:SharedArchiveFile={archive.resolve()}"

    # An upgraded Spark (a jar of another size) looks for another archive, never the stale one.
    (tmp_path / "spark-home" / "jars" / "spark-sql.jar").write_bytes(b"sql 3.5.10")
    assert spark_setup.class_archive(cfg) != archive
    assert spark_setup.archive_option(cfg) is None


def test_no_archive_when_the_env_names_no_folder(tmp_path):
    cfg = make_cfg(tmp_path, "env.paths.class_archives=null")
    assert spark_setup.class_archive(cfg) is None and spark_setup.archive_option(cfg) is None


def test_every_workspace_of_the_machine_maps_the_same_archive(tmp_path, monkeypatch):
    """The default folder is the user's cache, not one of the checkout: a clone or a queued experiment
    (which DVC runs in a workspace of its own) finds the archive that `make jvm-archive` built."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    archives = set()
    for workspace in ("checkout", "clone", ".dvc/tmp/exps/tmp123"):
        (tmp_path / workspace).mkdir(parents=True)
        monkeypatch.chdir(tmp_path / workspace)
        archives.add(spark_setup.class_archive(make_cfg(tmp_path / workspace)))
    (archive,) = archives
    assert archive.is_absolute() and archive.parent == tmp_path / "home" / ".cache" / "fruits" / "jvm"


def test_a_new_build_removes_the_archives_of_a_spark_or_jdk_that_is_gone(tmp_path):
    """The machine's archive folder is shared by every checkout: an archive whose virtual environment
    (its Spark) or JDK was deleted can never be mapped again, and goes at the next build."""
    from fruits.tooling.jvm_archive import remove_orphans

    folder, java = tmp_path / "jvm", tmp_path / "java"
    folder.mkdir()
    java.write_bytes(b"jdk")
    kept, gone_venv, gone_jdk = fake_spark_home(tmp_path / "kept"), tmp_path / "deleted-venv", tmp_path / "old-jdk"
    owners = {"spark-aaaa": (java, kept), "spark-bbbb": (java, gone_venv), "spark-cccc": (gone_jdk, kept)}
    for name, (jdk, home) in owners.items():
        (folder / f"{name}.jsa").write_bytes(b"archive")
        (folder / f"{name}.json").write_text(json.dumps({"java": str(jdk), "spark_home": str(home)}))
    (folder / "spark-dddd.jsa").write_bytes(b"archive")  # no record (built before records): left alone

    assert sorted(p.name for p in remove_orphans(folder)) == ["spark-bbbb.jsa", "spark-cccc.jsa"]
    assert sorted(p.name for p in folder.iterdir()) == ["spark-aaaa.jsa", "spark-aaaa.json", "spark-dddd.jsa"]


@pytest.mark.slow
def test_a_built_archive_is_what_the_next_jvm_maps_spark_from(tmp_path):
    folder = tmp_path / "jvm"
    built = subprocess.run([sys.executable, "-m", "fruits.tooling.jvm_archive", f"env.paths.class_archives={folder}"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    archives = list(folder.glob("*.jsa"))
    # renamed when complete (no partial file left), its record beside it
    assert sorted(p.name for p in folder.iterdir()) == [archives[0].name, archives[0].with_suffix(".json").name]
    assert archives[0].stat().st_size > 10 * 2**20

    # -Xshare:on: the JVM refuses to start if it cannot map the archive, instead of quietly loading.
    classes = tmp_path / "classes.log"
    script = textwrap.dedent(f"""
        from fruits.core.config import load_config
        from fruits.core.spark import get_session
        spark = get_session(load_config(["env.paths.class_archives={folder}"]),
                            "-Xshare:on -Xlog:class+load=info:file={classes}")
        print(spark.range(5).count())
        spark.stop()
    """)
    started = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stderr[-3000:]
    assert started.stdout.split()[-1] == "5"
    loaded = classes.read_text()
    assert "org.apache.spark.SparkContext source: shared objects file (top)" in loaded
