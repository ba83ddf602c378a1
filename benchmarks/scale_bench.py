"""How time and memory grow with the data: `make bench-scale`.

1. ingest, featurize (from empty tables), pca, index and report, each as its own process (as DVC runs them),
   on 1k, 5k and 20k generated images: wall time, and peak RSS of the stage's Python driver and of its
   JVM, sampled every 50 ms.
2. A least-squares line per stage: fixed seconds + seconds per image; for index, + seconds per search pair
   (Test queries answered x Training rows: up to identify.accuracy_queries it answers every Test row).
3. PCA fit + transform of 100k x 1280 synthetic feature vectors, timed, with the driver's memory.
4. From the fits: wall time and cost of featurize + pca + index + report for the full Fruits-360 (2025: 102,639
   images) and for 10M images on EMR (1 primary + 2, 4, 8 m5.xlarge core nodes; cluster start and
   bootstrap included) and on EMR Serverless with as many vCPUs. Prices and assumptions from conf/cluster.

Writes reports/scale_bench.json (the report stage's critique reads its fits), .md and .png.
A benchmark, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fruits.core import tables
from fruits.core.config import load_config
from fruits.core.costs import describe_growth, fit_line, predict_emr, predict_serverless
from fruits.stages import sample, weights
from fruits.core.storage import Storage
from measure import MODELS_PER_POINT, run_stage

ROOT = Path("bench/scale")
STAGES = ("ingest", "featurize", "pca", "index", "report")
PREDICTED_STAGES = ("featurize", "pca", "index", "report")  # on EMR, ingest lists S3 (its upload is a one-off transfer)
FRUITS_360 = 102_639  # images in the 2025 version (155 classes)
CORE_NODES = (2, 4, 8)
LABELS = 10


def config(count: int, overrides: list[str]):
    train = round(count * 0.8 / LABELS)
    # Drawn images: the real sample has 88 photos per label, far fewer than the counts measured here.
    return load_config([f"data.root={ROOT}/images-{count}", f"env.paths.root={ROOT}/{count}",
                        "data.source=conf/data/sources/generate.yaml",
                        f"env.paths.models={ROOT}/models/{MODELS_PER_POINT}", f"data.train_per_label={train}",
                        f"data.test_per_label={count // LABELS - train}", *overrides])


def one_count(count: int, overrides: list[str]) -> list[dict]:
    cfg = config(count, overrides)
    if len(list(Path(cfg.data.root).glob("*/*/*.jpg"))) != count:
        shutil.rmtree(cfg.data.root, ignore_errors=True)
        sample.run(cfg)
    drawn = len(list(Path(cfg.data.root).glob("*/*/*.jpg")))
    if drawn != count:  # a fit over the wrong counts would predict nonsense for 10M images
        raise SystemExit(f"{cfg.data.root} holds {drawn} images, not {count}: the sample stage cannot draw that many "
                         f"from data.source={cfg.data.source}")
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    for table in (cfg.env.paths.features, cfg.env.paths.rejects, cfg.env.paths.pca_vectors):
        shutil.rmtree(table, ignore_errors=True)  # from scratch: featurize would reuse an earlier run
    params = Path(cfg.env.paths.root) / "params.yaml"
    params.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, params)
    rows = []
    for stage in STAGES:
        row = {"images": count, **run_stage(stage, params)}
        if stage == "index":
            row.update(search_sizes(count, overrides))
        rows.append(row)
        print(f"  {count:7,d} images  {stage:<10} {row['seconds']:7.1f} s  python {row['driver_python_peak_rss_mib']:5d} MiB"
              f"  JVM {row['driver_jvm_peak_rss_mib']:5d} MiB", flush=True)
    return rows


def synthetic_pca(rows: int, dimension: int, overrides: list[str]) -> dict:
    """pca on rows x dimension synthetic features (a low-rank signal plus noise, 100 labels, 80 % Training),
    written straight as a committed features table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cfg = load_config([f"env.paths.root={ROOT}/pca-{rows}", f"env.paths.models={ROOT}/pca-{rows}/models", *overrides])
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((64, dimension)).astype(np.float32)
    shutil.rmtree(cfg.env.paths.features, ignore_errors=True)
    version = tables.new_version()
    folder = Path(cfg.env.paths.features) / version
    folder.mkdir(parents=True)
    chunk = 10_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        vectors = np.abs(rng.standard_normal((n, 64)).astype(np.float32) @ basis
                         + 0.1 * rng.standard_normal((n, dimension)).astype(np.float32))
        index = np.arange(start, start + n)
        table = pa.table({
            "path": [f"file:/synthetic/{i}.jpg" for i in index],
            "label": [f"L{i % 100}" for i in index],
            "split": ["Training" if i % 5 else "Test" for i in index],
            "features": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dimension).cast(pa.list_(pa.float32())),
        })
        pq.write_table(table, folder / f"part-{start // chunk:05d}.parquet")
    tables.commit(cfg.env.paths.features, version, Storage.of(cfg))
    params = Path(cfg.env.paths.root) / "params.yaml"
    OmegaConf.save(cfg, params)
    row = {"rows": rows, "dimension": dimension, **run_stage("pca", params)}
    print(f"  pca of {rows:,} x {dimension}: {row['seconds']:.1f} s, python {row['driver_python_peak_rss_mib']} MiB, "
          f"JVM {row['driver_jvm_peak_rss_mib']} MiB", flush=True)
    return row


def search_sizes(count: int, overrides: list[str]) -> dict:
    """The index stage's search, from its metrics: Test rows, those answered, Training rows."""
    metrics = json.loads(Path(config(count, overrides).env.paths.index_diagnostics).read_text())
    return {"test_rows": metrics["test_rows"], "test_rows_answered": metrics.get("test_rows_answered", metrics["test_rows"]),
            "training_vectors": metrics["training_vectors"]}


def fits_of(rows: list[dict], accuracy_queries: int) -> dict:
    """A line per stage through (images, seconds); for the index stage through (search pairs, seconds):
    its accuracy search grows with Test queries x Training rows, not with the images."""
    fits = {}
    for stage in STAGES:
        runs = [r for r in rows if r["stage"] == stage]
        if stage == "index":
            fixed, per_pair = fit_line([r["test_rows_answered"] * r["training_vectors"] for r in runs],
                                       [r["seconds"] for r in runs])
            largest = max(runs, key=lambda r: r["images"])
            fits[stage] = {"fixed_s": round(fixed, 3), "per_pair_s": per_pair,
                           "test_share": round(largest["test_rows"] / largest["images"], 4),
                           "accuracy_queries": accuracy_queries}
            continue
        fixed, per_image = fit_line([r["images"] for r in runs], [r["seconds"] for r in runs])
        fits[stage] = {"fixed_s": round(fixed, 3), "per_image_s": per_image,
                       "images_per_second_marginal": round(1 / per_image, 1) if per_image > 0 else None}
    return fits


def predictions(fits: dict, cores: int, cluster) -> list[dict]:
    chosen = {stage: fits[stage] for stage in PREDICTED_STAGES}
    rows = []
    for images in (FRUITS_360, 10_000_000):
        for nodes in CORE_NODES:
            emr = predict_emr(chosen, cores, images, nodes, cluster)
            serverless = predict_serverless(chosen, cores, images, emr["vcpus"], cluster)
            rows += [emr, serverless]
    return [{**r, "hours": round(r["hours"], 3), "usd": round(r["usd"], 2),
             "stages_s": {k: round(v, 1) for k, v in r["stages_s"].items()}} for r in rows]


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(11, 4))
    for stage in STAGES:
        points = sorted((r["images"], r["seconds"], r["driver_python_peak_rss_mib"], r["driver_jvm_peak_rss_mib"])
                        for r in rows if r["stage"] == stage)
        counts = [p[0] for p in points]
        time_axes.plot(counts, [p[1] for p in points], marker="o", label=stage)
        memory_axes.plot(counts, [p[2] for p in points], marker="o", label=f"{stage} (Python)")
        memory_axes.plot(counts, [p[3] for p in points], marker="x", linestyle="--", label=f"{stage} (JVM)")
    time_axes.set(xlabel="images", ylabel="wall seconds", title="Wall time per stage")
    memory_axes.set(xlabel="images", ylabel="driver peak RSS (MiB)", title="Driver memory per stage")
    time_axes.legend()
    memory_axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def markdown(result: dict) -> str:
    lines = [result["setup"], "", "| images | stage | seconds | driver Python peak RSS (MiB) | driver JVM peak RSS (MiB) |",
             "|---:|---|---:|---:|---:|"]
    lines += [f"| {r['images']:,} | {r['stage']} | {r['seconds']} | {r['driver_python_peak_rss_mib']} | "
              f"{r['driver_jvm_peak_rss_mib']} |" for r in result["runs"]]
    lines += ["", "| stage | fixed (s) | growth | marginal img/s |", "|---|---:|---|---:|"]
    lines += [f"| {stage} | {f['fixed_s']} | {describe_growth(f)}"
              + (f", Test share {f['test_share']}" if "test_share" in f else "")
              + f" | {f.get('images_per_second_marginal', '-')} |" for stage, f in result["fits"].items()]
    p = result["pca_synthetic"]
    lines += ["", f"PCA fit + transform of {p['rows']:,} x {p['dimension']} synthetic vectors: {p['seconds']} s "
              f"(process wall time), driver Python {p['driver_python_peak_rss_mib']} MiB, JVM {p['driver_jvm_peak_rss_mib']} MiB.",
              "", "| images | option | worker vCPUs | " + " | ".join(f"{stage} (s)" for stage in PREDICTED_STAGES)
              + " | hours (start included) | USD |", "|---:|---|---:|" + "---:|" * (len(PREDICTED_STAGES) + 2)]
    lines += [f"| {r['images']:,} | {r['option']} | {r['vcpus']} | "
              + " | ".join(str(r["stages_s"][stage]) for stage in PREDICTED_STAGES) + f" | {r['hours']} | {r['usd']} |"
              for r in result["predictions"]]
    lines += ["", result["assumptions"], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="*", default=[1_000, 5_000, 20_000])
    parser.add_argument("--pca-rows", type=int, default=100_000)
    parser.add_argument("--refit", action="store_true",
                        help="no run: fit and predict again from the runs in reports/scale_bench.json (after a "
                             "change of prices or of the fit)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.engine=tensorflow")
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    cfg = load_config(args.overrides)
    out = Path("reports")
    if args.refit:
        measured = json.loads((out / "scale_bench.json").read_text())
        setup, cores, runs, pca_row = (measured[key] for key in ("setup", "cores", "runs", "pca_synthetic"))
        for row in runs:  # runs recorded before the search sizes were: from the index metrics left beside them
            if row["stage"] == "index" and "training_vectors" not in row:
                row.update(search_sizes(row["images"], args.overrides))
    else:
        cores = os.cpu_count()
        setup = (f"{cores} cores ({platform.processor() or platform.machine()}), master {cfg.env.spark.master}, "
                 f"engine {cfg.model.engine}, {cfg.model.input_size} px {cfg.model.precision}, each stage its own process (as under DVC)")
        print(setup, flush=True)
        runs = [row for count in args.counts for row in one_count(count, args.overrides)]
        pca_row = synthetic_pca(args.pca_rows, 1280, args.overrides)
    fits = fits_of(runs, cfg.identify.accuracy_queries)
    prices = cfg.cluster.prices
    result = {
        "setup": setup, "cores": cores, "runs": runs, "fits": fits,
        "pca_synthetic": pca_row,
        "predictions": predictions(fits, cores, cfg.cluster),
        "assumptions": (f"Growth (per image; index: per search pair, its queries capped at "
                        f"identify.accuracy_queries={cfg.identify.accuracy_queries}, Test share as in the bench's data) "
                        f"measured on {cores} local cores, spread over the worker vCPUs (one vCPU = "
                        f"{prices.vcpu_speed_vs_local_core} local core, an assumption); fixed costs as measured here. "
                        f"EMR: cluster start + bootstrap {prices.startup_hours} h (assumption), EC2 + EMR list prices from "
                        f"conf/cluster (2025). Serverless: {prices.serverless.vcpu_hour} USD/vCPU-h and "
                        f"{prices.serverless.gb_hour} USD/GB-h ({prices.serverless.source}), "
                        f"{prices.serverless.gb_per_vcpu} GB per vCPU, driver billed, start-up {prices.serverless.startup_minutes} "
                        "min (assumption). ingest is left out: on EMR it lists S3, and the upload is a one-off transfer."),
    }
    (out / "scale_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "scale_bench.md").write_text(markdown(result))
    plot(runs, out / "scale_bench.png")
    print(markdown(result))


if __name__ == "__main__":
    main()
