"""Input size as a trade-off: `make bench-sizes`.

For model.input_size in 96, 128, 160, 224 (Keras publishes ImageNet weights for each): the model-only
throughput of the configured engine on all cores (N processes x 1 thread, as Spark runs it), warm
featurize on the sample, and the app's accuracy as the index stage measures it (its own run at each
size): knn_accuracy on the Test photos and knn_accuracy_hard (the hard protocol: the fruit's other films
against an arc of its first one), each with its 95 % interval, so a user can pick a size.

The images: the real Fruits-360 photos of the demo's sample (samples/fruits360: 10 labels x 64 Training
+ 24 Test). The weights are those the weights stage gives at each size (offline here: the same stand-in
backbone, whose convolution weights do not depend on the input size): accuracy is that of these weights
on these photos, labelled so in the output. Writes reports/bench_sizes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from fruits.core.config import load_config
from fruits.core.spark import get_session
from fruits.stages import featurize, index, pca, sample, weights

from featurize_bench import ceiling
from measure import write_results

SIZES = (96, 128, 160, 224)
ROOT = Path("bench/sizes")
MODEL_ONLY_IMAGES = 1920
DATA = [f"data.root={ROOT}/sample"]


def interval(values) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "-"


def one_size(spark, size: int, overrides: list[str]) -> dict:
    cfg = load_config([f"model.input_size={size}", f"env.paths.root={ROOT}/{size}", *DATA, *overrides])
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    provenance = json.loads(Path(cfg.env.paths.provenance).read_text())
    files = sorted(Path(cfg.data.root).glob("*/*/*.jpg"))
    values = {"cfg": cfg, "size": size, "batch": cfg.featurize.batch_size}  # what featurize_bench.ceiling builds from
    repeated = files * max(1, MODEL_ONLY_IMAGES // len(files))  # long enough to time, whatever the sample size
    model_only = ceiling(cfg.model.engine, values, repeated, os.cpu_count(), 1, decode=False)
    runs = []
    for _ in range(3):  # the first is cold (workers build this size's model); the best of the two warm ones
        for table in (cfg.env.paths.features, cfg.env.paths.rejects):
            shutil.rmtree(table, ignore_errors=True)
        runs.append(featurize.run(cfg, spark))
    warm = max(runs[1:], key=lambda m: m["images_per_second"])
    pca_metrics = pca.run(cfg, spark)
    measured = index.run(cfg, spark)
    row = {"input_size": size, "engine": cfg.model.engine, "model_only_images_per_second": model_only["images_per_second"],
           "featurize_warm_images_per_second": warm["images_per_second"], "k": pca_metrics["k"],
           "explained_variance_at_k": pca_metrics["explained_variance_at_k"],
           **{key: measured[key] for key in ("knn_accuracy", "knn_accuracy_interval_95", "knn_accuracy_hard",
                                             "knn_accuracy_hard_interval_95", "hard_queries", "abstained_known",
                                             "abstained_held_back")},
           "train_images": measured["training_vectors"], "test_images": measured["test_rows"],
           "weights": provenance.get("warning") or provenance.get("source")}
    print(f"  {size:3d} px: model {row['model_only_images_per_second']:6.1f} img/s, featurize "
          f"{row['featurize_warm_images_per_second']:6.1f} img/s, knn_accuracy {row['knn_accuracy']:.3f}, hard "
          f"{row['knn_accuracy_hard']:.3f} (k={row['k']})", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pca.k=50 or data.test_per_label=16")
    args = parser.parse_args()
    cfg = load_config([f"env.paths.root={ROOT}", *DATA, *args.overrides])
    sample.run(cfg)
    spark = get_session(cfg)
    rows = [one_size(spark, size, args.overrides) for size in args.sizes]
    spark.stop()
    lines = [f"{rows[0]['train_images']} Training and {rows[0]['test_images']} Test photos (real Fruits-360 photos of "
             f"the demo's sample; hard protocol: {rows[0]['hard_queries']} photos of the fruits' other films), "
             f"weights: {rows[0]['weights']}", "",
             "| input size | model only (img/s) | featurize warm (img/s) | knn_accuracy (95 % interval) | "
             "knn_accuracy_hard (95 % interval) |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input_size']} | {r['model_only_images_per_second']} | {r['featurize_warm_images_per_second']} | "
              f"{r['knn_accuracy']} ({interval(r['knn_accuracy_interval_95'])}) | {r['knn_accuracy_hard']} "
              f"({interval(r['knn_accuracy_hard_interval_95'])}) |" for r in rows]
    print(write_results("bench_sizes", rows, lines))


if __name__ == "__main__":
    main()
