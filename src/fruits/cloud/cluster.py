"""The EMR cluster lifecycle: plan, create (or reuse), status, down. boto3 under the hood, one module.

`make cluster` ensures the bucket, uploads the bootstrap script, the pins and the packaged code, then
creates the cluster (EU region, idle auto-termination always set, no SSH open to the world, at-rest
encryption, logs in the project bucket), waits with progress, and records its id in a git-ignored
state file. A running cluster of this project is reused.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import time
import zipfile
from datetime import datetime, timezone

from omegaconf import DictConfig

from fruits.cloud import standalone
from fruits.cloud import state as cluster_state
from fruits.cloud.bucket import ensure_bucket
from fruits.core import logs
from fruits.core.aws import client
from fruits.core.backbone import TF_ENVIRONMENT
from fruits.core.config import PROJECT_ROOT, load_config
from fruits.core.costs import cluster_hourly_price
from fruits.core.errors import ConfigError
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

ACTIVE_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]
READY_STATES = ("WAITING", "RUNNING")
MIN_IDLE_TIMEOUT_S, MAX_IDLE_TIMEOUT_S = 60, 7 * 24 * 3600  # EMR's own bounds


def artifact_uris(cfg: DictConfig) -> dict[str, str]:
    """Where `make cluster` puts what the nodes and the steps need (prefixes from storage.uris)."""
    uris = cfg.storage.uris
    return {
        "bootstrap": f"{uris.bootstrap}/install-deps.sh",
        "requirements": f"{uris.bootstrap}/runtime.txt",
        "constraints": f"{uris.bootstrap}/lock.txt",
        "code": f"{uris.code}/fruits.zip",
        "entry": f"{uris.code}/run_stage.py",
        "logs": uris.logs,
    }


def check_definition(cfg: DictConfig) -> None:
    """Refuse a cluster that would cost money idle, or sit outside the EU."""
    cluster = cfg.cluster
    timeout = cluster.get("idle_timeout_s")
    if timeout is None or not MIN_IDLE_TIMEOUT_S <= int(timeout) <= MAX_IDLE_TIMEOUT_S:
        raise ConfigError(
            f"cluster.idle_timeout_s={timeout}: an idle auto-termination between {MIN_IDLE_TIMEOUT_S} s and "
            f"{MAX_IDLE_TIMEOUT_S} s is required; the project never creates a cluster without one"
        )
    if not cfg.storage.bucket:
        raise ConfigError("storage.bucket is empty: the cluster needs the project bucket (use storage=s3)")
    local = ".".join(pyspark_version().split(".")[:2])
    if not str(cluster.spark_version).startswith(f"{local}."):
        raise ConfigError(f"cluster.spark_version={cluster.spark_version} ({cluster.release_label}) is not the Spark "
                          f"{local} of the local pyspark: the code is tested on {local}; pick an EMR release with it")


def pyspark_version() -> str:
    from importlib.metadata import version

    return version("pyspark")


def run_job_flow_request(cfg: DictConfig) -> dict:
    """The exact RunJobFlow request (`make cluster-plan` prints it)."""
    check_definition(cfg)
    cluster, uris = cfg.cluster, artifact_uris(cfg)
    python = f"/usr/bin/python{cluster.python_version}"
    core_group = {
        "Name": "core",
        "InstanceRole": "CORE",
        "InstanceType": cluster.core_instance_type,
        "InstanceCount": int(cluster.core_instance_count),
        "Market": "SPOT" if cluster.core_spot else "ON_DEMAND",
    }
    instances = {
        "InstanceGroups": [
            {"Name": "primary", "InstanceRole": "MASTER", "InstanceType": cluster.primary_instance_type,
             "InstanceCount": 1, "Market": "ON_DEMAND"},
            core_group,
        ],
        "KeepJobFlowAliveWhenNoSteps": True,  # steps come one stage at a time; idle timeout ends it
        "TerminationProtected": False,
    }
    if cluster.ec2_subnet_id:
        instances["Ec2SubnetId"] = cluster.ec2_subnet_id
    if cluster.ec2_key_name:  # SSH stays closed to the world: EMR-managed groups open nothing to 0.0.0.0/0
        instances["Ec2KeyName"] = cluster.ec2_key_name
    return {
        "Name": cluster.emr_name,
        "ReleaseLabel": cluster.release_label,
        "LogUri": uris["logs"],
        "Applications": [{"Name": "Spark"}],
        "Instances": instances,
        "BootstrapActions": [{
            "Name": "install pinned python dependencies",
            "ScriptBootstrapAction": {"Path": uris["bootstrap"],
                                      "Args": [uris["requirements"], uris["constraints"], python]},
        }],
        "Configurations": [
            {"Classification": "spark-env", "Configurations": [
                {"Classification": "export", "Properties": {"PYSPARK_PYTHON": python, **TF_ENVIRONMENT}}]},
            {"Classification": "spark-defaults", "Properties": {
                "spark.pyspark.python": python, "spark.python.worker.reuse": "true",
                **{f"spark.executorEnv.{name}": value for name, value in TF_ENVIRONMENT.items()}}},
        ],
        "ServiceRole": cluster.service_role,
        "JobFlowRole": cluster.instance_profile,
        "SecurityConfiguration": cluster.security_configuration,
        "AutoTerminationPolicy": {"IdleTimeout": int(cluster.idle_timeout_s)},
        "VisibleToAllUsers": True,
        "Tags": [{"Key": key, "Value": str(value)} for key, value in cluster.tags.items()],
    }


def security_configuration() -> dict:
    """At-rest encryption of what EMR writes to S3 (SSE-S3); in-transit left to the TLS of S3 itself."""
    return {"EncryptionConfiguration": {
        "EnableInTransitEncryption": False,
        "EnableAtRestEncryption": True,
        "AtRestEncryptionConfiguration": {"S3EncryptionConfiguration": {"EncryptionMode": "SSE-S3"}},
    }}


def package_code() -> bytes:
    """The fruits package as a zip for spark-submit --py-files: its modules and the files they read
    (the report's templates), no bytecode."""
    buffer = io.BytesIO()
    package = PROJECT_ROOT / "src" / "fruits"
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            archive.write(path, path.relative_to(PROJECT_ROOT / "src").as_posix())
    return buffer.getvalue()


def upload_artifacts(cfg: DictConfig, s3) -> dict[str, str]:
    uris = artifact_uris(cfg)
    files = {
        "bootstrap": (PROJECT_ROOT / "bootstrap" / "install-deps.sh").read_bytes(),
        "requirements": (PROJECT_ROOT / "requirements" / "runtime.txt").read_bytes(),
        "constraints": (PROJECT_ROOT / "requirements" / "lock.txt").read_bytes(),
        "code": package_code(),
        "entry": (PROJECT_ROOT / "bootstrap" / "run_stage.py").read_bytes(),
    }
    for name, body in files.items():
        bucket, key = uris[name][len("s3://"):].split("/", 1)
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    return uris


def find_active_cluster(emr, cfg: DictConfig) -> str | None:
    """A running cluster of this project (same name and project tag), if any."""
    for page in emr.get_paginator("list_clusters").paginate(ClusterStates=ACTIVE_STATES):
        for summary in page["Clusters"]:
            if summary["Name"] != cfg.cluster.emr_name:
                continue
            tags = {t["Key"]: t["Value"] for t in emr.describe_cluster(ClusterId=summary["Id"])["Cluster"].get("Tags", [])}
            if tags.get("project") == str(cfg.cluster.tags.project):
                return summary["Id"]
    return None


def ensure_security_configuration(emr, cfg: DictConfig) -> None:
    from botocore.exceptions import ClientError

    name = cfg.cluster.security_configuration
    try:
        emr.describe_security_configuration(Name=name)
    except ClientError:
        emr.create_security_configuration(Name=name, SecurityConfiguration=json.dumps(security_configuration()))


def wait_for(describe, label: str, wanted, failed, failure, poll_seconds: float, out=sys.stderr):
    """Poll describe() -> (thing, state) with a one-line progress display until state is in wanted;
    raise RuntimeError(failure(thing)) if it reaches a failed state instead. Shared by cluster and steps."""
    started = time.monotonic()
    while True:
        thing, state = describe()
        out.write(f"\r{label}: {state:<22} {time.monotonic() - started:6.0f} s")
        out.flush()
        if state in wanted or state in failed:
            out.write("\n")
            if state in failed:
                raise RuntimeError(failure(thing))
            return thing
        time.sleep(poll_seconds)


def wait_until(emr, cluster_id: str, wanted: tuple[str, ...], poll_seconds: float, out=sys.stderr) -> dict:
    """Wait for the cluster to reach a wanted state; raise with EMR's reason if it ends instead."""

    def describe():
        cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
        return cluster, cluster["Status"]["State"]

    def failure(cluster: dict) -> str:
        reason = cluster["Status"].get("StateChangeReason", {})
        return (f"cluster {cluster_id} ended {cluster['Status']['State']}: "
                f"{reason.get('Code', '')} {reason.get('Message', '')}")

    ended = tuple(s for s in ("TERMINATED", "TERMINATED_WITH_ERRORS") if s not in wanted)
    return wait_for(describe, cluster_id, wanted, ended, failure, poll_seconds, out)


def create(cfg: DictConfig) -> str:
    """Bucket, artifacts, cluster (or the running one), state file. Returns the cluster id (EMR) or the
    master's URL (standalone)."""
    check_definition(cfg)
    if cfg.cluster.kind == "standalone":
        running = standalone.start(cfg)
        saved = dict(os.environ)
        os.environ.update(running["s3"]["environment"])  # this call's own S3 requests: the bucket, the code
        try:
            ensure_bucket(cfg)
            upload_artifacts(cfg, client("s3", cfg))
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return running["master"]
    emr, s3 = client("emr", cfg, "cluster.region"), client("s3", cfg)
    ensure_bucket(cfg)
    upload_artifacts(cfg, s3)
    cluster_id = find_active_cluster(emr, cfg)
    if cluster_id:
        log.info("reusing the running cluster %s", cluster_id)
    else:
        ensure_security_configuration(emr, cfg)
        cluster_id = emr.run_job_flow(**run_job_flow_request(cfg))["JobFlowId"]
        log.info("created cluster %s in %s", cluster_id, cfg.cluster.region)
    wait_until(emr, cluster_id, READY_STATES, cfg.cluster.poll_seconds)
    cluster_state.write(cfg, {"kind": "emr", "cluster_id": cluster_id, "region": cfg.cluster.region})
    return cluster_id


def current_cluster_id(cfg: DictConfig) -> str | None:
    running = cluster_state.read(cfg)
    return running.get("cluster_id") if running else None


def running_kind(cfg: DictConfig) -> str:
    """The backend of the cluster that is up (its record says), else the config's cluster.kind."""
    running = cluster_state.read(cfg)
    return running.get("kind", "emr") if running else str(cfg.cluster.kind)


def status(cfg: DictConfig, now: datetime | None = None) -> dict:
    """State, age, nodes, idle time left before auto-termination, estimated cost so far."""
    if running_kind(cfg) == "standalone":
        return standalone.status(cfg)
    cluster_id = current_cluster_id(cfg)
    if cluster_id is None:
        return {"cluster_id": None, "state": "NONE", "message": "no cluster recorded: `make cluster` creates one"}
    emr = client("emr", cfg, "cluster.region")
    cluster = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
    now = now or datetime.now(timezone.utc)
    timeline = cluster["Status"].get("Timeline", {})
    created = timeline.get("CreationDateTime", now)
    ended = timeline.get("EndDateTime")
    hours = ((ended or now) - created).total_seconds() / 3600
    groups = emr.list_instance_groups(ClusterId=cluster_id)["InstanceGroups"]
    nodes = {g["InstanceGroupType"]: f"{g.get('RunningInstanceCount', 0)} x {g['InstanceType']}" for g in groups}
    steps = emr.list_steps(ClusterId=cluster_id).get("Steps", [])
    last_activity = max([s["Status"]["Timeline"].get("EndDateTime") or now for s in steps] or
                        [timeline.get("ReadyDateTime") or created])
    timeout = cfg.cluster.idle_timeout_s  # what create() set: the project never creates a cluster without it
    running_step = any(s["Status"]["State"] in ("PENDING", "RUNNING") for s in steps)
    idle_left = None if running_step or ended else max(0.0, timeout - (now - last_activity).total_seconds())
    return {
        "cluster_id": cluster_id,
        "state": cluster["Status"]["State"],
        "age_hours": round(hours, 2),
        "nodes": nodes,
        "idle_seconds_left": None if idle_left is None else int(idle_left),
        "cost_so_far_usd": round(hours * cluster_hourly_price(cfg.cluster), 2),
    }


def down(cfg: DictConfig) -> str:
    """Terminate and wait; safe to run twice."""
    if running_kind(cfg) == "standalone":
        return standalone.down(cfg)
    cluster_id = current_cluster_id(cfg)
    if cluster_id is None:
        return "no cluster recorded: nothing to terminate"
    emr = client("emr", cfg, "cluster.region")
    state = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"]
    if state not in ("TERMINATED", "TERMINATED_WITH_ERRORS"):
        emr.terminate_job_flows(JobFlowIds=[cluster_id])
        try:
            wait_until(emr, cluster_id, ("TERMINATED",), cfg.cluster.poll_seconds)
        except RuntimeError:
            pass  # TERMINATED_WITH_ERRORS is terminated too
    cluster_state.remove(cfg)
    return f"cluster {cluster_id} terminated"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="EMR cluster lifecycle")
    parser.add_argument("action", choices=["plan", "create", "status", "down"])
    parser.add_argument("--params", default="emr/params.yaml", help="composed config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. cluster.core_instance_count=4")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (AWS credentials stay masked)")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    cfg = load_config(args.overrides, args.params)
    if args.action == "plan":
        print(json.dumps(run_job_flow_request(cfg), indent=2))
    elif args.action == "create":
        print(create(cfg))
    elif args.action == "status":
        print(json.dumps(status(cfg), indent=2, default=str))
    else:
        print(down(cfg))


if __name__ == "__main__":
    run_command(main)
