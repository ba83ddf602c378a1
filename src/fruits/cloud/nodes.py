"""What a node of the standalone cluster has, and nothing more: the nodes' Python and Spark (built by the
EMR bootstrap script itself, one environment per pin set), an unprivileged user, a mount namespace
where the checkout is an empty tmpfs, and the settings EMR's spark-defaults and EMRFS would give it."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig

from fruits.cloud.state import S3Access, StandaloneCluster
from fruits.core.backbone import TF_ENVIRONMENT
from fruits.core.config import PROJECT_ROOT
from fruits.core.errors import ConfigError

log = logging.getLogger(__name__)
UNUSED_ENV_DAYS = 14  # a nodes' environment of other pins is kept this long after a cluster last used it


def node_requirements() -> str:
    """What a node installs: the project's runtime requirements, plus the pinned pyspark (EMR ships its
    own Spark; these nodes use the one the tests pin)."""
    runtime = (PROJECT_ROOT / "requirements" / "runtime.txt").read_text()
    return runtime + "pyspark   # the standalone nodes' Spark (EMR ships its own)\n"


def node_env_dir(settings: DictConfig) -> Path:
    pins = node_requirements() + (PROJECT_ROOT / "requirements" / "lock.txt").read_text()
    return Path(settings.node_envs) / hashlib.sha256(pins.encode()).hexdigest()[:16]


def ensure_node_env(cfg: DictConfig) -> Path:
    """The nodes' environment, built once per pin set by the EMR bootstrap script itself; its python."""
    folder = node_env_dir(cfg.cluster.standalone)
    python = folder / "venv" / "bin" / "python"
    base = Path(f"/usr/bin/python{cfg.cluster.python_version}")  # the interpreter EMR nodes have
    if not base.exists():
        raise ConfigError(f"cluster.python_version={cfg.cluster.python_version}: {base} does not exist; the nodes "
                          f"need it (Debian: apt-get install python{cfg.cluster.python_version}-venv)")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    if not python.exists():
        subprocess.run([str(base), "-m", "venv", str(folder / "venv")], check=True)
    requirements = folder / "node-requirements.txt"
    requirements.write_text(node_requirements())
    started = time.monotonic()
    done = subprocess.run(["bash", str(PROJECT_ROOT / "bootstrap" / "install-deps.sh"), str(requirements),
                           str(PROJECT_ROOT / "requirements" / "lock.txt"), str(python)],
                          env={**os.environ, "FRUITS_STAMP_DIR": str(folder)}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the nodes' bootstrap (install-deps.sh) failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    log.info("nodes' environment %s ready (%.0f s)", folder, time.monotonic() - started)
    (folder / "last-used").touch()
    prune_node_envs(folder.parent, keep=folder)
    return python


def prune_node_envs(envs: Path, keep: Path, unused_days: float = UNUSED_ENV_DAYS) -> list[Path]:
    """Remove the nodes' environments (2+ GB each) that no cluster started for `unused_days`. Another
    checkout of the project with other pins shares the folder and keeps its own while it starts clusters."""
    removed = []
    cutoff = time.time() - unused_days * 86400
    for other in (p for p in envs.iterdir() if p != keep and (p / "venv").is_dir()):
        stamp = other / "last-used" if (other / "last-used").exists() else other
        if stamp.stat().st_mtime < cutoff:
            shutil.rmtree(other)
            removed.append(other)
            log.info("removed the nodes' environment %s: no cluster used it for %g days", other, unused_days)
    return removed


def spark_home(python: Path) -> Path:
    found = list((python.parent.parent / "lib").glob("python3*/site-packages/pyspark"))
    if not found:
        raise RuntimeError(f"no pyspark in the nodes' environment {python.parent.parent}")
    return found[0]


def ensure_user(name: str) -> None:
    """The unprivileged system user the workers run as (no home, no login shell)."""
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True)


def hidden_from_checkout(command: list[str], user: str) -> list[str]:
    """command, run as user in a private mount namespace where an empty tmpfs covers the checkout."""
    tools = {name: shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin") for name in ("unshare", "mount", "runuser")}
    if None in tools.values():
        raise RuntimeError(f"the workers need unshare, mount and runuser (util-linux): found {tools}")
    script = f'{tools["mount"]} -t tmpfs -o size=1m,mode=0755 fruits-hidden "$0" && exec {tools["runuser"]} --preserve-environment -u "$1" -- "${{@:2}}"'
    return [tools["unshare"], "--mount", "--propagation", "private", "/bin/bash", "-c", script, str(PROJECT_ROOT), user, *command]


def s3a_connector(region: str, endpoint: str | None = None, truststore: str | Path | None = None) -> dict[str, str]:
    """Spark settings that bind s3:// to Hadoop's S3A connector, as EMRFS binds it on EMR: the region, and
    for an endpoint other than AWS's (an S3-compatible server) its address and the JVM truststore that
    holds its certificate."""
    conf = {
        "spark.hadoop.fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "spark.hadoop.fs.s3a.endpoint.region": region,
    }
    if endpoint:
        conf.update({"spark.hadoop.fs.s3a.endpoint": endpoint, "spark.hadoop.fs.s3a.path.style.access": "true"})
    if truststore:
        trust = f"-Djavax.net.ssl.trustStore={truststore} -Djavax.net.ssl.trustStorePassword=changeit"
        conf.update({"spark.driver.extraJavaOptions": trust, "spark.executor.extraJavaOptions": trust})
    return conf


def spark_defaults(python: Path, run_dir: Path, s3: S3Access) -> dict[str, str]:
    """What EMR's spark-defaults classification and EMRFS give a node, for this cluster."""
    jars = f"{run_dir / 'jars'}/*"
    return {
        "spark.pyspark.python": str(python),
        "spark.pyspark.driver.python": str(python),
        "spark.python.worker.reuse": "true",
        **{f"spark.executorEnv.{name}": value for name, value in TF_ENVIRONMENT.items()},
        "spark.driver.extraClassPath": jars,
        "spark.executor.extraClassPath": jars,
        # YARN has an external shuffle service; here executors keep their shuffle files while needed
        "spark.dynamicAllocation.shuffleTracking.enabled": "true",
        **s3a_connector(s3.region, s3.endpoint, s3.truststore),
    }


def node_environment(record: StandaloneCluster) -> dict[str, str]:
    """The environment of the nodes' processes (daemons, spark-submit): nothing of the checkout's."""
    env = {
        "PATH": "/usr/bin:/bin",
        "SPARK_HOME": record.spark_home,
        "SPARK_CONF_DIR": str(Path(record.run_dir) / "conf"),
        "SPARK_LOCAL_IP": record.host,
        "HOME": str(Path(record.run_dir) / "home"),
        **TF_ENVIRONMENT,
        **record.s3.environment,
    }
    if os.environ.get("JAVA_HOME"):
        env["JAVA_HOME"] = os.environ["JAVA_HOME"]
    if record.s3.kind != "standin":  # the caller's credentials, as an instance profile gives them on EMR (never written to disk)
        env.update({k: v for k, v in os.environ.items() if k.startswith("AWS_") and k != "AWS_CA_BUNDLE"})
    return env
