"""The DVC pipeline: wiring (fast) and a full run from a fresh clone (slow)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fruits.config import PROJECT_ROOT


def dvc_stages(pipeline: str = "dvc.yaml"):
    return yaml.safe_load((PROJECT_ROOT / pipeline).read_text())["stages"]


@pytest.mark.parametrize("pipeline, params_file", [("dvc.yaml", "params.yaml"), ("emr/dvc.yaml", "emr/params.yaml")])
def test_every_stage_runs_a_package_module_and_reads_existing_params(pipeline, params_file):
    params = yaml.safe_load((PROJECT_ROOT / params_file).read_text())
    for name, stage in dvc_stages(pipeline).items():
        module = re.fullmatch(r"python -m (fruits\.\w+)( --params \S+)?", stage["cmd"]).group(1)
        assert (PROJECT_ROOT / "src" / (module.replace(".", "/") + ".py")).exists(), name
        keys = [k for entry in stage["params"] for k in (entry[params_file] if isinstance(entry, dict) else [entry])]
        for key in keys:
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} lists param {key}, absent from params.yaml"
                node = node[part]
        for dep in stage["deps"]:
            if dep.startswith("src/"):
                assert (PROJECT_ROOT / dep).exists(), f"stage {name} depends on missing {dep}"


def test_pca_parameters_reach_only_pca_and_report():
    readers = {name for name, stage in dvc_stages().items() if any(p.split(".")[0] == "pca" for p in stage["params"])}
    assert readers == {"pca"}
    downstream = {name for name, stage in dvc_stages().items()
                  if any("pca" in dep for dep in stage["deps"] if not dep.startswith("src/"))}
    assert downstream == {"report"}


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def shrink(clone: Path, env: dict) -> None:
    """Make the clone's own conf/ tiny (3 labels, 96 px, offline weights) and commit it."""
    sample_yaml = clone / "conf/data/sample.yaml"
    text = sample_yaml.read_text()
    text = re.sub(r"labels: \[.*\]", "labels: [Apple Red, Banana, Kiwi]", text)
    text = re.sub(r"train_per_label: \d+", "train_per_label: 8", text)
    text = re.sub(r"test_per_label: \d+", "test_per_label: 3", text)
    sample_yaml.write_text(text)
    model_yaml = clone / "conf/model/mobilenetv2.yaml"
    text = model_yaml.read_text().replace("weights: imagenet", "weights: random")
    text = re.sub(r"input_size: \d+", "input_size: 96", text)
    model_yaml.write_text(re.sub(r"calibration_images: \d+", "calibration_images: 16", text))
    params = run([sys.executable, "-m", "fruits.config"], clone, env)
    (clone / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "tiny pipeline"], clone, env)


@pytest.mark.slow
def test_fresh_clone_repro_noop_experiments_and_sweep(tmp_path):
    clone = tmp_path / "clone"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PYSPARK_PYTHON": sys.executable}
    run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], tmp_path, env)
    shrink(clone, env)

    first = run(["dvc", "repro"], clone, env)
    for stage in dvc_stages():
        assert f"Running stage '{stage}'" in first
    report = (clone / "reports/report.md").read_text()
    assert "| Apple Red | 8 | 3 |" in report and "NOT PRETRAINED" in report
    featurized = json.loads((clone / "metrics/featurize.json").read_text())
    assert featurized["images"] == featurized["featurized"] == 33

    again = run(["dvc", "repro"], clone, env)
    assert "Data and pipelines are up to date" in again and "Running stage" not in again

    experiment = run(["dvc", "exp", "run", "-S", "pca.k=5"], clone, env)
    assert re.findall(r"Running stage '(\w+)'", experiment) == ["pca", "report"]
    assert json.loads((clone / "metrics/pca.json").read_text())["k"] == 5

    target = run(["dvc", "exp", "run", "-S", "pca.variance=0.8"], clone, env)
    assert re.findall(r"Running stage '(\w+)'", target) == ["pca", "report"]
    chosen = json.loads((clone / "metrics/pca.json").read_text())
    assert chosen["explained_variance_at_k"] >= 0.8 and chosen["k_rule"].startswith("smallest k")

    run(["dvc", "exp", "run", "-S", "pca.k=3,4", "--queue"], clone, env)
    run(["dvc", "exp", "run", "--run-all"], clone, env)
    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=clone, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    ks = set()
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                metrics = (revision.get("data") or {}).get("metrics", {})
                for source in metrics.values():
                    if "k" in source.get("data", {}):
                        ks.add(source["data"]["k"])
    assert {3, 4, 5} <= ks, ks

    metrics = run(["dvc", "metrics", "show", "--json"], clone, env)
    assert "explained_variance_at_k" in metrics
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    assert (tmp_path / "plots" / "index.html").exists()
