"""The EMR pipeline on a real Spark cluster (cluster=standalone): a master and two workers, each
worker its own JVM in a mount namespace that hides the checkout, as an unprivileged user; the nodes'
Python built by the EMR bootstrap script; data in the suite's S3 server through S3A; every Spark stage
submitted by fruits.cloud.steps with the EMR step's own spark-submit command. Faults only a cluster
has: an executor killed, a worker lost for good, the driver killed.

One cluster and one pipeline run serve the module (a cluster start and each step cost seconds)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import psutil
import pytest
from omegaconf import OmegaConf

from fruits.cloud import cluster, locations, standalone, steps
from fruits.cloud import state as cluster_state
from fruits.core import tables
from fruits.core.config import PROJECT_ROOT, compose
from fruits.stages import featurize, index, ingest, pca
from fruits.core.storage import Storage

from helpers.project import TINY_LABELS, TINY_SIZE, kill_midway
from helpers.data import jpeg

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.network]  # network: the nodes pip-install the pins


def free_ports(count: int) -> int:
    """The first of count consecutive free ports on 127.0.0.1 (the master's UI, then one per worker)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count < 65000 and all(standalone.port_open(first + n) is False for n in range(count)):
            return first
    raise RuntimeError("no free ports")


def cluster_cfg(workdir: Path, endpoint: str, tiny_cfg):
    ui = free_ports(3)
    cfg = compose([
        "env=emr", "storage=s3", "cluster=standalone", f"storage.endpoint_url={endpoint}",
        f"storage.bucket=fruits-cluster-{uuid.uuid4().hex[:10]}", "env.allow_offline_weights=true",
        f"data.labels=[{','.join(TINY_LABELS)}]", f"model.input_size={TINY_SIZE}", "model.weights=random",
        "model.calibration_images=24", "model.precision=fp32",  # the local pipeline's (make_cfg), which it must equal
        "featurize.batch_size=8", "featurize.images_per_partition=4",  # 8 tasks: a kill lands mid-job
        f"cluster.state_file={workdir / 'cluster-state.json'}",
        f"cluster.standalone.master_port={free_ports(1)}", f"cluster.standalone.ui_port={ui}",
        f"cluster.standalone.run_dir=/var/tmp/fruits-test-cluster-{uuid.uuid4().hex[:8]}",
        f"cluster.standalone.env_file={workdir / 'cluster-env'}",
    ])
    cfg.data.root = str(Path(tiny_cfg.data.root).resolve())
    return cfg


def step_log(cfg, stage: str) -> str:
    """The newest driver log of that stage's step (spark-submit's own output)."""
    logs = sorted(cluster_state.read(cfg).logs.glob(f"step-{stage}-*.log"))
    return logs[-1].read_text(errors="replace")


def is_executor(process: psutil.Process) -> bool:
    try:
        return "org.apache.spark.executor.CoarseGrainedExecutorBackend" in process.cmdline()
    except psutil.Error:  # gone, or a zombie not yet reaped by its worker
        return False


def executor_processes(user: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["username", "cmdline"])
            if p.info["username"] == user and "org.apache.spark.executor.CoarseGrainedExecutorBackend" in (p.info["cmdline"] or [])]


def busy_executors(user: str) -> list[psutil.Process]:
    """The executor JVMs with a task in Python (the model being built or run)."""
    busy = []
    for jvm in executor_processes(user):
        try:
            if is_executor(jvm) and any(child.name().startswith("python") for child in jvm.children(recursive=True)):
                busy.append(jvm)
        except psutil.NoSuchProcess:
            pass
    return busy


def python_worker_running(user: str) -> bool:
    return bool(busy_executors(user))


def in_background(function, *args) -> threading.Thread:
    errors: list[BaseException] = []

    def target():
        try:
            function(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the test through .errors
            errors.append(err)

    thread = threading.Thread(target=target, daemon=True)
    thread.errors = errors
    thread.start()
    return thread


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def on_cluster(tmp_path_factory, s3_endpoint, tiny_project):
    """The cluster, then the EMR pipeline (ingest, weights, featurize with an executor killed midway,
    pca with a worker lost for good, index, report), run in a fresh folder as `make emr-repro` would."""
    from helpers.project import make_cfg

    workdir = tmp_path_factory.mktemp("emr-on-cluster")
    tiny = make_cfg(tiny_project)
    cfg = cluster_cfg(workdir, s3_endpoint, tiny)
    models = workdir / Path(cfg.env.paths.weights).parent
    models.mkdir(parents=True)
    for key in ("weights", "onnx", "provenance"):  # the tiny project's seeded weights: the weights stage is local
        shutil.copy2(tiny.env.paths[key], workdir / cfg.env.paths[key])
    previous = os.getcwd()
    os.chdir(workdir)
    record = {"cfg": cfg, "workdir": workdir, "timings": {}}
    try:
        started = time.monotonic()
        record["master"] = cluster.create(cfg)
        record["timings"]["cluster start"] = time.monotonic() - started
        ingest.run(cfg)
        run_featurize_killing_an_executor(cfg, record)
        run_pca_losing_a_worker(cfg, record)
        for stage in ("index", "report"):
            started = time.monotonic()
            steps.submit(cfg, stage)
            record["timings"][stage] = time.monotonic() - started
        yield record
    finally:
        os.chdir(previous)
        record = cluster_state.read(cfg)
        cluster.down(cfg)
        if record:
            shutil.rmtree(record.run_dir, ignore_errors=True)


def run_featurize_killing_an_executor(cfg, record: dict) -> None:
    user = cfg.cluster.standalone.user
    started = time.monotonic()
    step = in_background(steps.submit, cfg, "featurize")
    wait_for(lambda: python_worker_running(user) or not step.is_alive(), "a featurize task in Python")
    assert step.is_alive(), f"featurize ended before an executor could be killed: {step.errors}"
    victim = busy_executors(user)[0]
    record["killed_executor"] = victim.pid
    victim.send_signal(signal.SIGKILL)
    step.join(timeout=600)
    assert not step.errors, step.errors
    record["timings"]["featurize (an executor killed)"] = time.monotonic() - started


def run_pca_losing_a_worker(cfg, record: dict) -> None:
    worker = psutil.Process(cluster_state.read(cfg).pids["worker-2"])
    started = time.monotonic()
    step = in_background(steps.submit, cfg, "pca")

    def worker_two_runs_an_executor():
        return any(is_executor(p) for p in worker.children(recursive=True))

    wait_for(lambda: worker_two_runs_an_executor() or not step.is_alive(), "an executor on worker 2")
    assert step.is_alive(), f"pca ended before worker 2 could be killed: {step.errors}"
    os.killpg(worker.pid, signal.SIGKILL)  # the worker daemon and its executor: that node is gone
    step.join(timeout=600)
    assert not step.errors, step.errors
    record["timings"]["pca (a worker lost)"] = time.monotonic() - started


@pytest.fixture(scope="module")
def local_run(on_cluster, spark, tmp_path_factory):
    """The same stages on the same images and weights, undisturbed, in the suite's local[2] session."""
    from helpers.project import make_cfg

    cfg, workdir = on_cluster["cfg"], on_cluster["workdir"]
    local = make_cfg(tmp_path_factory.mktemp("local-twin"), f"data.labels=[{','.join(TINY_LABELS)}]")
    local.data.root = cfg.data.root
    local.env.paths.images = cfg.data.root
    for key in ("weights", "onnx", "provenance"):
        local.env.paths[key] = str(workdir / cfg.env.paths[key])
    featurize.run(local, spark)
    pca.run(local, spark)
    index.run(local, spark)
    return local


def by_image(cfg, uri: str, column: str) -> dict:
    frame = tables.arrow_dataset(uri, Storage.of(cfg)).to_table().to_pandas()
    return {"/".join(path.split("/")[-3:]): np.asarray(vector) for path, vector in zip(frame["path"], frame[column])}


def test_the_cluster_runs_the_emr_pipeline_and_equals_the_local_pipeline(on_cluster, local_run):
    cfg, workdir = on_cluster["cfg"], on_cluster["workdir"]
    keyed = locations.keyed(cfg)  # this run's own folders in S3 (what produced them)
    for key, column in (("features", "features"), ("pca_vectors", "pca")):
        assert keyed.env.paths[key].startswith(f"{cfg.env.paths[key]}/k-")
        remote, local = by_image(cfg, keyed.env.paths[key], column), by_image(local_run, local_run.env.paths[key], column)
        assert sorted(remote) == sorted(local) and len(remote) == 32  # each image once, none lost to the kills
        for image, vector in remote.items():
            np.testing.assert_allclose(vector, local[image], rtol=0, atol=1e-6)
    remote_projection = np.load(workdir / cfg.env.paths.pca_projection)
    local_projection = np.load(local_run.env.paths.pca_projection)
    np.testing.assert_allclose(remote_projection["components"], local_projection["components"], atol=1e-6)
    remote_index = json.loads((workdir / cfg.env.paths.index_metrics).read_text())
    assert remote_index["knn_accuracy"] == json.loads(Path(local_run.env.paths.index_metrics).read_text())["knn_accuracy"]
    report = (workdir / cfg.env.paths.report_md).read_text()
    assert f"Spark master | {on_cluster['master']}" in report  # the report says where it ran
    print("timings (s):", {k: round(v, 1) for k, v in on_cluster["timings"].items()})


def test_an_executor_killed_midway_is_replaced_and_its_tasks_retried(on_cluster):
    """From Spark's own logs: the driver lost the executor and its running task, the master removed it
    and launched another for the same application; the table is whole (the equality test above)."""
    import re

    driver = step_log(on_cluster["cfg"], "featurize")
    assert "Lost executor" in driver and "Lost task" in driver, driver[-3000:]
    master = (cluster_state.read(on_cluster["cfg"]).logs / "master.log").read_text()
    app = re.findall(r"Registered app \S+ with ID (app-\S+)", master)[0]  # the first application: featurize
    assert re.search(rf"Removing executor {app}/\d+ because it is (EXITED|FAILED|KILLED)", master), master[-3000:]
    assert len(set(re.findall(rf"Launching executor {app}/(\d+)", master))) >= 3, "a replacement executor"


def test_a_worker_lost_for_good_leaves_the_job_to_the_other(on_cluster):
    status = cluster.status(on_cluster["cfg"])
    assert [w["state"] for w in status["workers"]].count("ALIVE") == 1
    metrics = json.loads((on_cluster["workdir"] / on_cluster["cfg"].env.paths.pca_diagnostics).read_text())
    assert metrics["rows_projected"] == 32


def test_executors_run_as_an_unprivileged_user_that_cannot_see_the_checkout(on_cluster, tmp_path):
    record = cluster_state.read(on_cluster["cfg"])
    answer = Path(record.run_dir) / "probe.json"
    command = ["spark-submit", "--master", record.master, str(PROJECT_ROOT / "tests" / "helpers" / "cluster_probe.py"),
               str(PROJECT_ROOT / "README.md"), str(answer)]
    standalone.run_step(record, command, tmp_path / "probe.log")
    tasks = json.loads(answer.read_text())
    assert len(tasks) == 4
    for task in tasks:
        assert task["user"] == on_cluster["cfg"].cluster.standalone.user
        assert task["open"].startswith("FileNotFoundError"), task  # the checkout is an empty folder there
        assert task["folder"] == []
    assert (PROJECT_ROOT / "README.md").exists()  # while the driver's side sees it


def test_every_executor_fetched_the_broadcast_model_and_built_it_once_per_python_worker(on_cluster):
    """From Spark itself: each executor's own log shows it read the broadcast over the network; the
    stage's accumulator counts one model build per Python worker; no executor can open the model file
    (the driver keeps it in its private temporary folder, and the checkout is hidden)."""
    record = cluster_state.read(on_cluster["cfg"])
    app_logs = {}
    for stderr in Path(record.run_dir).glob("work-*/app-*/*/stderr"):
        text = stderr.read_text(errors="replace")
        if "fruits" in text or "TorrentBroadcast" in text:
            app_logs[stderr] = text
    featurize_app = sorted({p.parts[-3] for p in app_logs})[0]  # the first application: featurize
    executors = {p: t for p, t in app_logs.items() if p.parts[-3] == featurize_app}
    assert len(executors) >= 2, executors.keys()
    fetched = [p for p, t in executors.items() if "Started reading broadcast variable" in t]
    assert len(fetched) >= 2, "at least two executors fetched the broadcast"
    diagnostics = json.loads((on_cluster["workdir"] / on_cluster["cfg"].env.paths.featurize_diagnostics).read_text())
    builds = diagnostics["model_builds_per_worker"]
    assert builds and all(count == 1 for count in builds.values()), builds


def test_images_added_after_a_killed_driver_are_featurized_incrementally(on_cluster):
    """The driver (spark-submit and its Python) killed mid-featurize: nothing half-visible, and the next
    run computes only the new images, once."""
    cfg, workdir = on_cluster["cfg"], on_cluster["workdir"]
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=cfg.storage.endpoint_url)
    bucket, prefix = cfg.storage.uris.raw[len("s3://"):].split("/", 1)
    for n in range(4):
        s3.put_object(Bucket=bucket, Key=f"{prefix}/Training/Kiwi/added_{n}.jpg", Body=jpeg("Kiwi", 700 + n))
    params = workdir / "emr-params.yaml"
    OmegaConf.save(cfg, params)
    features = locations.keyed(cfg).env.paths.features  # images added: the same table grows
    before = tables.row_count(features, Storage.of(cfg))
    user = cfg.cluster.standalone.user
    kill_midway([sys.executable, "-m", "fruits.cloud.steps", "featurize", "--params", str(params)],
                lambda: python_worker_running(user))
    assert tables.row_count(features, Storage.of(cfg)) == before == 32  # the last commit, whole
    steps.submit(cfg, "featurize")
    run = json.loads((workdir / cfg.env.paths.featurize_metrics).read_text())["run"]
    assert (run["computed"], run["reused"]) == (4, 32), run
    assert locations.keyed(cfg).env.paths.features == features
    paths = by_image(cfg, features, "features")
    assert len(paths) == 36 and sum("added_" in p for p in paths) == 4
