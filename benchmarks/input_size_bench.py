"""Input size and precision as a trade-off: `make bench-sizes`.

For model.input_size in 96, 100 (the photos' own size: no resampling), 112, 128, 160, 224 and
model.precision fp32 and int8 (onnxruntime's static QDQ graph): the model-only throughput of the
configured engine on all cores (N processes x 1 thread, as Spark runs it), warm featurize and its
fraction of that ceiling, the app's accuracy as the index stage measures it (its own run at each
point): knn_accuracy on the Test photos and knn_accuracy_hard (the hard protocol: the fruit's other
films against an arc of its first one), each with its 95 % interval, and for int8 the cosine of each
photo's features to fp32's at the same size.

Speed is measured at the data's scale, not on the sample: featurize's fixed cost per run (listing,
plan, write, commit: ~0.5 s) is a third of a run on 880 photos and nothing on 100k. So the model-only
ceiling and warm featurize (best of two warm runs, from empty tables) use the bench's 1,920 photos
(the real photos of the sample, turned as Fruits-360 turns its fruits, as `make bench` makes them);
accuracy uses the real sample itself (samples/fruits360: 10 labels x 64 Training + 24 Test).

Then the rule that picks the default, in the same run: the fastest point whose hard accuracy is at
most 1 point below that of 224 px fp32 (the default before this bench), and its speed-up over it. The
weights are those the weights stage gives at each size (offline here: the same stand-in backbone,
whose convolution weights do not depend on the input size): accuracy is that of these weights on
these photos, labelled so in the output. Writes reports/bench_sizes.json and .md.
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
from fruits.core.storage import Storage

from featurize_bench import ceiling
from measure import rotated_real_photos, write_results

SIZES = (96, 100, 112, 128, 160, 224)
REFERENCE = (224, "fp32")  # the default before this bench: what the rule compares with
ACCURACY_MARGIN = 0.01  # the hard accuracy a faster default may lose: 1 point
PRECISIONS = ("fp32", "int8")
ROOT = Path("bench/sizes")
SPEED_PER_LABEL = 192  # 1,920 photos over the 10 labels
DATA = [f"data.root={ROOT}/sample"]


def cosine_cell(row: dict) -> str:
    return f"{row['cosine_to_fp32_median']}, {row['cosine_to_fp32_min']}" if "cosine_to_fp32_median" in row else "-"


def interval(values) -> str:
    return f"{values[0]:.3f}-{values[1]:.3f}" if values else "-"


def row_cosines(a, b):
    """The cosine of each row of a to the same row of b."""
    import numpy as np

    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def cosines(cfg, reference) -> list[float]:
    """Per photo, the cosine of its features to those of the reference config (same photos, fp32)."""
    import numpy as np

    from fruits.core import tables

    def by_path(c):
        frame = tables.arrow_dataset(c.env.paths.features, Storage.of(c)).to_table(columns=["path", "features"]).to_pandas()
        return dict(zip(frame["path"], frame["features"]))

    ours, theirs = by_path(cfg), by_path(reference)
    a = np.stack([np.asarray(ours[p]) for p in sorted(ours)])
    b = np.stack([np.asarray(theirs[p]) for p in sorted(ours)])
    return row_cosines(a, b).tolist()


def point_config(size: int, precision: str, overrides: list[str]):
    return load_config([f"model.input_size={size}", f"model.precision={precision}",
                        f"env.paths.root={ROOT}/{size}-{precision}", *DATA, *overrides])


def from_empty_tables(cfg, spark) -> dict:
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(table, ignore_errors=True)
    return featurize.run(cfg, spark)


def one_size(spark, size: int, precision: str, overrides: list[str], speed_files: list[Path]) -> dict:
    cfg = point_config(size, precision, overrides)
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    provenance = json.loads(Path(cfg.env.paths.provenance).read_text())
    values = {"cfg": cfg, "size": size, "batch": cfg.featurize.batch_size}  # what featurize_bench.ceiling builds from
    model_only = ceiling(cfg.model.engine, values, speed_files, os.cpu_count(), 1, decode=False)
    speed_cfg = load_config([f"model.input_size={size}", f"model.precision={precision}", f"data.root={ROOT}/speed",
                             f"env.paths.root={ROOT}/{size}-{precision}/speed", f"env.paths.models={cfg.env.paths.models}",
                             *overrides])
    # The first is cold (workers build this size's model); the best of the two warm ones.
    runs = [from_empty_tables(speed_cfg, spark) for _ in range(3)]
    warm = max(runs[1:], key=lambda m: m["images_per_second"])
    from_empty_tables(cfg, spark)  # the real sample's features, for the accuracy
    pca_metrics = pca.run(cfg, spark)
    measured = index.run(cfg, spark)
    row = {"input_size": size, "precision": precision, "engine": cfg.model.engine, "speed_images": len(speed_files),
           "model_only_images_per_second": model_only["images_per_second"],
           "featurize_warm_images_per_second": warm["images_per_second"],
           "fraction_of_ceiling": round(warm["images_per_second"] / model_only["images_per_second"], 3),
           "k": pca_metrics["k"],
           "explained_variance_at_k": pca_metrics["explained_variance_at_k"],
           **{key: measured[key] for key in ("knn_accuracy", "knn_accuracy_interval_95", "knn_accuracy_hard",
                                             "knn_accuracy_hard_interval_95", "hard_queries", "abstained_known",
                                             "abstained_held_back")},
           "train_images": measured["training_vectors"], "test_images": measured["test_rows"],
           "weights": provenance.get("warning") or provenance.get("source"),
           "quantization": provenance.get("quantization")}
    if precision != "fp32":
        found = cosines(cfg, point_config(size, "fp32", overrides))
        row.update(cosine_to_fp32_median=round(float(sorted(found)[len(found) // 2]), 4),
                   cosine_to_fp32_min=round(float(min(found)), 4))
    print(f"  {size:3d} px {precision}: model {row['model_only_images_per_second']:6.1f} img/s, featurize "
          f"{row['featurize_warm_images_per_second']:6.1f} img/s ({row['fraction_of_ceiling']:.2f} of it), knn_accuracy "
          f"{row['knn_accuracy']:.3f}, hard {row['knn_accuracy_hard']:.3f} (k={row['k']})", flush=True)
    return row


def machine() -> str:
    from fruits.core.quantization import cpu_flags, cpu_has_vnni

    flags = cpu_flags()
    wide = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{os.cpu_count()} cores, {wide}, {'with' if cpu_has_vnni() else 'no'} VNNI"


def float16_cosine_min(cfg) -> float:
    """The lowest cosine, over the sample's photos, between a photo's features and the same features
    stored as float16: what halving the features' storage width would change."""
    import numpy as np

    from fruits.core import tables

    frame = tables.arrow_dataset(cfg.env.paths.features, Storage.of(cfg)).to_table(columns=["features"]).to_pandas()
    a = np.stack(frame["features"]).astype(np.float32)
    b = a.astype(np.float16).astype(np.float32)
    return float(row_cosines(a, b).min())


def choose(rows: list[dict]) -> dict | None:
    """The rule for the default: the fastest point (warm featurize) whose hard accuracy is at most
    ACCURACY_MARGIN below REFERENCE's, measured in the same run; None without the reference."""
    reference = next((r for r in rows if (r["input_size"], r["precision"]) == REFERENCE), None)
    if reference is None:
        return None
    eligible = [r for r in rows if r["knn_accuracy_hard"] >= reference["knn_accuracy_hard"] - ACCURACY_MARGIN - 1e-9]
    best = max(eligible, key=lambda r: r["featurize_warm_images_per_second"])
    return {"input_size": best["input_size"], "precision": best["precision"],
            "speedup": round(best["featurize_warm_images_per_second"] / reference["featurize_warm_images_per_second"], 2),
            "knn_accuracy_hard": best["knn_accuracy_hard"], "reference_knn_accuracy_hard": reference["knn_accuracy_hard"],
            "rule": f"the fastest warm featurize whose knn_accuracy_hard is at most {ACCURACY_MARGIN:.0%} below "
                    f"{REFERENCE[0]} px {REFERENCE[1]}'s"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. pca.k=50 or data.test_per_label=16")
    args = parser.parse_args()
    cfg = load_config([f"env.paths.root={ROOT}", *DATA, *args.overrides])
    sample.run(cfg)
    speed_files = sorted(rotated_real_photos(Path(cfg.data.source), ROOT / "speed", SPEED_PER_LABEL))
    spark = get_session(cfg, cfg.env.spark.get("featurize_java_options"))
    rows = [one_size(spark, size, precision, args.overrides, speed_files)
            for size in args.sizes for precision in args.precisions]
    spark.stop()
    cpu, choice = machine(), choose(rows)
    for row in rows:
        row["cpu"] = cpu
    if choice:
        chosen = point_config(choice["input_size"], choice["precision"], args.overrides)
        choice["float16_storage_cosine_min"] = round(float16_cosine_min(chosen), 9)
    lines = [f"Accuracy: {rows[0]['train_images']} Training and {rows[0]['test_images']} Test photos (real Fruits-360 "
             f"photos of the demo's sample; hard protocol: {rows[0]['hard_queries']} photos of the fruits' other films). "
             f"Speed: {len(speed_files)} photos (the same real photos, turned). Weights: {rows[0]['weights']}; {cpu}", "",
             "| input size | precision | model only (img/s) | featurize warm (img/s) | fraction of ceiling | "
             "knn_accuracy (95 % interval) | knn_accuracy_hard (95 % interval) | cosine to fp32 (median, min) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['input_size']} | {r['precision']} | {r['model_only_images_per_second']} | "
              f"{r['featurize_warm_images_per_second']} | {r['fraction_of_ceiling']} | "
              f"{r['knn_accuracy']} ({interval(r['knn_accuracy_interval_95'])}) | {r['knn_accuracy_hard']} "
              f"({interval(r['knn_accuracy_hard_interval_95'])}) | "
              f"{cosine_cell(r)} |"
              for r in rows]
    if choice:
        lines += ["", f"Chosen by the rule ({choice['rule']}): {choice['input_size']} px {choice['precision']}, "
                      f"{choice['speedup']}x the featurize img/s of {REFERENCE[0]} px {REFERENCE[1]} in this run, hard "
                      f"accuracy {choice['knn_accuracy_hard']} against {choice['reference_knn_accuracy_hard']}. Its "
                      f"features stored as float16: lowest cosine to float32 {choice['float16_storage_cosine_min']}."]
    print(write_results("bench_sizes", {"rows": rows, "choice": choice}, lines))


if __name__ == "__main__":
    main()
