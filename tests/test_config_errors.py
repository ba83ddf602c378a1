"""Every wrong setting is refused before any work: the error names the setting and says what to do, and
no Spark session is started (get_session is replaced by a trap in every module that could call it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fruits.core.config import load_config
from fruits.core.errors import ConfigError
from fruits.core.tables import NoTable
from fruits.stages import featurize, index, ingest, pca, report

from helpers.project import make_cfg

STAGES = {"featurize": featurize, "pca": pca, "index": index, "report": report, "ingest": ingest}


@pytest.fixture(autouse=True)
def spark_trap(monkeypatch):
    def started(*_args, **_kwargs):
        raise AssertionError("a Spark session was started before the error")

    import fruits.core.spark

    monkeypatch.setattr(fruits.core.spark, "get_session", started)
    for module in STAGES.values():
        if hasattr(module, "get_session"):
            monkeypatch.setattr(module, "get_session", started)


# Settings refused by load_config, as `python -m fruits.stages.<stage> key=value` would pass them.
SETTINGS = [
    ("unknown key", ["pca.kk=3"], r"Could not override 'pca.kk'. To append to your config use \+pca.kk=3"),
    ("wrong type", ["pca.k=fifty"], r"pca.k='fifty' must be a number"),
    ("wrong type, list", ["data.extensions=jpg"], r"data.extensions='jpg' must be a list"),
    ("not a whole number", ["pca.k=2.5"], r"pca.k=2.5 must be a whole number"),
    ("k below 1", ["pca.k=0"], r"pca.k=0 must be a positive integer"),
    ("variance above 1", ["pca.variance=1.5"], r"pca.variance=1.5 must be a share in \(0, 1\]"),
    ("variance 0", ["pca.variance=0"], r"pca.variance=0 must be a share in \(0, 1\]"),
    ("storage region", ["storage=s3", "storage.region=us-east-1"], r"storage.region=us-east-1 is outside the EU"),
    ("cluster region", ["cluster.region=ap-south-1"], r"cluster.region=ap-south-1 is outside the EU"),
    ("unknown layout", ["data.layout=zip"], r"data.layout=zip is not one of files, parquet"),
    ("input size", ["model.input_size=48"], r"model.input_size=48 is not supported: use a size from 64 to 224 px"),
    ("empty bucket name", ["storage=s3", "storage.bucket=''"], r"storage.bucket is empty"),
    ("no accuracy query", ["identify.accuracy_queries=0"], r"identify.accuracy_queries=0 must be at least 1"),
    ("abstain rate of 1", ["identify.abstain_known_rate=1.0"], r"identify.abstain_known_rate=1.0 must be a share in \[0, 1\)"),
    ("a negative rate on the curve", ["identify.abstain_rates=[0.1,-0.2]"], r"identify.abstain_rates\[1\]=-0.2 must be a share"),
    ("hard protocol arc of 0", ["identify.hard_protocol.training_arc=0"], r"identify.hard_protocol.training_arc=0 must be a share of the fruit's turn"),
    ("no index poll", ["identify.index_poll_seconds=0"], r"identify.index_poll_seconds=0 must be a positive number"),
    ("no model thread", ["featurize.threads=0"], r"featurize.threads=0 must be a number of threads \(1 or more\), or null"),
    ("threads in words", ["featurize.threads=two"], r"featurize.threads=two must be a number of threads"),
]


@pytest.mark.parametrize(("overrides", "message"), [case[1:] for case in SETTINGS], ids=[case[0] for case in SETTINGS])
def test_a_wrong_setting_is_named_before_any_work(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


@pytest.mark.parametrize("stage, overrides, message", [
    ("pca", ["pca.k=1281"], r"pca.k=1281 is larger than the feature dimension 1280"),
    ("featurize", ["model.engine=pytorch"], r"model.engine=pytorch is not one of tensorflow, onnxruntime"),
], ids=["k above the dimension: pca", "unknown engine: featurize"])
def test_a_setting_its_owner_checks_is_named_by_the_stage_before_any_work(tiny_cfg, stage, overrides, message):
    """config knows no model: the pca stage checks k against the backbone's dimension, the engines their
    names; each before Spark starts (spark_trap)."""
    cfg = load_config(overrides)  # accepted by config: not its to judge
    for key in ("data", "env"):
        cfg[key] = tiny_cfg[key]
    with pytest.raises(ConfigError, match=message):
        STAGES[stage].run(cfg)


def test_a_dvc_remote_outside_the_eu_is_refused(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text('[core]\n    remote = storage\n[\'remote "storage"\']\n'
                                              "    url = s3://fruits-p8-data/fruits/dvc\n    region = eu-west-3\n")
    (tmp_path / ".dvc" / "config.local").write_text("['remote \"storage\"']\n    region = us-east-1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"DVC remote 'storage' region \(in .*config.local\)=us-east-1 is outside the EU"):
        load_config([])


def no_images(cfg, tmp_path):
    cfg.data.root = cfg.env.paths.images = str(tmp_path / "nowhere")


def empty_images(cfg, tmp_path):
    (tmp_path / "empty" / "Training" / "Kiwi").mkdir(parents=True)
    (tmp_path / "empty" / "Training" / "Kiwi" / "notes.txt").write_text("not an image")
    cfg.data.root = cfg.env.paths.images = str(tmp_path / "empty")


def no_weights(cfg, tmp_path):
    cfg.env.paths.weights = str(tmp_path / "missing.weights.h5")


def truncated_weights(cfg, tmp_path):
    cut = tmp_path / "cut.weights.h5"
    cut.write_bytes(Path(cfg.env.paths.weights).read_bytes()[:4096])
    cfg.env.paths.weights = str(cut)


def replaced_weights(cfg, tmp_path):
    """A valid HDF5 file with other bytes than the provenance recorded."""
    import h5py

    copy = tmp_path / "models"
    shutil.copytree(Path(cfg.env.paths.provenance).parent, copy)
    weights = copy / Path(cfg.env.paths.weights).name
    with h5py.File(weights, "w") as handle:
        handle["x"] = [1.0]
    provenance = copy / "provenance.json"
    record = json.loads(provenance.read_text())
    record["file"] = str(weights)
    provenance.write_text(json.dumps(record))
    cfg.env.paths.weights, cfg.env.paths.provenance = str(weights), str(provenance)


def no_onnx(cfg, tmp_path):
    cfg.model.engine = "onnxruntime"
    cfg.env.paths.onnx = str(tmp_path / "missing.onnx")


def no_shards(cfg, tmp_path):
    cfg.data.layout = "parquet"


def nothing(cfg, tmp_path):
    pass


INPUTS = [
    ("missing input folder", no_images, "featurize", ConfigError, r"env.paths.images=.*nowhere \(from data.root\) is missing or holds no"),
    ("input folder without images", empty_images, "featurize", ConfigError, r"env.paths.images=.*empty .*holds no jpg/jpeg/png image"),
    ("missing weights", no_weights, "featurize", FileNotFoundError, r"env.paths.weights=.*missing.weights.h5 not found: run the weights stage"),
    ("corrupt weights", truncated_weights, "featurize", ConfigError, r"env.paths.weights=.*cut.weights.h5 is not a readable HDF5 weights file"),
    ("replaced weights", replaced_weights, "featurize", ConfigError, r"does not have the sha256 that .*provenance.json recorded"),
    ("missing ONNX export", no_onnx, "featurize", FileNotFoundError, r"missing.onnx is missing or not the export of"),
    ("missing shards", no_shards, "featurize", ConfigError, r"env.paths.shard_index=.* not found: data.layout=parquet needs ingest"),
    ("no features for pca", nothing, "pca", NoTable, r"env.paths.features=.* has no committed table: run the featurize stage"),
    ("no vectors for index", nothing, "index", NoTable, r"env.paths.pca_vectors=.* has no committed table: run the pca stage"),
    ("no features for report", nothing, "report", NoTable, r"env.paths.features=.* has no committed table"),
    ("ingest without images", no_images, "ingest", ConfigError, r"data.root=.*nowhere is missing or holds no jpg/jpeg/png image"),
]


@pytest.mark.parametrize(("setup", "stage", "error", "message"), [case[1:] for case in INPUTS], ids=[case[0] for case in INPUTS])
def test_a_missing_or_corrupt_input_is_named_before_spark_starts(tiny_cfg, tmp_path, setup, stage, error, message):
    tiny_cfg.model.engine = "tensorflow"
    setup(tiny_cfg, tmp_path)
    with pytest.raises(error, match=message):
        STAGES[stage].run(tiny_cfg)


def test_a_missing_bucket_is_named_before_any_image_is_read(tmp_path, s3_endpoint, monkeypatch):
    cfg = make_cfg(tmp_path, "storage=s3", "storage.bucket=fruits-no-such-bucket", f"storage.endpoint_url={s3_endpoint}")

    def read(*_args):
        raise AssertionError("an image was read before the bucket was checked")

    monkeypatch.setattr(ingest, "content_md5s", read)
    with pytest.raises(ConfigError, match=r"storage.bucket=fruits-no-such-bucket does not exist: create it with `make bucket`"):
        ingest.run(cfg)


def command(module: str, *args: str, cwd=None, env=None):
    import subprocess
    import sys

    from fruits.core.config import PROJECT_ROOT

    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def without_aws_credentials(tmp_path) -> dict[str, str]:
    """This process's environment with no AWS credentials anywhere the SDK looks (variables, files, the
    instance metadata service)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE=str(tmp_path / "no-config"), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-credentials"),
               AWS_EC2_METADATA_DISABLED="true")
    return env


def with_unreachable_s3(tmp_path) -> dict[str, str]:
    return {**without_aws_credentials(tmp_path), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_MAX_ATTEMPTS": "1"}


S3_BUCKET = ["storage=s3", "storage.bucket=fruits-any"]
CLOSED_PORT = "storage.endpoint_url=https://127.0.0.1:9"  # discard: nothing listens there


@pytest.mark.parametrize("module, args, environment, says", [
    ("fruits.stages.weights", ["model.weights=/nowhere/mobilenet.weights.h5"], None,
     "error: model.weights=/nowhere/mobilenet.weights.h5: file not found"),
    ("fruits.stages.pca", ["pca.k=0"], None, "error: pca.k=0 must be a positive integer"),
    ("fruits.cloud.steps", ["featurize"], None, "error: no cluster is recorded: run `make cluster` first"),
    ("fruits.cloud.bucket", S3_BUCKET, without_aws_credentials, "error: no AWS credentials found: set AWS_PROFILE"),
    ("fruits.cloud.bucket", [*S3_BUCKET, CLOSED_PORT], with_unreachable_s3,
     'error: AWS unreachable (check the network, or storage.endpoint_url / cluster.endpoint_url): Could not connect '
     'to the endpoint URL: "https://127.0.0.1:9/'),
], ids=["weights not to be had", "a wrong setting", "no cluster up", "no credentials", "S3 unreachable"])
def test_an_expected_failure_is_one_line_and_a_non_zero_exit_with_the_traceback_under_v(tmp_path, module, args,
                                                                                          environment, says):
    """What a person meets on the command line: one line that says what to do, exit status 2; -v adds the
    traceback (a bug, any other exception, keeps its traceback always)."""
    cluster_state = [] if module != "fruits.cloud.steps" else [f"cluster.state_file={tmp_path / 'none.json'}"]
    env = environment(tmp_path) if environment else None
    done = command(module, *args, *cluster_state, f"env.paths.root={tmp_path}", env=env)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]
    assert done.returncode == 2 and lines and lines[0].startswith(says), done.stderr[-2000:]
    assert "Traceback" not in done.stderr and lines[0].endswith("(-v for the traceback)")
    verbose = command(module, *args, *cluster_state, f"env.paths.root={tmp_path}", "-v", env=env)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
