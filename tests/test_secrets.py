"""Secrets: the scanner that `make test` runs catches a planted key; a stage run with AWS credentials in
its environment writes them nowhere (logs, outputs, objects), quiet or verbose."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import string
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import boto3
import pytest

from fruits.cloud import bucket
from fruits.core import logs
from fruits.core.config import PROJECT_ROOT
from fruits.stages import sample

from helpers.project import make_cfg


def fake_credentials() -> dict[str, str]:
    """Fresh values each run, shaped like AWS's (so that a scanner or a masker would recognise them)."""
    upper = string.ascii_uppercase + string.digits
    return {"AWS_ACCESS_KEY_ID": "AKIA" + "".join(secrets.choice(upper) for _ in range(16)),
            "AWS_SECRET_ACCESS_KEY": "".join(secrets.choice(string.ascii_letters + string.digits + "/+") for _ in range(40))}


def test_the_secret_scanner_of_make_test_catches_a_planted_key(tmp_path):
    baseline = tmp_path / "baseline.json"
    shutil.copy(PROJECT_ROOT / ".secrets.baseline", baseline)
    planted = tmp_path / "settings.py"
    planted.write_text(f'aws_secret_access_key = "{fake_credentials()["AWS_SECRET_ACCESS_KEY"]}"\n')
    clean = tmp_path / "clean.py"
    clean.write_text('region = "eu-west-3"\n')
    hook = Path(sys.executable).with_name("detect-secrets-hook")
    found = subprocess.run([str(hook), "--baseline", str(baseline), str(planted)], capture_output=True, text=True)
    # Which detector names it depends on the value (one starting with '+' or '/' is reported as an AWS
    # key and a high-entropy string, not a keyword): what matters is that the planted line is caught.
    assert found.returncode == 1 and f"{planted}:1" in found.stdout, found.stdout
    assert subprocess.run([str(hook), "--baseline", str(baseline), str(clean)], capture_output=True).returncode == 0


def test_credentials_in_the_environment_are_masked_in_log_records(monkeypatch, capsys):
    credentials = fake_credentials()
    for name, value in credentials.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(logs.LEVEL_VARIABLE, raising=False)
    root, touched = logging.getLogger(), [logging.getLogger(name) for name in (*logs.CHATTY, *logs.WIRE)]
    saved = root.handlers[:], root.level, [logger.level for logger in touched]
    try:
        logs.configure(debug=True)
        logging.getLogger("fruits.test").debug("signed with %s / %s", *credentials.values())
        logging.getLogger("botocore.endpoint").debug("Authorization: Credential=%s", credentials["AWS_ACCESS_KEY_ID"])
    finally:  # this process's logging as it was (the handler just made writes to capsys's stream)
        root.handlers[:], root.level = saved[0], saved[1]
        for logger, level in zip(touched, saved[2], strict=True):
            logger.setLevel(level)
        os.environ.pop(logs.LEVEL_VARIABLE, None)
    err = capsys.readouterr().err
    assert "signed with *** / ***" in err
    assert not any(value in err for value in credentials.values())
    assert "Authorization" not in err  # the SDK's wire log stays off even with -v


def test_a_stage_run_with_aws_credentials_writes_them_nowhere(tmp_path, s3_endpoint):
    cfg = make_cfg(tmp_path, "storage=s3", f"storage.bucket=fruits-test-{uuid.uuid4().hex[:10]}",
                   f"storage.endpoint_url={s3_endpoint}")
    bucket.run(cfg)
    sample.run(cfg)
    credentials = fake_credentials()
    env = {**os.environ, **credentials}
    overrides = ["storage=s3", f"storage.bucket={cfg.storage.bucket}", f"storage.endpoint_url={s3_endpoint}",
                 f"data.root={cfg.data.root}", f"env.paths.root={tmp_path}"]
    printed = []
    for verbose in ([], ["-v"]):
        done = subprocess.run([sys.executable, "-m", "fruits.stages.ingest", *verbose, *overrides], cwd=PROJECT_ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        printed.append(done.stdout + done.stderr)
    assert "ingest: 32 of 32 files to upload" in printed[0] and "DEBUG" in printed[1]  # it ran, and -v said more
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=s3_endpoint)
    objects = [s3.get_object(Bucket=cfg.storage.bucket, Key=item["Key"])["Body"].read()
               for item in s3.list_objects_v2(Bucket=cfg.storage.bucket)["Contents"]]
    files = [path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()]
    assert len(objects) > 32 and files
    for value in credentials.values():
        assert not any(value in text for text in printed)
        assert not any(value.encode() in blob for blob in objects + files)


ENTRY_POINTS = {  # module: (its main's arguments, the module attribute its main loads the config with)
    "fruits.app.identify": (["README.md"], "load_config"),
    "fruits.cloud.cluster": (["plan"], "load_config"),
    "fruits.cloud.steps": (["pca"], "load_config"),
    "fruits.cloud.bucket": ([], None),  # a stage-style CLI: fruits.core.config.stage_config
}


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_every_command_line_masks_aws_credentials_in_what_it_logs(module):
    """Each entry point configures logging through logs.configure: a record that quotes the credentials
    (here, from the config loading the CLI calls first) prints them masked, quiet or -v."""
    arguments, attribute = ENTRY_POINTS[module]
    credentials = fake_credentials()
    target = module if attribute else "fruits.core.config"
    script = textwrap.dedent(f"""
        import importlib, logging, os, sys
        def leaky(*args, **kwargs):
            logging.getLogger("fruits.leak").warning("creds %s %s", os.environ["AWS_ACCESS_KEY_ID"],
                                                    os.environ["AWS_SECRET_ACCESS_KEY"])
            sys.exit(0)
        setattr(importlib.import_module({target!r}), "load_config", leaky)
        importlib.import_module({module!r}).main(sys.argv[1:])
    """)
    for verbose in ([], ["-v"]):
        done = subprocess.run([sys.executable, "-c", script, *arguments, *verbose], cwd=PROJECT_ROOT,
                              env={**os.environ, **credentials}, capture_output=True, text=True, timeout=120)
        printed = done.stdout + done.stderr
        assert done.returncode == 0 and "creds *** ***" in printed, printed[-2000:]
        assert not any(value in printed for value in credentials.values())
