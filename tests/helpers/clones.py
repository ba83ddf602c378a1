"""Helpers of the tests that run DVC in a fresh clone of this repository (subprocesses, as a user would)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from fruits.core.config import PROJECT_ROOT


def fresh_clone(tmp_path: Path) -> tuple[Path, dict]:
    """A clone of this repository's last commit, shrunk to the tiny pipeline, and the environment to run
    DVC in it."""
    clone = tmp_path / "clone"
    env = repo_env()
    run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], tmp_path, env)
    shrink(clone, env)
    return clone, env


def repo_env() -> dict:
    """The environment to run git and DVC in a test's repository: this venv's tools first, an author."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", "PYSPARK_PYTHON": sys.executable}


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stop_queue_workers(clone: Path) -> None:
    """SIGTERM the clone's DVC queue workers still up (their pid files, checked against the command line
    so that a reused pid is left alone)."""
    for pid_file in (clone / ".dvc/tmp/exps/celery").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


def run_queue(clone: Path, env: dict, jobs: int) -> None:
    """`dvc exp run --run-all --jobs N`, and every queued experiment succeeded. DVC's celery workers
    sometimes stay up after their last task succeeded (treeverse/dvc#10398, seen here with --jobs 2: the
    worker's monitor fired while its task ran): a worker still up 60 s after every task ended is
    stopped, which lets --run-all return. The output goes to a file, not a pipe: a worker that outlives
    --run-all holds what it inherited open, and reading a pipe to its end would wait for that worker.
    What this tests is the experiments, not DVC's workers."""
    log = clone.parent / "queue.log"
    with log.open("w") as output:
        process = subprocess.Popen(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=clone, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        try:  # the usual case: it ends by itself, and nothing polls DVC beside the experiments
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
        deadline, ended = time.monotonic() + 660, None
        while process.poll() is None:
            assert time.monotonic() < deadline, f"dvc exp run --run-all did not end within 900 s:\n{log.read_text()[-3000:]}"
            time.sleep(10)
            if process.poll() is None and not re.search(r"\b(Queued|Running)\b", run(["dvc", "queue", "status"], clone, env)):
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 60:
                    stop_queue_workers(clone)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stop_queue_workers(clone)  # none outlives the test
    status = run(["dvc", "queue", "status"], clone, env)
    assert "Failed" not in status and "Success" in status, f"{log.read_text()[-3000:]}\n{status}"


def shrink(clone: Path, env: dict) -> None:
    """Make the clone's own conf/ tiny (3 of the real sample's labels, 96 px, offline weights) and commit it."""
    sample_yaml = clone / "conf/data/sample.yaml"
    text = sample_yaml.read_text()
    text = re.sub(r"labels: \[.*\]", "labels: [Apple Golden 1, Banana 1, Kiwi 1]", text)
    text = re.sub(r"train_per_label: \d+", "train_per_label: 8", text)
    text = re.sub(r"test_per_label: \d+", "test_per_label: 3", text)
    sample_yaml.write_text(text)
    model_yaml = clone / "conf/model/mobilenetv2.yaml"
    text = model_yaml.read_text().replace("weights: imagenet", "weights: random")
    text = re.sub(r"input_size: \d+", "input_size: 96", text)
    model_yaml.write_text(re.sub(r"calibration_images: \d+", "calibration_images: 16", text))
    params = run([sys.executable, "-m", "fruits.core.config"], clone, env)
    (clone / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "tiny pipeline"], clone, env)


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a nested mapping's leaves, as dvc exp show names its columns."""
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def exp_show_columns(clone: Path, env: dict) -> list[str]:
    """The param, metric and dep columns of `dvc exp show --only-changed --csv` (a file prefix, which
    DVC adds to a name that two files share, dropped)."""
    import csv

    text = subprocess.run(["dvc", "exp", "show", "--only-changed", "--csv"], cwd=clone, env=env,
                          capture_output=True, text=True, check=True).stdout
    header = next(csv.reader(text.splitlines()))
    fixed = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    return [column.rsplit(":", 1)[-1] for column in header if column not in fixed]


def featurize_run(clone: Path) -> tuple[int, int, int]:
    """(rows in the features, images reused, images through the model) of the last featurize run."""
    metrics = json.loads((clone / "metrics/featurize.json").read_text())
    return metrics["featurized"], metrics["run"]["reused"], metrics["run"]["computed"]


