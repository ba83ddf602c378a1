"""Run a Spark stage as an EMR step: with env=emr, `python -m fruits.<stage>` submits itself.

The client writes the composed config and the stage's small inputs under a run folder in S3, adds a
`spark-submit` step (command-runner.jar, the packaged code on --py-files), waits with progress, and
brings back only the small outputs (metrics, plots, reports) for DVC. Images and features stay in S3.
On failure it raises with EMR's reason and the step's log location.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

ON_CLUSTER = "FRUITS_ON_CLUSTER"


def stage_files(cfg: DictConfig, stage: str) -> tuple[list[str], list[str]]:
    """(small local inputs the stage reads, small local outputs it writes), as relative paths."""
    paths = cfg.env.paths
    metrics = {name: f"{paths.metrics}/{name}" for name in ("featurize.json", "pca.json", "pca_variance.csv")}
    if stage == "featurize":
        return [paths.weights, paths.provenance], [metrics["featurize.json"]]
    if stage == "pca":
        return [], [metrics["pca.json"], metrics["pca_variance.csv"]]
    if stage == "report":
        reports = [f"{paths.reports}/{name}" for name in ("report.html", "report.md", "pca_variance.png", "pca_scatter.png")]
        return [paths.provenance, *metrics.values()], reports
    raise ValueError(f"stage {stage!r} does not run on the cluster (only featurize, pca, report do)")


def step_request(cfg: DictConfig, stage: str, run_uri: str) -> dict:
    """The AddJobFlowSteps step: spark-submit through command-runner.jar."""
    from fruits.cluster import artifact_uris

    uris = artifact_uris(cfg)
    return {
        "Name": f"fruits {stage}",
        "ActionOnFailure": "CONTINUE",  # a failed stage must not kill the cluster: fix and re-run
        "HadoopJarStep": {
            "Jar": "command-runner.jar",
            "Args": ["spark-submit", "--master", "yarn", "--deploy-mode", "client",
                     "--py-files", uris["code"], uris["entry"], stage, run_uri],
        },
    }


def prepare_run(cfg: DictConfig, stage: str, run_uri: str) -> None:
    from fruits.storage import copy_file, filesystem

    fs, root = filesystem(run_uri, cfg)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/params.yaml", "w") as stream:
        stream.write(OmegaConf.to_yaml(cfg))
    inputs, _ = stage_files(cfg, stage)
    for relative in inputs:
        if os.path.exists(relative):
            copy_file(relative, f"{run_uri}/inputs/{relative}", cfg)


def fetch_outputs(cfg: DictConfig, stage: str, run_uri: str) -> None:
    from fruits.storage import copy_file

    _, outputs = stage_files(cfg, stage)
    for relative in outputs:
        copy_file(f"{run_uri}/outputs/{relative}", relative, cfg)


def run_on_cluster(stage: str, run_uri: str) -> None:
    """The cluster side (bootstrap/run_stage.py): fetch config and inputs, run, send outputs back."""
    import fsspec

    from fruits.config import load_config
    from fruits.storage import copy_file, filesystem

    # The config is not known yet: read it plainly (the client wrote it there through the guarded layer).
    with fsspec.open(f"{run_uri}/params.yaml", "rb") as stream, open("params.yaml", "wb") as out:
        out.write(stream.read())
    cfg = load_config([], "params.yaml")
    fs, root = filesystem(run_uri, cfg)
    inputs, outputs = stage_files(cfg, stage)
    for relative in inputs:
        if fs.exists(f"{root}/inputs/{relative}"):
            copy_file(f"{run_uri}/inputs/{relative}", relative, cfg)
    importlib.import_module(f"fruits.{stage}").run(cfg)
    for relative in outputs:
        copy_file(relative, f"{run_uri}/outputs/{relative}", cfg)


def wait_for_step(emr, cluster_id: str, step_id: str, poll_seconds: float, out=sys.stderr) -> None:
    started = time.monotonic()
    while True:
        step = emr.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
        state = step["Status"]["State"]
        out.write(f"\r{step['Name']}: {state:<12} {time.monotonic() - started:6.0f} s")
        out.flush()
        if state == "COMPLETED":
            out.write("\n")
            return
        if state in ("CANCELLED", "FAILED", "INTERRUPTED"):
            out.write("\n")
            failure = step["Status"].get("FailureDetails", {})
            raise RuntimeError(
                f"EMR step {step['Name']} ({step_id}) {state}: {failure.get('Reason', 'no reason given')} "
                f"{failure.get('Message', '')}; log: {failure.get('LogFile', 'see the cluster LogUri')}"
            )
        time.sleep(poll_seconds)


def submit(cfg: DictConfig, stage: str) -> None:
    from fruits.aws import client
    from fruits.cluster import artifact_uris, current_cluster_id

    cluster_id = current_cluster_id(cfg)
    if cluster_id is None:
        raise RuntimeError("env=emr but no cluster is recorded: run `make cluster` first")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_uri = f"{artifact_uris(cfg)['params']}/{stage}-{stamp}"
    prepare_run(cfg, stage, run_uri)
    emr = client("emr", cfg, "cluster.region")
    step_id = emr.add_job_flow_steps(JobFlowId=cluster_id, Steps=[step_request(cfg, stage, run_uri)])["StepIds"][0]
    log.info("submitted %s as step %s on %s", stage, step_id, cluster_id)
    wait_for_step(emr, cluster_id, step_id, cfg.cluster.poll_seconds)
    fetch_outputs(cfg, stage, run_uri)


def dispatch(stage: str, cfg: DictConfig, run: Callable[[DictConfig], object]) -> None:
    """Run here, or, with env=emr and not already on the cluster, as an EMR step."""
    if cfg.env.name == "emr" and not os.environ.get(ON_CLUSTER):
        submit(cfg, stage)
    else:
        run(cfg)
