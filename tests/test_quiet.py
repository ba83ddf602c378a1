"""Quiet by default: a stage prints its own lines and warnings, not TensorFlow's or Spark's start-up
chatter; -v brings that back for debugging."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from helpers.project import make_cfg

CHATTER = ("oneDNN", "absl::InitializeLog", "NativeCodeLoader", "loopback address", "SPARK_LOCAL_IP",
           "Setting default log level", "sc.setLogLevel", "VectorBLAS", "py4j", "tf2onnx")


def stage(name: str, cfg, tmp_path, *flags: str) -> str:
    params = tmp_path / f"{name}.yaml"
    OmegaConf.save(cfg, params)
    done = subprocess.run([sys.executable, "-m", f"fruits.stages.{name}", "--params", str(params), *flags],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.mark.slow
def test_stages_print_their_results_not_the_libraries_chatter(tiny_cfg, tmp_path):
    weights_cfg = make_cfg(tmp_path / "weights")
    weights_cfg.data.root = tiny_cfg.data.root  # seeded weights calibrate on the sample's Training images
    printed = stage("weights", weights_cfg, tmp_path)
    assert "weights " in printed and "RANDOM WEIGHTS - NOT PRETRAINED" in printed  # its result and its warning
    assert not [word for word in CHATTER if word in printed], printed
    assert "oneDNN" in stage("weights", weights_cfg, tmp_path, "-v")  # -v: TensorFlow's notices are back

    tiny_cfg.model.engine = "tensorflow"  # TensorFlow in the Spark workers too
    printed = stage("featurize", tiny_cfg, tmp_path)
    assert "featurize: 32 images" in printed
    assert not [word for word in CHATTER if word in printed], printed
