"""The EMR backend: the exact RunJobFlow and AddJobFlowSteps requests, and the cluster's lifecycle through
boto3 (its own waiters for "ready", "step done" and "terminated")."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timezone

from omegaconf import DictConfig

from fruits.cloud import state as cluster_state
from fruits.cloud.artifacts import artifact_uris, spark_submit_command, upload_artifacts
from fruits.cloud.bucket import ensure_bucket
from fruits.cloud.state import EmrCluster
from fruits.core.aws import client
from fruits.core.backbone import TF_ENVIRONMENT
from fruits.core.costs import cluster_hourly_price
from fruits.core.errors import ConfigError

log = logging.getLogger(__name__)

ACTIVE_STATES = ["STARTING", "BOOTSTRAPPING", "RUNNING", "WAITING"]
MIN_IDLE_TIMEOUT_S, MAX_IDLE_TIMEOUT_S = 60, 7 * 24 * 3600  # EMR's own bounds


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


def step_request(cfg: DictConfig, stage: str, run_uri: str) -> dict:
    """The AddJobFlowSteps step: spark-submit through command-runner.jar."""
    return {
        "Name": f"fruits {stage}",
        "ActionOnFailure": "CONTINUE",  # a failed stage must not kill the cluster: fix and re-run
        "HadoopJarStep": {"Jar": "command-runner.jar", "Args": spark_submit_command(cfg, stage, run_uri)},
    }


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


def wait(emr, waiter: str, what: str, timeout_s: float, poll_seconds: float, failure, **request) -> None:
    """boto3's own waiter (cluster_running, step_complete, cluster_terminated), its delay and attempts from
    the config; a failure or a timeout raises with what EMR said (failure(last response))."""
    from botocore.exceptions import WaiterError

    delay = max(0, int(poll_seconds))
    attempts = max(1, math.ceil(float(timeout_s) / max(delay, 1)))
    log.info("waiting for %s (EMR, every %d s, up to %.0f min)", what, delay, float(timeout_s) / 60)
    try:
        emr.get_waiter(waiter).wait(**request, WaiterConfig={"Delay": delay, "MaxAttempts": attempts})
    except WaiterError as err:
        raise RuntimeError(failure(err.last_response or {}) if "Max attempts" not in str(err)
                           else f"{what}: not done after {float(timeout_s):.0f} s ({err})") from None


def cluster_failure(cluster_id: str):
    def failure(response: dict) -> str:
        status = response.get("Cluster", {}).get("Status", {})
        reason = status.get("StateChangeReason", {})
        return (f"cluster {cluster_id} ended {status.get('State', 'in an unknown state')}: "
                f"{reason.get('Code', '')} {reason.get('Message', '')}").strip()
    return failure


def step_failure(step_id: str):
    def failure(response: dict) -> str:
        step = response.get("Step", {})
        details = step.get("Status", {}).get("FailureDetails", {})
        return (f"EMR step {step.get('Name', '')} ({step_id}) {step.get('Status', {}).get('State', '')}: "
                f"{details.get('Reason', 'no reason given')} {details.get('Message', '')}; "
                f"log: {details.get('LogFile', 'see the cluster LogUri')}")
    return failure


@dataclass(frozen=True)
class EmrStep:
    cluster_id: str
    step_id: str


class EmrBackend:
    """Clusters of AWS EMR: one per project (reused while it runs), steps through command-runner.jar."""

    kind = "emr"

    def create(self, cfg: DictConfig) -> EmrCluster:
        emr, s3 = client("emr", cfg, "cluster.region"), client("s3", cfg)
        ensure_bucket(cfg, s3)
        upload_artifacts(cfg, s3)
        cluster_id = find_active_cluster(emr, cfg)
        if cluster_id:
            log.info("reusing the running cluster %s", cluster_id)
        else:
            ensure_security_configuration(emr, cfg)
            cluster_id = emr.run_job_flow(**run_job_flow_request(cfg))["JobFlowId"]
            log.info("created cluster %s in %s", cluster_id, cfg.cluster.region)
        wait(emr, "cluster_running", f"cluster {cluster_id} ready", cfg.cluster.ready_timeout_s,
             cfg.cluster.poll_seconds, cluster_failure(cluster_id), ClusterId=cluster_id)
        record = EmrCluster(cluster_id=cluster_id, region=str(cfg.cluster.region))
        cluster_state.write(cfg, record)
        return record

    def status(self, cfg: DictConfig, record: EmrCluster, now: datetime | None = None) -> dict:
        """State, age, nodes, idle time left before auto-termination, estimated cost so far."""
        emr = client("emr", cfg, "cluster.region")
        cluster = emr.describe_cluster(ClusterId=record.cluster_id)["Cluster"]
        now = now or datetime.now(timezone.utc)
        timeline = cluster["Status"].get("Timeline", {})
        created = timeline.get("CreationDateTime", now)
        ended = timeline.get("EndDateTime")
        hours = ((ended or now) - created).total_seconds() / 3600
        groups = emr.list_instance_groups(ClusterId=record.cluster_id)["InstanceGroups"]
        nodes = {g["InstanceGroupType"]: f"{g.get('RunningInstanceCount', 0)} x {g['InstanceType']}" for g in groups}
        steps = emr.list_steps(ClusterId=record.cluster_id).get("Steps", [])
        last_activity = max([s["Status"]["Timeline"].get("EndDateTime") or now for s in steps] or
                            [timeline.get("ReadyDateTime") or created])
        timeout = cfg.cluster.idle_timeout_s  # what create() set: the project never creates a cluster without it
        running_step = any(s["Status"]["State"] in ("PENDING", "RUNNING") for s in steps)
        idle_left = None if running_step or ended else max(0.0, timeout - (now - last_activity).total_seconds())
        return {
            "kind": self.kind,
            "cluster_id": record.cluster_id,
            "state": cluster["Status"]["State"],
            "age_hours": round(hours, 2),
            "nodes": nodes,
            "idle_seconds_left": None if idle_left is None else int(idle_left),
            "cost_so_far_usd": round(hours * cluster_hourly_price(cfg.cluster), 2),
        }

    def submit_step(self, cfg: DictConfig, record: EmrCluster, stage: str, run_uri: str, run_id: str) -> EmrStep:
        emr = client("emr", cfg, "cluster.region")
        step_id = emr.add_job_flow_steps(JobFlowId=record.cluster_id,
                                         Steps=[step_request(cfg, stage, run_uri)])["StepIds"][0]
        log.info("submitted %s as step %s on %s", stage, step_id, record.cluster_id)
        return EmrStep(record.cluster_id, step_id)

    def wait(self, cfg: DictConfig, record: EmrCluster, step: EmrStep) -> None:
        emr = client("emr", cfg, "cluster.region")
        wait(emr, "step_complete", f"step {step.step_id}", cfg.cluster.step_timeout_s, cfg.cluster.poll_seconds,
             step_failure(step.step_id), ClusterId=step.cluster_id, StepId=step.step_id)

    def destroy(self, cfg: DictConfig, record: EmrCluster) -> str:
        """Terminate and wait; safe to run twice."""
        emr = client("emr", cfg, "cluster.region")
        state = emr.describe_cluster(ClusterId=record.cluster_id)["Cluster"]["Status"]["State"]
        if state not in ("TERMINATED", "TERMINATED_WITH_ERRORS"):
            emr.terminate_job_flows(JobFlowIds=[record.cluster_id])
            try:
                wait(emr, "cluster_terminated", f"cluster {record.cluster_id} terminated", cfg.cluster.ready_timeout_s,
                     cfg.cluster.poll_seconds, cluster_failure(record.cluster_id), ClusterId=record.cluster_id)
            except RuntimeError:
                pass  # TERMINATED_WITH_ERRORS is terminated too
        cluster_state.remove(cfg)
        return f"cluster {record.cluster_id} terminated"
