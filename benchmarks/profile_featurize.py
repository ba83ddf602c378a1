"""Where featurize spends its time: `make profile`.

Runs the featurize stage from empty tables on the bench's images and attaches py-spy (sampling, no
code change) to Spark's Python daemon as soon as it starts, following the workers it forks (they are
children of the JVM, which py-spy cannot follow from the driver). Then sums the workers' samples by
what they were doing (model, decode, Arrow and pandas transfer, Spark's worker loop) and lists the
functions with the most samples of their own.

Writes reports/profile.md and reports/profile.json (the raw samples stay in bench/profile/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import psutil
from omegaconf import OmegaConf

from fruits.core.config import load_config
from measure import MODELS_PER_POINT

ROOT = Path("bench/profile")
# What a worker's stack is doing, by the first matching frame from the top of the stack (leaf first).
ACTIVITIES = (
    ("idle: a worker waiting for the JVM to send rows", ("read_int (serializers.py",)),
    ("idle: the daemon (it only forks workers)", ("daemon.py",)),
    ("importing modules (a worker's first task)", ("<frozen importlib", "<frozen zipimport>")),
    ("model (onnxruntime)", ("onnxruntime",)),
    ("model (TensorFlow)", ("tensorflow", "keras")),
    ("decode + resize (Pillow)", ("PIL", "fruits/core/images.py")),
    ("Arrow / pandas transfer", ("pyarrow", "pandas", "serializers.py")),
    ("Spark worker loop (waiting for data)", ("pyspark",)),
)


# Spark's worker calls importlib.invalidate_caches() at each task's start: on Python 3.11 every
# zipimporter then re-reads its archive's whole directory (pyspark.zip, py4j's zip and spark-core's jar
# are on the workers' PYTHONPATH), whatever frame is at the leaf.
TASK_START = ("task start: Python re-reads the zip archives on PYTHONPATH", "invalidate_caches (importlib")


def activity(stack: list[str]) -> str:
    if any(TASK_START[1] in frame for frame in stack):
        return TASK_START[0]
    for frame in reversed(stack):  # from the leaf up: the innermost known library names the activity
        for name, markers in ACTIVITIES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def parse(raw: Path) -> tuple[Counter, Counter, int]:
    """(samples per activity, samples per leaf function, samples) of the daemon and its workers."""
    activities, leaves, samples = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        stack, count = stack_text.split(";"), int(count_text)
        samples += count
        activities[activity(stack[1:])] += count
        leaves[stack[-1]] += count
    return activities, leaves, samples


def spark_daemon(driver: psutil.Process, deadline: float) -> psutil.Process | None:
    """The `pyspark.daemon` process under the driver (started with the first Python task)."""
    while time.monotonic() < deadline and driver.is_running():
        for child in driver.children(recursive=True):
            try:
                if "pyspark.daemon" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50, help="samples per second per process")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.engine=tensorflow")
    args = parser.parse_args()
    cfg = load_config(["data.root=bench/sample",
                       f"env.paths.root={ROOT}", f"env.paths.models=bench/models/{MODELS_PER_POINT}", *args.overrides])
    if not Path(cfg.data.root).exists() or not Path(cfg.env.paths.onnx).exists():
        raise SystemExit("run `make bench` first: it makes bench/sample (the real photos, turned) and the weights this profile uses")
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(table, ignore_errors=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    params, raw = ROOT / "params.yaml", ROOT / "featurize.raw.txt"
    OmegaConf.save(cfg, params)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    raw.unlink(missing_ok=True)
    stage = subprocess.Popen([sys.executable, "-m", "fruits.stages.featurize", "--params", str(params)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    daemon = spark_daemon(psutil.Process(stage.pid), time.monotonic() + 300)
    if daemon is None:
        stage.kill()
        raise SystemExit("Spark's Python daemon never started: is featurize failing? run it by hand")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(daemon.pid), "--subprocesses", "--idle", "--format", "raw",
                            "--rate", str(args.rate), "--output", str(raw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    if stage.wait() != 0:
        raise SystemExit("featurize failed under the profiler")
    spy.wait(timeout=120)  # py-spy stops when the daemon exits with the Spark session
    metrics = json.loads(Path(cfg.env.paths.featurize_diagnostics).read_text())
    activities, leaves, workers = parse(raw)
    result = {"engine": cfg.model.engine, "images": metrics["images"], "seconds": metrics["seconds"],
              "worker_samples": workers,
              "worker_activity_share": {name: round(count / max(1, workers), 3) for name, count in activities.most_common()},
              "worker_top_functions": [[name, round(count / max(1, workers), 3)] for name, count in leaves.most_common(15)]}
    (Path("reports") / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"featurize, engine {result['engine']}, {result['images']} images, {result['seconds']} s with py-spy "
             f"attached to Spark's Python daemon and workers ({args.rate} samples/s per process, idle included): "
             f"{workers} samples.",
             "", "| what the Python workers were doing | share of their samples |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in result["worker_activity_share"].items()]
    lines += ["", "| function (own samples, workers) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in result["worker_top_functions"]]
    (Path("reports") / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
