"""The standalone cluster backend (`make cluster CLUSTER=standalone`): the EMR pipeline run for real on
this machine, only EMR's control plane swapped for Spark's own standalone cluster manager.

One master and N workers (Spark's own deploy classes, from the pinned pyspark), bound to 127.0.0.1.
Each worker is its own JVM in its own mount namespace, where a tmpfs covers the checkout, running as an
unprivileged system user: an executor sees nothing of the driver's files, only what a node has. The
nodes' Python and Spark come the way an EMR node gets its Python: `bootstrap/install-deps.sh` runs for
real (into a venv of the same /usr/bin/python3.x, one per pin set). S3 is AWS when credentials are
configured, storage.endpoint_url when set (the tests' server), else a local stand-in (moto, TLS, in
memory), said loudly. Steps are the EMR step's own spark-submit command, with `--master spark://`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from fruits.cloud import nodes
from fruits.cloud import state as cluster_state
from fruits.cloud.artifacts import spark_submit_command, upload_artifacts
from fruits.cloud.bucket import ensure_bucket
from fruits.cloud.state import S3Access, StandaloneCluster
from fruits.core.aws import client
from fruits.core.config import PROJECT_ROOT
from fruits.core.errors import ConfigError

log = logging.getLogger(__name__)

S3A_JARS = PROJECT_ROOT / ".cache" / "s3a-jars"  # `make s3a-jars`: the EMRFS stand-in, copied to the nodes
STANDIN_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "standin", "AWS_SECRET_ACCESS_KEY": "standin"}  # moto accepts any


def check_port_free(port: int, setting: str) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the JVM binds: TIME_WAIT is not "in use"
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise ConfigError(f"cluster.standalone.{setting}={port}: port {port} on 127.0.0.1 is in use ({err.strerror}); "
                              f"stop what holds it or pick another port") from None


def outside_checkout(path: Path, setting: str) -> Path:
    path = path.resolve()
    if path == PROJECT_ROOT or PROJECT_ROOT in path.parents:
        raise ConfigError(f"cluster.standalone.{setting}={path} is inside the checkout {PROJECT_ROOT}, which the "
                          "workers must not see: pick a folder outside it")
    return path


def master_url(settings: DictConfig) -> str:
    return f"spark://{settings.host}:{settings.master_port}"


def master_state(ui: str, timeout: float = 2.0) -> dict | None:
    """The master's JSON status (workers, applications), or None when no master answers."""
    try:
        with urllib.request.urlopen(f"{ui}/json", timeout=timeout) as answer:
            return json.load(answer)
    except OSError:
        return None


def s3_choice(cfg: DictConfig) -> str:
    """aws | endpoint (storage.endpoint_url) | standin."""
    import boto3

    if cfg.storage.endpoint_url:
        return "endpoint"
    return "aws" if boto3.Session().get_credentials() is not None else "standin"


def start_standin(cfg: DictConfig, run_dir: Path) -> tuple[str, Path, int]:
    """The S3 stand-in in its own process: (endpoint, certificate, pid)."""
    from fruits.cloud.s3_standin import self_signed_certificate

    port = int(cfg.cluster.standalone.s3_port)
    check_port_free(port, "s3_port")
    cert, key = self_signed_certificate(run_dir / "tls")
    key.chmod(0o600)
    with open(run_dir / "logs" / "s3-standin.log", "ab") as out:
        server = subprocess.Popen([sys.executable, "-m", "fruits.cloud.s3_standin", "--port", str(port), "--cert",
                                   str(cert), "--key", str(key)], stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    endpoint = f"https://127.0.0.1:{port}"
    wait_until(lambda: port_open(port), f"the S3 stand-in on {endpoint}", 30, server)
    return endpoint, cert, server.pid


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_until(ready, what: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s")
        time.sleep(0.2)


def truststore(run_dir: Path, certificate: Path) -> Path:
    """A JVM truststore holding the endpoint's certificate (S3A on the driver and the executors)."""
    store = run_dir / "truststore.jks"
    store.unlink(missing_ok=True)
    subprocess.run(["keytool", "-importcert", "-noprompt", "-alias", "s3", "-file", str(certificate),
                    "-keystore", str(store), "-storepass", "changeit"], check=True, capture_output=True)
    store.chmod(0o644)
    return store


def prepare_run_dir(settings: DictConfig) -> Path:
    run_dir = outside_checkout(Path(settings.run_dir), "run_dir")
    for part in ("conf", "logs", "jars", "tls", "home"):
        (run_dir / part).mkdir(parents=True, exist_ok=True)
    run_dir.chmod(0o755)
    shutil.chown(run_dir / "home", settings.user)
    jars = sorted(S3A_JARS.glob("*.jar"))
    if len(jars) != 2:
        raise RuntimeError(f"the S3A jars are missing from {S3A_JARS}: run `make s3a-jars`")
    for jar in jars:
        shutil.copy2(jar, run_dir / "jars" / jar.name)
    return run_dir


def s3_access(cfg: DictConfig, run_dir: Path) -> S3Access:
    """Which S3 the cluster and the pipeline use, and the environment that points them there."""
    kind, region = s3_choice(cfg), str(cfg.storage.region)
    if kind == "aws":
        return S3Access(kind, region)
    environment, pid = {}, None
    if kind == "standin":
        endpoint, certificate, pid = start_standin(cfg, run_dir)
        environment.update(STANDIN_CREDENTIALS)
        log.warning("S3 is a LOCAL STAND-IN, not AWS: moto on %s, its data only in that process's memory "
                    "(lost at `make cluster-down`); log %s", endpoint, run_dir / "logs" / "s3-standin.log")
    else:
        endpoint = str(cfg.storage.endpoint_url)
        certificate = Path(os.environ["AWS_CA_BUNDLE"]) if os.environ.get("AWS_CA_BUNDLE") else None
    environment["AWS_ENDPOINT_URL_S3"] = endpoint  # boto3, s3fs and the stages follow it
    store = None
    if certificate is not None:
        bundle = run_dir / "tls" / "ca.pem"
        if certificate.resolve() != bundle.resolve():
            shutil.copy2(certificate, bundle)
        bundle.chmod(0o644)
        environment["AWS_CA_BUNDLE"] = str(bundle)
        store = str(truststore(run_dir, bundle))
    return S3Access(kind, region, environment, endpoint, store, pid)


def s3_client(cfg: DictConfig, access: S3Access):
    """A client of the cluster's S3, from its record: this process's environment stays as it is."""
    env = access.environment
    options = {"endpoint_url": access.endpoint} if access.endpoint else {}
    if env.get("AWS_CA_BUNDLE"):
        options["verify"] = env["AWS_CA_BUNDLE"]
    if env.get("AWS_ACCESS_KEY_ID"):
        options.update(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return client("s3", cfg, **options)


def write_env_file(path: Path, environment: dict[str, str]) -> None:
    """The S3 endpoint and its credentials for the pipeline's own processes (`make emr-repro` and
    `make ingest-s3` source it); none when S3 is AWS."""
    import shlex

    path.unlink(missing_ok=True)
    if environment:
        path.write_text("# written by `make cluster` (standalone): the S3 the cluster uses; removed by `make cluster-down`\n"
                        + "".join(f"export {key}={shlex.quote(value)}\n" for key, value in environment.items()))
        path.chmod(0o600)


def daemon(command: list[str], env: dict[str, str], log_file: Path) -> int:
    with open(log_file, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True).pid


def start(cfg: DictConfig) -> StandaloneCluster:
    """Master + workers (+ the S3 stand-in), idempotent: a running cluster of this state is reused."""
    settings = cfg.cluster.standalone
    ui = f"http://{settings.host}:{settings.ui_port}"
    running = cluster_state.read(cfg)
    current_env = nodes.node_env_dir(settings) / "venv" / "bin" / "python"
    if isinstance(running, StandaloneCluster) and alive_workers(running) >= int(settings.workers):
        if running.python == str(current_env):
            log.info("reusing the running standalone cluster %s", running.master)
            return running
        log.info("the pins changed since the running cluster started: restarting it with new nodes")
    if isinstance(running, StandaloneCluster):
        stop(cfg, running)
    check_port_free(int(settings.master_port), "master_port")
    check_port_free(int(settings.ui_port), "ui_port")
    for n in range(int(settings.workers)):
        check_port_free(int(settings.ui_port) + 1 + n, f"ui_port (+{1 + n}, worker {n + 1}'s web UI)")
    if os.geteuid() != 0:
        raise ConfigError("cluster=standalone needs root: it creates the workers' system user "
                          f"({settings.user}) and their mount namespaces (unshare, mount); run make cluster as root")
    nodes.ensure_user(settings.user)
    started = time.monotonic()
    python = nodes.ensure_node_env(cfg)
    run_dir = prepare_run_dir(settings)
    record = StandaloneCluster(
        master=master_url(settings), ui=ui, host=str(settings.host), run_dir=str(run_dir), python=str(python),
        spark_home=str(nodes.spark_home(python)), workers=int(settings.workers),
        env_file=str(Path(settings.env_file).resolve()), s3=s3_access(cfg, run_dir))
    write_env_file(Path(record.env_file), record.s3.environment)
    defaults = nodes.spark_defaults(python, run_dir, record.s3)
    (run_dir / "conf" / "spark-defaults.conf").write_text("".join(f"{k} {v}\n" for k, v in defaults.items()))
    cluster_state.write(cfg, record)  # from here on, `make cluster-down` can stop what started
    env, spark_class = nodes.node_environment(record), f"{record.spark_home}/bin/spark-class"
    record.pids["master"] = daemon([spark_class, "org.apache.spark.deploy.master.Master", "--host", record.host,
                                    "--port", str(settings.master_port), "--webui-port", str(settings.ui_port)],
                                   env, record.logs / "master.log")
    cluster_state.write(cfg, record)
    wait_until(lambda: master_state(ui) is not None, f"the master ({ui})", float(settings.start_timeout_s))
    for n in range(1, record.workers + 1):
        work = run_dir / f"work-{n}"
        work.mkdir(exist_ok=True)
        shutil.chown(work, settings.user)
        worker = [spark_class, "org.apache.spark.deploy.worker.Worker", record.master, "--host", record.host,
                  "--cores", str(settings.worker_cores), "--memory", str(settings.worker_memory),
                  "--work-dir", str(work), "--webui-port", str(int(settings.ui_port) + n)]
        record.pids[f"worker-{n}"] = daemon(nodes.hidden_from_checkout(worker, settings.user), env,
                                            record.logs / f"worker-{n}.log")
        cluster_state.write(cfg, record)
    wait_until(lambda: alive_workers(record) >= record.workers, f"{record.workers} workers registered with "
               f"{record.master} (logs: {record.logs})", float(settings.start_timeout_s))
    record = dataclasses.replace(record, start_seconds=round(time.monotonic() - started, 1))
    cluster_state.write(cfg, record)
    log.info("standalone cluster %s up: %d workers, UI %s, logs %s (%.0f s)", record.master, record.workers,
             ui, record.logs, record.start_seconds)
    return record


def alive_workers(record: StandaloneCluster) -> int:
    found = master_state(record.ui)
    return sum(w["state"] == "ALIVE" for w in found["workers"]) if found else 0


def stop(cfg: DictConfig, record: StandaloneCluster) -> str:
    """Stop every process this cluster started (workers, master, stand-in); safe to run twice."""
    pids = list(record.pids.values()) + ([record.s3.pid] if record.s3.pid else [])
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(process_alive(pid) for pid in pids):
        time.sleep(0.2)
    for pid in (p for p in pids if process_alive(p)):
        os.killpg(pid, signal.SIGKILL)
    cluster_state.remove(cfg)
    Path(record.env_file).unlink(missing_ok=True)
    return f"standalone cluster {record.master} stopped"


def process_alive(pid: int) -> bool:
    """The daemon (its group's leader) still runs; reaped first when this process started it."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # started by an earlier `make cluster`: init reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class StandaloneStep:
    """A spark-submit running on this machine, as an EMR step runs on the primary node."""

    process: subprocess.Popen
    log_file: Path
    workdir: tempfile.TemporaryDirectory
    what: str


def launch(record: StandaloneCluster, command: list[str], log_file: Path) -> StandaloneStep:
    """The EMR step's spark-submit command line, started with the nodes' Spark and environment."""
    assert command[0] == "spark-submit", command
    command = [f"{record.spark_home}/bin/spark-submit", *command[1:]]
    workdir = tempfile.TemporaryDirectory(prefix="fruits-step-")
    with open(log_file, "ab") as out:
        process = subprocess.Popen(command, env=nodes.node_environment(record), cwd=workdir.name, stdout=out,
                                   stderr=subprocess.STDOUT)
    return StandaloneStep(process, log_file, workdir, " ".join(command[-2:]))


def finish(step: StandaloneStep) -> None:
    """Wait for the step; its failure raises with the log's tail."""
    try:
        code = step.process.wait()
    finally:
        step.workdir.cleanup()
    if code != 0:
        tail = step.log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"step {step.what} failed (spark-submit exit {code}); log: {step.log_file}\n{tail}")


def run_step(record: StandaloneCluster, command: list[str], log_file: Path) -> None:
    finish(launch(record, command, log_file))


class StandaloneBackend:
    """Spark's own standalone cluster manager on this machine, in place of EMR's control plane."""

    kind = "standalone"

    def create(self, cfg: DictConfig) -> StandaloneCluster:
        record = start(cfg)
        s3 = s3_client(cfg, record.s3)  # the cluster's S3 (the stand-in's, maybe): this process's environment stays
        ensure_bucket(cfg, s3)
        upload_artifacts(cfg, s3)
        return record

    def status(self, cfg: DictConfig, record: StandaloneCluster) -> dict:
        found = master_state(record.ui)
        if found is None:
            return {"kind": self.kind, "state": "DOWN", "master": record.master,
                    "message": f"the master does not answer on {record.ui}: `make cluster-down`, then `make cluster`"}
        return {
            "kind": self.kind, "state": found["status"], "master": record.master, "ui": record.ui,
            "workers": [{"id": w["id"], "state": w["state"], "cores": w["cores"], "memory_mb": w["memory"]}
                        for w in found["workers"]],
            "applications": [a["name"] for a in found.get("activeapps", [])],
            "s3": record.s3.kind + (f" {record.s3.endpoint}" if record.s3.endpoint else ""),
            "logs": str(record.logs),
            "start_seconds": record.start_seconds,
        }

    def submit_step(self, cfg: DictConfig, record: StandaloneCluster, stage: str, run_uri: str,
                    run_id: str) -> StandaloneStep:
        log_file = record.logs / f"step-{run_id}.log"
        log.info("running %s on %s (spark-submit in client mode; log %s)", stage, record.master, log_file)
        return launch(record, spark_submit_command(cfg, stage, run_uri, record.master), log_file)

    def wait(self, cfg: DictConfig, record: StandaloneCluster, step: StandaloneStep) -> None:
        finish(step)

    def destroy(self, cfg: DictConfig, record: StandaloneCluster) -> str:
        return stop(cfg, record)
