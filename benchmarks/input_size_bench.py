"""Input size as a trade-off: `make bench-sizes`.

For model.input_size in 96, 128, 160, 224 (Keras publishes ImageNet weights for each): the model-only
throughput of the configured engine on all cores (N processes x 1 thread, as Spark runs it), warm
featurize on the sample, and the 1-nearest-neighbour accuracy of Test images against Training images
in PCA space (pca.k from the config) and on the raw 1280-d features, so a user can pick a size.

The images: 40 generated labels (their looks derived from the names, so some look alike), 20 Training
and 10 Test images each; every Test image is degraded (shrunk in its frame, Gaussian noise, JPEG quality
30) so that the task is not trivial (undegraded, every size scores 1.0). The weights are those the
weights stage gives at each size (offline here: the same stand-in backbone, whose convolution weights
do not depend on the input size): accuracy is that of these weights on these images, labelled so in the
output. Writes reports/bench_sizes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np

from fruits.core import tables
from fruits.core.config import load_config
from fruits.core.spark import get_session
from fruits.stages import featurize, pca, sample, weights

from featurize_bench import ceiling
from measure import write_results

SIZES = (96, 128, 160, 224)
LABELS = [f"Fruit {i:02d}" for i in range(40)]
DEGRADED = "DEGRADED"  # marker: the Test images were degraded once
ROOT = Path("bench/sizes")
MODEL_ONLY_IMAGES = 1920
DATA = [f"data.root={ROOT}/sample", f"data.labels=[{','.join(LABELS)}]", "data.train_per_label=20", "data.test_per_label=10"]


def degrade_test_images(root: Path, seed: int = 0) -> None:
    """Shrink each Test image to 60-90 % in a white frame, add Gaussian noise (sigma 25), save as JPEG
    quality 30: what a phone photo does to a clean catalogue picture, roughly."""
    from PIL import Image

    if (root / DEGRADED).exists():
        return
    rng = np.random.default_rng(seed)
    for path in sorted((root / "Test").glob("*/*.jpg")):
        image = Image.open(path).convert("RGB")
        side = image.size[0]
        small = image.resize((int(side * rng.uniform(0.6, 0.9)),) * 2)
        frame = Image.new("RGB", image.size, (255, 255, 255))
        frame.paste(small, tuple(rng.integers(0, side - small.size[0] + 1, 2)))
        noisy = np.clip(np.asarray(frame, np.float32) + rng.normal(0, 25, (side, side, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(path, "JPEG", quality=30)
    (root / DEGRADED).write_text("Test images degraded by benchmarks/input_size_bench.py\n")


def nearest_neighbour_accuracy(vectors: np.ndarray, labels: np.ndarray, is_test: np.ndarray) -> float:
    """Share of Test rows whose nearest Training row (Euclidean) has the same label."""
    train, test = vectors[~is_test], vectors[is_test]
    distances = (test**2).sum(1)[:, None] - 2 * test @ train.T + (train**2).sum(1)[None, :]
    return float((labels[~is_test][distances.argmin(1)] == labels[is_test]).mean())


def collect(spark, uri: str, cfg, column: str):
    rows = tables.read(spark, uri, cfg).select(column, "label", "split").collect()
    return (np.array([r[column] for r in rows], np.float64), np.array([r["label"] for r in rows]),
            np.array([r["split"] == "Test" for r in rows]))


def one_size(spark, size: int, overrides: list[str]) -> dict:
    cfg = load_config([f"model.input_size={size}", f"env.paths.root={ROOT}/{size}", *DATA, *overrides])
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    provenance = json.loads(Path(cfg.env.paths.provenance).read_text())
    files = sorted(Path(cfg.data.root).glob("*/*/*.jpg"))
    values = {"onnx": cfg.env.paths.onnx, "weights": cfg.env.paths.weights, "size": size, "alpha": cfg.model.alpha,
              "batch": cfg.featurize.batch_size}
    repeated = files * max(1, MODEL_ONLY_IMAGES // len(files))  # long enough to time, whatever the sample size
    model_only = ceiling(cfg.model.engine, values, repeated, os.cpu_count(), 1, decode=False)
    runs = []
    for _ in range(3):  # the first is cold (workers build this size's model); the best of the two warm ones
        for table in (cfg.env.paths.features, cfg.env.paths.rejects):
            shutil.rmtree(table, ignore_errors=True)
        runs.append(featurize.run(cfg, spark))
    warm = max(runs[1:], key=lambda m: m["images_per_second"])
    pca_metrics = pca.run(cfg, spark)
    projected = collect(spark, cfg.env.paths.pca_vectors, cfg, "pca")
    raw = collect(spark, cfg.env.paths.features, cfg, "features")
    row = {"input_size": size, "engine": cfg.model.engine, "model_only_images_per_second": model_only["images_per_second"],
           "featurize_warm_images_per_second": warm["images_per_second"], "k": pca_metrics["k"],
           "explained_variance_at_k": pca_metrics["explained_variance_at_k"],
           "nn1_accuracy_pca": round(nearest_neighbour_accuracy(*projected), 4),
           "nn1_accuracy_raw": round(nearest_neighbour_accuracy(*raw), 4),
           "train_images": int((~projected[2]).sum()), "test_images": int(projected[2].sum()),
           "weights": provenance.get("warning") or provenance.get("source")}
    print(f"  {size:3d} px: model {row['model_only_images_per_second']:6.1f} img/s, featurize "
          f"{row['featurize_warm_images_per_second']:6.1f} img/s, 1-NN {row['nn1_accuracy_pca']:.3f} (PCA k={row['k']}), "
          f"{row['nn1_accuracy_raw']:.3f} (raw)", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pca.k=50 or data.test_per_label=16")
    args = parser.parse_args()
    cfg = load_config([f"env.paths.root={ROOT}", *DATA, *args.overrides])
    if not (Path(cfg.data.root) / DEGRADED).exists():
        shutil.rmtree(cfg.data.root, ignore_errors=True)
        sample.run(cfg)
        degrade_test_images(Path(cfg.data.root))
    spark = get_session(cfg)
    rows = [one_size(spark, size, args.overrides) for size in args.sizes]
    spark.stop()
    lines = [f"{rows[0]['train_images']} Training and {rows[0]['test_images']} Test images (40 generated labels, "
             f"Test images degraded: see the script), weights: {rows[0]['weights']}", "",
             "| input size | model only (img/s) | featurize warm (img/s) | 1-NN accuracy, PCA k | 1-NN accuracy, raw 1280-d |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input_size']} | {r['model_only_images_per_second']} | {r['featurize_warm_images_per_second']} | "
              f"{r['nn1_accuracy_pca']} (k={r['k']}) | {r['nn1_accuracy_raw']} |" for r in rows]
    print(write_results("bench_sizes", rows, lines))


if __name__ == "__main__":
    main()
