"""The EMR runner: `python -m fruits.cloud.steps <stage> --params emr/params.yaml` runs a Spark stage as
an EMR step, or with the same spark-submit command on the standalone cluster when that is the one up
(fruits.cloud.standalone). The stages themselves do not know either exists.

The client writes the composed config and the stage's small local inputs (from the stage registry)
under a run folder in S3, adds a `spark-submit` step (command-runner.jar, the packaged code on
--py-files), waits with a progress line, and brings back the stage's small local outputs (metrics,
plots, reports, the PCA projection) for DVC. Images and features stay in S3. On failure it raises
with EMR's reason and the step's log location. On the node, `bootstrap/run_stage.py` calls
`run_on_cluster`, which runs the stage's own `run(cfg)`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fruits.cloud import locations, standalone
from fruits.cloud import state as cluster_state
from fruits.cloud.cluster import artifact_uris, current_cluster_id, wait_for
from fruits.core import logs, registry
from fruits.core.aws import client
from fruits.core.config import load_config
from fruits.core.errors import NoCluster
from fruits.core.ids import stamped_id
from fruits.core.storage import copy_file, filesystem
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

STEP_FAILED = ("CANCELLED", "FAILED", "INTERRUPTED")


def stage_files(cfg: DictConfig, name: str) -> tuple[list[str], list[str]]:
    """(small local files the stage reads, small local files it writes), from the stage registry."""
    stage = registry.stage(name)
    if not stage.on_cluster:
        raise ValueError(f"stage {name!r} does not run on the cluster (Spark stages do: "
                         f"{', '.join(s.name for s in registry.STAGES.values() if s.on_cluster)})")
    return registry.small_files(cfg, stage.inputs), registry.small_files(cfg, stage.written())


def spark_submit_command(cfg: DictConfig, stage: str, run_uri: str, master: str = "yarn") -> list[str]:
    """The step's command line, whichever cluster manager runs it (YARN on EMR, spark:// standalone)."""
    uris = artifact_uris(cfg)
    return ["spark-submit", "--master", master, "--deploy-mode", "client",
            "--py-files", uris["code"], uris["entry"], stage, run_uri]


def step_request(cfg: DictConfig, stage: str, run_uri: str) -> dict:
    """The AddJobFlowSteps step: spark-submit through command-runner.jar."""
    return {
        "Name": f"fruits {stage}",
        "ActionOnFailure": "CONTINUE",  # a failed stage must not kill the cluster: fix and re-run
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_command(cfg, stage, run_uri)},
    }


def in_run_folder(run_uri: str, part: str, relative: str) -> str:
    """Where a small file travels in the run folder: <run>/<inputs|outputs>/<its path, made relative>."""
    return f"{run_uri}/{part}/{os.path.normpath(relative).lstrip('/')}"


def prepare_run(cfg: DictConfig, stage: str, run_uri: str) -> None:
    fs, root = filesystem(run_uri, cfg)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/params.yaml", "w") as stream:
        stream.write(OmegaConf.to_yaml(cfg))
    inputs, _ = stage_files(cfg, stage)
    for relative in inputs:
        if os.path.exists(relative):
            copy_file(relative, in_run_folder(run_uri, "inputs", relative), cfg)


def fetch_outputs(cfg: DictConfig, stage: str, run_uri: str) -> None:
    _, outputs = stage_files(cfg, stage)
    for relative in outputs:
        copy_file(in_run_folder(run_uri, "outputs", relative), relative, cfg)


def run_on_cluster(stage: str, run_uri: str) -> None:
    """The cluster side (bootstrap/run_stage.py): fetch config and inputs, run the stage, send outputs back."""
    import fsspec

    # The config is not known yet: read it plainly (the client wrote it there through the guarded layer).
    with fsspec.open(f"{run_uri}/params.yaml", "rb") as stream, open("params.yaml", "wb") as out:
        out.write(stream.read())
    cfg = load_config([], "params.yaml")
    fs, _ = filesystem(run_uri, cfg)
    inputs, outputs = stage_files(cfg, stage)
    for relative in inputs:
        source = in_run_folder(run_uri, "inputs", relative)
        if fs.exists(filesystem(source, cfg)[1]):
            copy_file(source, relative, cfg)
    importlib.import_module(registry.stage(stage).module).run(cfg)
    for relative in outputs:
        copy_file(relative, in_run_folder(run_uri, "outputs", relative), cfg)


def wait_for_step(emr, cluster_id: str, step_id: str, poll_seconds: float, out=sys.stderr) -> dict:
    def describe():
        step = emr.describe_step(ClusterId=cluster_id, StepId=step_id)["Step"]
        return step, step["Status"]["State"]

    def failure(step: dict) -> str:
        details = step["Status"].get("FailureDetails", {})
        return (f"EMR step {step['Name']} ({step_id}) {step['Status']['State']}: "
                f"{details.get('Reason', 'no reason given')} {details.get('Message', '')}; "
                f"log: {details.get('LogFile', 'see the cluster LogUri')}")

    return wait_for(describe, f"step {step_id}", ("COMPLETED",), STEP_FAILED, failure, poll_seconds, out)


def submit(cfg: DictConfig, stage: str) -> None:
    """Run the stage on the cluster that `make cluster` recorded (EMR or standalone), then fetch its
    small outputs."""
    running = cluster_state.read(cfg)
    if running is None:
        raise NoCluster("no cluster is recorded: run `make cluster` first (or `make cluster CLUSTER=standalone` "
                        "for one on this machine)")
    cfg = locations.keyed(cfg)  # this experiment's own S3 tables
    run_id = f"{stage}-{stamped_id()}"
    run_uri = f"{cfg.storage.uris.runs}/{run_id}"
    prepare_run(cfg, stage, run_uri)
    if running.get("kind") == "standalone":
        log_file = Path(running["run_dir"]) / "logs" / f"step-{run_id}.log"
        log.info("running %s on %s (spark-submit in client mode; log %s)", stage, running["master"], log_file)
        standalone.run_step(running, spark_submit_command(cfg, stage, run_uri, running["master"]), log_file)
    else:
        submit_to_emr(cfg, stage, run_uri)
    fetch_outputs(cfg, stage, run_uri)


def submit_to_emr(cfg: DictConfig, stage: str, run_uri: str) -> None:
    cluster_id = current_cluster_id(cfg)
    emr = client("emr", cfg, "cluster.region")
    step_id = emr.add_job_flow_steps(JobFlowId=cluster_id, Steps=[step_request(cfg, stage, run_uri)])["StepIds"][0]
    log.info("submitted %s as step %s on %s", stage, step_id, cluster_id)
    wait_for_step(emr, cluster_id, step_id, cfg.cluster.poll_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a Spark stage as an EMR step on the project's cluster.")
    parser.add_argument("stage", choices=[s.name for s in registry.STAGES.values() if s.on_cluster])
    parser.add_argument("--params", default=registry.EMR_PARAMS, help="composed config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. pca.k=50")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (AWS credentials stay masked)")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    submit(load_config(args.overrides, args.params), args.stage)


if __name__ == "__main__":
    run_command(main)
