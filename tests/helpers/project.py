"""The suite's project config, shrunk for speed, and what several test modules share around it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fruits.cloud.standalone import S3A_JARS  # `make s3a-jars`
from fruits.core.config import compose

TINY_LABELS = ["Apple Red", "Banana", "Kiwi", "Lemon"]
TINY_SIZE = 96  # the smallest supported input: fast tests, same code path



def make_cfg(tmp: Path, *overrides: str):
    """The real composed config, shrunk for speed, every output under tmp (one root moves them all)."""
    shrink = [
        f"env.paths.root={tmp}",
        f"data.root={tmp / 'images'}",
        "data.source=conf/data/sources/generate.yaml",
        f"data.labels=[{','.join(TINY_LABELS)}]",
        "data.train_per_label=6",
        "data.test_per_label=2",
        f"model.input_size={TINY_SIZE}",
        # fp32, the reference: engines are compared to 1e-4 and TensorFlow runs fp32 only. int8 (the default)
        # has its own tests, and the tests that run the project's own config run it end to end.
        "model.precision=fp32",
        "model.weights=random",
        "model.calibration_images=24",
        "featurize.batch_size=8",
    ]
    return compose([*shrink, *overrides])


def s3a_settings(endpoint: str, certificate: Path, workdir: Path) -> dict[str, str]:
    """Spark settings so that local Spark reads and writes s3:// URIs on the test endpoint, as EMR does
    with EMRFS: Hadoop's S3A connector (jars from `make s3a-jars`) bound to the s3 scheme, the endpoint's
    self-signed certificate trusted by the JVM, the throw-away credentials from the environment."""
    from fruits.cloud.nodes import s3a_connector
    from fruits.cloud.standalone import truststore as make_truststore

    jars = sorted(S3A_JARS.glob("*.jar"))
    if len(jars) != 2:
        return {}  # the S3 Spark tests fail and say to run `make s3a-jars`
    return {
        "spark.jars": ",".join(str(j) for j in jars),
        **s3a_connector("eu-west-3", endpoint, make_truststore(workdir, certificate)),
        "spark.hadoop.fs.s3a.aws.credentials.provider": "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
    }


def run_stages(cfg, spark, *names: str) -> None:
    """Run these stages in-process, in this order: the Spark ones (the registry's on_cluster stages) on the
    suite's session, the others on their own."""
    import importlib

    from fruits.core import registry

    for name in names:
        module = importlib.import_module(registry.stage(name).module)
        module.run(cfg, spark) if registry.stage(name).on_cluster else module.run(cfg)


def reference_features(weights, contents: list[bytes], size: int = TINY_SIZE) -> np.ndarray:
    """A direct single-process model call, no Spark: what featurize must reproduce."""
    from fruits.core import backbone
    from fruits.core.images import prepare

    extract = backbone.make_extractor(weights, size, 1.0)
    return backbone.extract_in_batches(extract, np.stack([prepare(c, size) for c in contents]), 8)


class S3Address(NamedTuple):
    endpoint: str
    port: int
    certificate: Path
    key: Path


def kill_midway(command: list[str], reached, timeout: float = 300) -> None:
    """Run command in its own process group and SIGKILL the group (the driver and its JVM) as soon as
    reached() is true: polled, so the kill lands at that point whatever the machine's speed. Fails if
    the process ends first."""
    import signal
    import subprocess
    import time

    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not reached() and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert run.poll() is None, f"{command[2]} ended before it could be killed: {run.stderr.read().decode()[-2000:]}"
        os.killpg(run.pid, signal.SIGKILL)
    finally:
        run.wait(timeout=60)
