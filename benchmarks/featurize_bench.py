"""Featurize speed, side by side on the same images: `make bench`.

- ceiling per engine: one Python process, decode + the model (TensorFlow traced, or onnxruntime with
  all cores) in fixed batches (no Spark);
- keras-predict: the same with `model.predict` per batch (what most recipes do);
- spark-featurize per engine (model.engine): the featurize job on the configured master (local[2]),
  first run then warm, each from empty tables (featurize is incremental: a second run would reuse all);
- spark-naive: the old recipe, the model rebuilt on every Arrow batch inside the UDF.

Writes reports/bench.json and reports/bench.md. A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from fruits.core import backbone as model
from fruits.core.config import load_config
from fruits.core.images import prepare
from fruits.stages import featurize, sample, weights


def timed(label: str, images: int, work) -> dict:
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    print(f"  {label:<28} {images / seconds:7.1f} img/s  ({seconds:.1f} s)", flush=True)
    return {"engine": label, "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 2)}


def single_process(files: list[Path], weights, cfg) -> list[dict]:
    size, batch = cfg.model.input_size, cfg.featurize.batch_size
    extract = model.make_extractor(weights, size, cfg.model.alpha)
    extract(np.zeros((batch, size, size, 3), np.float32))  # trace once, outside the timing

    def ceiling():
        for start in range(0, len(files), batch):
            extract(np.stack([prepare(f.read_bytes(), size) for f in files[start : start + batch]]))

    keras_model = model.build_backbone(size, cfg.model.alpha)
    keras_model.set_weights(weights)
    keras_model.predict(np.zeros((batch, size, size, 3), np.float32), verbose=0)

    def predict_loop():
        for start in range(0, len(files), batch):
            keras_model.predict(np.stack([prepare(f.read_bytes(), size) for f in files[start : start + batch]]), verbose=0)

    onnx = model.make_onnx_extractor(Path(cfg.env.paths.onnx).read_bytes(), os.cpu_count())

    def onnx_ceiling():
        for start in range(0, len(files), batch):
            onnx(np.stack([prepare(f.read_bytes(), size) for f in files[start : start + batch]]))

    return [timed("ceiling (1 process, traced)", len(files), ceiling),
            timed("ceiling onnxruntime (1 process)", len(files), onnx_ceiling),
            timed("keras predict loop", len(files), predict_loop)]


def naive_udf(broadcast, cfg):
    """The recipe to avoid: build the model for every batch."""
    from pyspark.sql.functions import pandas_udf

    size, alpha = cfg.model.input_size, cfg.model.alpha

    @pandas_udf("array<float>")
    def rebuild_every_batch(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for contents in batches:
            backbone = model.build_backbone(size, alpha)
            backbone.set_weights(broadcast.value)
            arrays = np.stack([prepare(c, size) for c in contents])
            yield pd.Series(list(backbone(arrays, training=False).numpy()))

    return rebuild_every_batch


def spark_runs(files: list[Path], cfg) -> list[dict]:
    from fruits.core.spark import get_session

    spark = get_session(cfg)

    def from_scratch(engine_cfg):
        for table in (engine_cfg.env.paths.features, engine_cfg.env.paths.rejects):
            shutil.rmtree(table, ignore_errors=True)
        featurize.run(engine_cfg, spark)

    results = []
    for engine in ("tensorflow", "onnxruntime"):
        engine_cfg = cfg.copy()
        engine_cfg.model.engine = engine
        results += [timed(f"spark featurize {engine} (first)", len(files), lambda: from_scratch(engine_cfg)),
                    timed(f"spark featurize {engine} (warm)", len(files), lambda: from_scratch(engine_cfg))]
    cfg.model.engine = "tensorflow"
    broadcast, _ = featurize.broadcast_weights(spark, cfg)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.featurize.batch_size))
    images = featurize.read_contents(spark, cfg, None)
    udf = naive_udf(broadcast, cfg)
    results.append(timed("spark naive (rebuild/batch)", len(files),
                         lambda: images.select(udf("content")).write.mode("overwrite").format("noop").save()))
    spark.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=192, help="generated Training images per label")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.input_size=160")
    args = parser.parse_args()
    # The bench's own data and outputs under bench/ (reports/bench.* excepted): one root moves them.
    cfg = load_config(["data.root=bench/sample", f"data.train_per_label={args.per_label}", "data.test_per_label=0",
                       "env.paths.root=bench", *args.overrides])
    files = sorted(Path(cfg.data.root).glob("*/*/*.jpg"))
    if len(files) != len(cfg.data.labels) * args.per_label:
        sample.run(cfg)
        files = sorted(Path(cfg.data.root).glob("*/*/*.jpg"))
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    arrays = model.load_weight_arrays(cfg.env.paths.weights, cfg.model.input_size, cfg.model.alpha)
    print(f"{len(files)} images at {cfg.model.input_size} px, batch {cfg.featurize.batch_size}, "
          f"master {cfg.env.spark.master}, {os.cpu_count()} cores")
    rows = single_process(files, arrays, cfg) + spark_runs(files, cfg)
    by_engine = {row["engine"]: row["images_per_second"] for row in rows}
    ceiling = by_engine["ceiling (1 process, traced)"]
    warm = by_engine["spark featurize tensorflow (warm)"]
    onnx_warm = by_engine["spark featurize onnxruntime (warm)"]
    naive = by_engine["spark naive (rebuild/batch)"]
    summary = {
        "images": len(files), "input_size": cfg.model.input_size, "master": cfg.env.spark.master,
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS"), "runs": rows,
        "featurize_vs_ceiling": round(warm / ceiling, 3), "featurize_vs_naive": round(warm / naive, 2),
        "onnxruntime_vs_tensorflow_featurize": round(onnx_warm / warm, 2),
    }
    out = Path("reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["| engine | img/s | seconds |", "|---|---:|---:|"]
    lines += [f"| {r['engine']} | {r['images_per_second']} | {r['seconds']} |" for r in rows]
    lines += ["", f"TensorFlow featurize (warm) / TensorFlow ceiling = {summary['featurize_vs_ceiling']}; "
              f"/ naive = {summary['featurize_vs_naive']}; onnxruntime featurize / TensorFlow featurize (warm) = "
              f"{summary['onnxruntime_vs_tensorflow_featurize']}"]
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
