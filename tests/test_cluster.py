"""EMR: the exact requests (botocore Stubber: AWS's own parameter validation), the lifecycle against
moto's EMR on a local endpoint, the bootstrap script, the IAM policy, and the step entry point."""

import io
import json
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import boto3
import pyspark
import pytest
from botocore.stub import Stubber
from helpers.project import make_cfg

from fruits.cloud import artifacts, cluster, steps
from fruits.cloud import emr as emr_backend
from fruits.core.config import PROJECT_ROOT, compose
from fruits.core.errors import EU_REGIONS, ConfigError


def emr_cfg(tmp_path, *overrides, endpoint=None):
    """The EMR config; with an endpoint, a bucket of its own (composed, so the S3 layout follows it)."""
    local = [f"cluster.state_file={tmp_path / 'state.json'}", "cluster.poll_seconds=0"]
    if endpoint:
        local += [f"storage.endpoint_url={endpoint}", f"cluster.endpoint_url={endpoint}",
                  f"storage.bucket=fruits-emr-{tmp_path.name[-12:].lower().replace('_', '-')}"]
    return compose(["env=emr", "storage=s3", *local, *overrides])


def test_run_job_flow_request_passes_aws_validation_and_has_the_guards(tmp_path):
    cfg = emr_cfg(tmp_path)
    request = emr_backend.run_job_flow_request(cfg)
    emr = boto3.client("emr", region_name=cfg.cluster.region, aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(emr) as stub:
        stub.add_response("run_job_flow", {"JobFlowId": "j-TEST"}, request)
        assert emr.run_job_flow(**request)["JobFlowId"] == "j-TEST"  # botocore validated every field
    assert emr.meta.region_name == "eu-west-3"
    assert request["AutoTerminationPolicy"]["IdleTimeout"] == 3600 >= 60
    uris = artifacts.artifact_uris(cfg)
    assert request["BootstrapActions"][0]["ScriptBootstrapAction"]["Path"] == uris["bootstrap"]
    assert request["LogUri"].startswith(f"s3://{cfg.storage.bucket}/")
    assert request["SecurityConfiguration"] == cfg.cluster.security_configuration
    assert "Ec2KeyName" not in request["Instances"]  # no SSH key: nothing to open to the world
    assert {t["Key"] for t in request["Tags"]} == {"project", "owner", "cost-centre"}
    # Release label consistent with the local pyspark: EMR 7.x ships Spark 3.5 and Python 3.11.
    assert request["ReleaseLabel"].startswith("emr-7.")
    assert cfg.cluster.spark_version.split(".")[:2] == pyspark.__version__.split(".")[:2]
    spark_env = request["Configurations"][0]["Configurations"][0]["Properties"]
    assert spark_env["PYSPARK_PYTHON"] == "/usr/bin/python3.11"
    encryption = emr_backend.security_configuration()["EncryptionConfiguration"]
    assert encryption["EnableAtRestEncryption"] is True


def test_step_request_passes_aws_validation(tmp_path):
    cfg = emr_cfg(tmp_path)
    step = emr_backend.step_request(cfg, "featurize", "s3://b/run")
    emr = boto3.client("emr", region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(emr) as stub:
        stub.add_response("add_job_flow_steps", {"StepIds": ["s-1"]}, {"JobFlowId": "j-1", "Steps": [step]})
        emr.add_job_flow_steps(JobFlowId="j-1", Steps=[step])
    args = step["HadoopJarStep"]["Args"]
    assert step["HadoopJarStep"]["Jar"] == "command-runner.jar" and args[0] == "spark-submit"
    assert args[args.index("--py-files") + 1] == artifacts.artifact_uris(cfg)["code"]
    assert args[-2:] == ["featurize", "s3://b/run"]


@pytest.mark.parametrize("timeout", [None, 30, 8 * 24 * 3600])
def test_a_cluster_without_a_sane_idle_timeout_is_refused(tmp_path, timeout):
    cfg = emr_cfg(tmp_path)
    cfg.cluster.idle_timeout_s = timeout
    with pytest.raises(ConfigError, match="idle auto-termination"):
        emr_backend.run_job_flow_request(cfg)


def test_a_release_whose_spark_minor_is_not_the_local_pyspark_s_is_refused(tmp_path):
    cfg = emr_cfg(tmp_path)
    cfg.cluster.release_label, cfg.cluster.spark_version = "emr-6.15.0", "3.4.1"
    with pytest.raises(ConfigError, match=r"cluster.spark_version=3.4.1 \(emr-6.15.0\) is not the Spark 3.5"):
        emr_backend.run_job_flow_request(cfg)


def test_a_cluster_outside_the_eu_is_refused(tmp_path):
    cfg = emr_cfg(tmp_path)
    cfg.cluster.region = "us-east-1"
    with pytest.raises(ConfigError, match="cluster.region=us-east-1 is outside the EU"):
        cluster.create(cfg)


def test_a_cluster_of_another_kind_recorded_is_never_forgotten(tmp_path):
    """`make cluster CLUSTER=standalone` while an EMR cluster is recorded (or the other way round) is refused
    before anything starts: the record, the only way to stop that cluster, stays."""
    from fruits.cloud import state as cluster_state

    cfg = emr_cfg(tmp_path, "cluster=standalone")
    cluster_state.write(cfg, cluster_state.EmrCluster(cluster_id="j-RUNNING", region="eu-west-3"))
    with pytest.raises(ConfigError, match=r"cluster.kind=standalone: a cluster of kind emr is recorded in .*j-RUNNING.*make cluster-down"):
        cluster.create(cfg)
    assert cluster_state.read(cfg) == cluster_state.EmrCluster(cluster_id="j-RUNNING", region="eu-west-3")


def test_step_failure_reports_reason_and_log():
    emr = boto3.client("emr", region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(emr) as stub:
        running = {"Step": {"Name": "fruits pca", "Status": {"State": "RUNNING"}}}
        failed = {"Step": {"Name": "fruits pca", "Status": {"State": "FAILED", "FailureDetails": {
            "Reason": "Python exception", "Message": "pca.k=9999 exceeds", "LogFile": "s3://b/logs/j-1/steps/s-1/"}}}}
        stub.add_response("describe_step", running, {"ClusterId": "j-1", "StepId": "s-1"})
        stub.add_response("describe_step", failed, {"ClusterId": "j-1", "StepId": "s-1"})
        with pytest.raises(RuntimeError, match=r"FAILED: Python exception pca.k=9999 exceeds; log: s3://b/logs/j-1"):
            emr_backend.wait(emr, "step_complete", "step s-1", 60, 0, emr_backend.step_failure("s-1"),
                             ClusterId="j-1", StepId="s-1")  # boto3's own waiter, through the stub


def test_a_step_still_running_at_its_timeout_is_an_error_that_says_so():
    emr = boto3.client("emr", region_name="eu-west-3", aws_access_key_id="x", aws_secret_access_key="x")
    with Stubber(emr) as stub:
        stub.add_response("describe_step", {"Step": {"Name": "fruits pca", "Status": {"State": "RUNNING"}}},
                          {"ClusterId": "j-1", "StepId": "s-1"})
        with pytest.raises(RuntimeError, match=r"step s-1: not done after 1 s"):
            emr_backend.wait(emr, "step_complete", "step s-1", 1, 0, emr_backend.step_failure("s-1"),
                             ClusterId="j-1", StepId="s-1")


def test_lifecycle_create_reuse_status_steps_down(tmp_path, s3_endpoint):
    cfg = emr_cfg(tmp_path, endpoint=s3_endpoint)
    cluster_id = cluster.create(cfg)
    assert json.loads(Path(cfg.cluster.state_file).read_text())["cluster_id"] == cluster_id
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=s3_endpoint)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=cfg.storage.bucket)["Contents"]}
    for uri in ("bootstrap", "requirements", "constraints", "code", "entry"):
        assert artifacts.artifact_uris(cfg)[uri].split("/", 3)[3] in keys
    assert cluster.create(cfg) == cluster_id  # a running cluster of the project is reused

    emr = boto3.client("emr", region_name="eu-west-3", endpoint_url=s3_endpoint)
    described = emr.describe_cluster(ClusterId=cluster_id)["Cluster"]
    assert described["ReleaseLabel"] == cfg.cluster.release_label
    assert {t["Key"]: t["Value"] for t in described["Tags"]}["project"] == "fruits"
    step_ids = emr.add_job_flow_steps(JobFlowId=cluster_id, Steps=[emr_backend.step_request(cfg, "pca", "s3://b/r")])["StepIds"]
    assert [s["Id"] for s in emr.list_steps(ClusterId=cluster_id)["Steps"]] == step_ids

    state = cluster.status(cfg)
    assert state["cluster_id"] == cluster_id and state["state"] in ("WAITING", "RUNNING")
    assert set(state["nodes"]) == {"MASTER", "CORE"} and state["cost_so_far_usd"] >= 0

    assert cluster.down(cfg) == f"cluster {cluster_id} terminated"
    assert emr.describe_cluster(ClusterId=cluster_id)["Cluster"]["Status"]["State"].startswith("TERMINAT")
    assert cluster.down(cfg) == "no cluster recorded: nothing to stop"
    assert cluster.status(cfg)["state"] == "NONE"


def test_plan_prints_the_request_without_calling_aws(capsys, monkeypatch):
    def no_aws(*args, **kwargs):
        raise AssertionError("plan must not call AWS")

    monkeypatch.setattr(emr_backend, "client", no_aws)
    monkeypatch.setattr(boto3, "client", no_aws)
    cluster.main(["plan"])
    request = json.loads(capsys.readouterr().out)
    assert request["AutoTerminationPolicy"]["IdleTimeout"] == 3600 and request["Name"] == "fruits-emr"


def test_packaged_code_holds_the_package():
    names = zipfile.ZipFile(io.BytesIO(artifacts.package_code())).namelist()
    assert {"fruits/stages/featurize.py", "fruits/cloud/steps.py", "fruits/core/config.py"} <= set(names)
    assert {"fruits/core/templates/report.html.j2", "fruits/core/templates/report.md.j2"} <= set(names)  # read by the report step
    assert not [n for n in names if not n.startswith("fruits/") or n.endswith(".pyc")]


def test_bootstrap_script_is_shellcheck_clean():
    assert shutil.which("shellcheck"), "shellcheck missing: `make check-system` installs it"
    done = subprocess.run(["shellcheck", str(PROJECT_ROOT / "bootstrap" / "install-deps.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def fake_node(tmp_path, aws_fails: bool = False) -> tuple[dict, Path]:
    """PATH with stand-ins for what an EMR node has (aws, sudo, dnf) and a python that records its calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    scripts = {
        "aws": "exit 1" if aws_fails else 'cp "${4#s3://node}" "$5"',  # aws s3 cp --only-show-errors <src> <dst>
        "sudo": 'exec "$@"',
        "dnf": f'echo "dnf $*" >> {calls}',
        "python": f'echo "python $*" >> {calls}; cat > /dev/null',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "FRUITS_STAMP_DIR": str(tmp_path)}
    return env, calls


def test_bootstrap_installs_the_pins_once_and_stops_on_failure(tmp_path):
    script = PROJECT_ROOT / "bootstrap" / "install-deps.sh"
    runtime, lock = PROJECT_ROOT / "requirements" / "runtime.txt", PROJECT_ROOT / "requirements" / "lock.txt"
    env, calls = fake_node(tmp_path)
    args = ["bash", str(script), f"s3://node{runtime}", f"s3://node{lock}", str(tmp_path / "bin" / "python")]
    first = subprocess.run(args, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout + first.stderr
    pip = [line for line in calls.read_text().splitlines() if "pip install" in line]
    assert len(pip) == 1 and " -r " in pip[0] and " -c " in pip[0]  # the repo's pins as constraints
    assert any("lapack" in line for line in calls.read_text().splitlines())  # native LAPACK for Spark ML
    second = subprocess.run(args, env=env, capture_output=True, text=True)
    assert second.returncode == 0 and "nothing to do" in second.stdout
    assert len([line for line in calls.read_text().splitlines() if "pip install" in line]) == 1

    failing = tmp_path / "failing"
    failing.mkdir()
    env, calls = fake_node(failing, aws_fails=True)
    done = subprocess.run(["bash", str(script), f"s3://node{runtime}", f"s3://node{lock}", str(failing / "bin" / "python")],
                          env=env, capture_output=True, text=True)
    assert done.returncode != 0 and not calls.exists()  # stopped at the failed download: nothing installed
    assert not list(failing.glob("fruits-deps-*"))


# Actions that AWS does not let a policy scope to a resource (the service authorization reference).
NO_RESOURCE_SCOPE = {"ec2:DescribeInstances"}


def as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def test_instance_role_policy_is_least_privilege():
    from moto.iam.access_control import IAMPolicy, PermissionResult

    storage = compose(["storage=s3"]).storage
    text = (PROJECT_ROOT / "bootstrap" / "iam" / "instance-role-policy.json").read_text()
    policy = json.loads(text)
    bucket_arn, objects_arn = f"arn:aws:s3:::{storage.bucket}", f"arn:aws:s3:::{storage.bucket}/{storage.prefix}/*"
    for statement in policy["Statement"]:
        actions, resources = as_list(statement["Action"]), as_list(statement["Resource"])
        assert statement["Effect"] == "Allow" and "NotAction" not in statement and "NotResource" not in statement
        assert not any("*" in action for action in actions), statement  # no "*", no "s3:*", no "s3:Get*"
        if "*" in resources:
            assert set(actions) <= NO_RESOURCE_SCOPE, f"{statement['Sid']}: Resource * where a scope exists"
        for action, resource in ((a, r) for a in actions for r in resources):
            if action.startswith("s3:"):
                assert resource in (bucket_arn, objects_arn), (action, resource)
            if action.startswith("elasticmapreduce:"):
                region = resource.split(":")[3]
                assert resource.endswith(":cluster/*") and region in EU_REGIONS, resource
        if "s3:ListBucket" in actions:  # listing limited to the project prefix
            prefixes = as_list(statement["Condition"]["StringLike"]["s3:prefix"])
            assert all(p == storage.prefix or p.startswith(f"{storage.prefix}/") for p in prefixes), prefixes

    def permitted(action, resource):
        return IAMPolicy(text).is_action_permitted(action, resource) == PermissionResult.PERMITTED

    assert permitted("s3:GetObject", f"{bucket_arn}/{storage.prefix}/raw/Training/Kiwi/1.jpg")
    assert permitted("s3:PutObject", f"{bucket_arn}/{storage.prefix}/sample/features/_commit.json")
    assert not permitted("s3:GetObject", f"{bucket_arn}/other-project/secret.csv")
    assert not permitted("s3:GetObject", f"arn:aws:s3:::another-bucket/{storage.prefix}/raw/1.jpg")
    for action in ("s3:DeleteBucket", "s3:PutBucketPolicy", "s3:PutBucketAcl", "iam:PassRole", "ec2:TerminateInstances"):
        assert not permitted(action, bucket_arn) and not permitted(action, "*"), action


def test_local_state_and_secrets_are_git_ignored():
    """What holds credentials, cluster ids or machine-local settings never reaches a commit."""
    local_state = [".cluster-state.json", ".dvc/config.local", ".dvc/tmp/lock", ".dvc/cache/files/md5/aa", ".env",
                   ".venv/bin/python", ".cache/s3a-jars/x.jar", "deploy-key.pem", ".aws/credentials", "data/features/x",
                   "models/mobilenetv2.weights.h5"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *local_state], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(local_state), set(local_state) - set(done.stdout.split())
    tracked = subprocess.run(["git", "ls-files", "-ci", "--exclude-standard"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, check=True).stdout.split()
    assert tracked == [], f"tracked files that the ignore rules cover: {tracked}"


def test_a_run_folder_in_s3_round_trips_config_inputs_and_outputs(spark, tmp_path, s3_endpoint, monkeypatch):
    """Client side prepare_run -> cluster side run_on_cluster (reads everything from S3) -> fetch_outputs."""
    from helpers.data import synthetic_features, write_features

    from fruits.cloud import bucket

    cfg = make_cfg(tmp_path / "work", "storage=s3", f"storage.endpoint_url={s3_endpoint}", "pca.k=2",
                   f"storage.bucket=fruits-run-{tmp_path.name[-10:].lower().replace('_', '-')}")
    bucket.ensure_bucket(cfg)
    write_features(spark, cfg, synthetic_features(20, 12, 1.0), train_rows=15)
    run_uri = f"s3://{cfg.storage.bucket}/fruits/emr/params/pca-test"
    steps.prepare_run(cfg, "pca", run_uri)

    cluster_side = tmp_path / "node"
    cluster_side.mkdir()
    monkeypatch.chdir(cluster_side)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)  # the node reads the run folder before it has a config
    steps.run_on_cluster("pca", run_uri)

    written = Path(cfg.env.paths.pca_metrics)  # test paths are absolute: drop the node's copy
    written.unlink()
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=s3_endpoint)
    outputs = {o["Key"] for o in s3.list_objects_v2(Bucket=cfg.storage.bucket, Prefix="fruits/emr/params/pca-test/outputs/")["Contents"]}
    assert any(key.endswith("/pca.json") for key in outputs) and any(key.endswith("/pca_variance.csv") for key in outputs)
    steps.fetch_outputs(cfg, "pca", run_uri)
    fetched = json.loads(Path(cfg.env.paths.pca_metrics).read_text())
    assert fetched["k"] == 2 and fetched["rows_fitted"] == 15


def test_the_nodes_environments_of_other_pins_are_removed_only_when_unused(tmp_path):
    from fruits.cloud.nodes import UNUSED_ENV_DAYS, prune_node_envs

    current, shared, forgotten, stray = (tmp_path / name for name in ("current", "shared", "forgotten", "stray"))
    for env in (current, shared, forgotten):
        (env / "venv").mkdir(parents=True)
        (env / "last-used").touch()
    stray.mkdir()  # not an environment: never touched
    old = time.time() - (UNUSED_ENV_DAYS + 1) * 86400
    os.utime(forgotten / "last-used", (old, old))
    os.utime(current / "last-used", (old, old))  # the one in use is kept whatever its stamp says

    assert prune_node_envs(tmp_path, keep=current) == [forgotten]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "shared", "stray"]
