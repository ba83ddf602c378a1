"""Where featurize spends its time: `make profile`.

Runs the featurize stage from empty tables on the bench's images under py-spy (sampling, no code
change), following every Python process it starts: the driver and Spark's Python workers. Then sums
the samples of the workers by what they were doing (model, decode, Arrow and pandas transfer, Spark's
worker loop) and lists the functions with the most samples of their own.

Writes reports/profile.md and reports/profile.json (the raw samples stay in bench/profile/).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from omegaconf import OmegaConf

from fruits.core.config import load_config

ROOT = Path("bench/profile")
# What a worker's stack is doing, by the first matching frame from the top of the stack (leaf first).
ACTIVITIES = (
    ("model (onnxruntime)", ("onnxruntime",)),
    ("model (TensorFlow)", ("tensorflow", "keras")),
    ("decode + resize (Pillow)", ("PIL", "fruits/core/images.py")),
    ("Arrow / pandas transfer", ("pyarrow", "pandas", "serializers.py")),
    ("Spark worker loop (waiting for data)", ("pyspark",)),
)


def activity(stack: list[str]) -> str:
    for frame in reversed(stack):  # from the leaf up: the innermost known library names the activity
        for name, markers in ACTIVITIES:
            if any(marker in frame for marker in markers):
                return name
    return "other"


def parse(raw: Path) -> tuple[Counter, Counter, int, int]:
    """(samples per worker activity, samples per worker leaf function, worker samples, driver samples)."""
    activities, leaves, workers, driver = Counter(), Counter(), 0, 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        stack, count = stack_text.split(";"), int(count_text)
        process = stack[0]
        if "pyspark.daemon" in process or "pyspark/daemon" in process or "worker" in process:
            workers += count
            activities[activity(stack[1:])] += count
            leaves[stack[-1]] += count
        else:
            driver += count
    return activities, leaves, workers, driver


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=50, help="samples per second per process")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.engine=tensorflow")
    args = parser.parse_args()
    cfg = load_config(["data.root=bench/sample", "data.train_per_label=192", "data.test_per_label=0",
                       f"env.paths.root={ROOT}", "env.paths.models=bench/models", *args.overrides])
    if not Path(cfg.data.root).exists() or not Path(cfg.env.paths.onnx).exists():
        raise SystemExit("run `make bench` first: it generates bench/sample and the weights this profile uses")
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(table, ignore_errors=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    params, raw = ROOT / "params.yaml", ROOT / "featurize.raw.txt"
    OmegaConf.save(cfg, params)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    subprocess.run(["py-spy", "record", "--subprocesses", "--idle", "--format", "raw", "--rate", str(args.rate),
                    "--output", str(raw), "--", sys.executable, "-m", "fruits.stages.featurize", "--params", str(params)],
                   check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads(Path(cfg.env.paths.featurize_metrics).read_text())
    activities, leaves, workers, driver = parse(raw)
    result = {"engine": cfg.model.engine, "images": metrics["images"], "seconds": metrics["seconds"],
              "worker_samples": workers, "driver_samples": driver,
              "worker_activity_share": {name: round(count / max(1, workers), 3) for name, count in activities.most_common()},
              "worker_top_functions": [[name, round(count / max(1, workers), 3)] for name, count in leaves.most_common(15)]}
    (Path("reports") / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"featurize, engine {result['engine']}, {result['images']} images, {result['seconds']} s under py-spy "
             f"({args.rate} samples/s per process, idle included): {workers} worker samples, {driver} driver samples.",
             "", "| what the Python workers were doing | share of their samples |", "|---|---:|"]
    lines += [f"| {name} | {share:.1%} |" for name, share in result["worker_activity_share"].items()]
    lines += ["", "| function (own samples, workers) | share |", "|---|---:|"]
    lines += [f"| `{name}` | {share:.1%} |" for name, share in result["worker_top_functions"]]
    (Path("reports") / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
