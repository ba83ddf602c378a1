"""Featurize speed against honest ceilings, one run, the same images: `make bench`.

Ceilings (no Spark), per engine, on all cores: the best of one process with N threads and N processes
with one thread each, for
- the model alone (images decoded beforehand, in memory);
- decode + model from the JPEG bytes in memory (the composite end-to-end ceiling featurize can reach);
and decode alone per core (Pillow: decode, resize, scale), the FLOP bound (the model's FLOPs per image
against the float32 matrix-multiply throughput numpy reaches on all cores), the Keras `predict` loop.

Spark, per engine: featurize cold, as `dvc repro` runs it (the stage as its own process: Python, JVM
and workers start, the model is built); then, in a fresh session, a first run and --rounds warm runs,
each from empty tables (featurize is incremental: a second run would reuse everything) and each
paired with the composite ceiling (N processes x 1 thread, as Spark runs) measured just before it:
this machine's speed drifts by 10 % and more between minutes, so a ratio is taken within a pair, and
the median of the pairs reported. Then the peak RSS of each Python worker,
and the naive recipe (the model rebuilt for every Arrow batch). Last, the engines interleaved: one
session holding both models, --rounds rounds of each engine's composite and warm featurize back to
back, the engines' order alternating: the ratio between the engines, free of the drift between the
two sessions above.

Writes reports/bench.json, reports/bench.md and reports/bench.png. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from fruits.core import backbone as model
from fruits.core import engines, listing
from fruits.core.images import prepare_batch
from fruits.stages import featurize
from measure import bench_sample, run_stage

ENGINES = tuple(engines.ENGINES)


def timed(label: str, images: int, work) -> dict:
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    print(f"  {label:<44} {images / seconds:7.1f} img/s  ({seconds:.1f} s)", flush=True)
    return {"run": label, "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 2)}


def build(engine: str, cfg_values: dict, threads: int):
    """The engine's extractor, from its payload, as featurize and the app build it."""
    chosen, cfg = engines.engine(engine), cfg_values["cfg"]
    return chosen.build(chosen.payload(cfg), cfg.model.input_size, cfg.model.alpha, threads)


def ceiling_worker(engine, cfg_values, threads, files, decode_in_loop, barrier, results) -> None:
    """One process of a ceiling run: build the engine, load (and for model-only, decode) its share
    before the start line, then time its batches."""
    size, batch = cfg_values["size"], cfg_values["batch"]
    extract = build(engine, cfg_values, threads)
    contents = [Path(f).read_bytes() for f in files]
    arrays = None if decode_in_loop else prepare_batch(contents, size)
    extract(np.zeros((batch, size, size, 3), np.float32))  # warm-up: tracing, allocations
    barrier.wait()
    started = time.time()
    for start in range(0, len(files), batch):
        if decode_in_loop:
            extract(prepare_batch(contents[start : start + batch], size))
        else:
            extract(arrays[start : start + batch])
    results.put((started, time.time(), len(files), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def ceiling(engine: str, cfg_values: dict, files: list[Path], processes: int, threads: int, decode: bool) -> dict:
    """Images per second of `processes` processes x `threads` threads, timed from a common start."""
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    shares = [[str(f) for f in files[i::processes]] for i in range(processes)]
    workers = [context.Process(target=ceiling_worker, args=(engine, cfg_values, threads, share, decode, barrier, results))
               for share in shares]
    for worker in workers:
        worker.start()
    done = [results.get(timeout=900) for _ in workers]
    for worker in workers:
        worker.join()
    seconds = max(end for _, end, _, _ in done) - min(start for start, _, _, _ in done)
    images = sum(n for _, _, n, _ in done)
    label = f"{'decode+model' if decode else 'model only'} {engine} ({processes} proc x {threads} thr)"
    print(f"  {label:<44} {images / seconds:7.1f} img/s  ({seconds:.1f} s)", flush=True)
    return {"run": label, "engine": engine, "decode": decode, "processes": processes, "threads": threads,
            "images": images, "seconds": round(seconds, 3), "images_per_second": round(images / seconds, 2),
            "peak_rss_mib": round(max(rss for *_, rss in done) / 1024)}


def decode_per_core(files: list[Path], size: int, batch: int) -> dict:
    """Decode, resize and scale on one core, in featurize's batches, each dropped once made as the
    model would consume it (keeping all 1,920 arrays, 1.1 GB, timed the page faults: half the rate)."""
    contents = [f.read_bytes() for f in files]

    def decode_all():
        for start in range(0, len(contents), batch):
            prepare_batch(contents[start : start + batch], size)

    return timed("decode + resize (1 core)", len(contents), decode_all)


def keras_predict_loop(files: list[Path], cfg) -> dict:
    size, batch = cfg.model.input_size, cfg.featurize.batch_size
    keras_model = model.build_backbone(size, cfg.model.alpha)
    keras_model.set_weights(model.load_weight_arrays(cfg.env.paths.weights, size, cfg.model.alpha))
    keras_model.predict(np.zeros((batch, size, size, 3), np.float32), verbose=0)

    def loop():
        for start in range(0, len(files), batch):
            keras_model.predict(prepare_batch([f.read_bytes() for f in files[start : start + batch]], size), verbose=0)

    return timed("keras predict loop (1 process)", len(files), loop)


def model_flops(input_size: int, alpha: float) -> int:
    """Floating-point operations of one image through the backbone: 2 x the multiply-adds of its
    convolutions (batch norms folded, activations and pooling neglected)."""
    keras = model.import_keras()
    backbone = model.build_backbone(input_size, alpha)
    total = 0
    for layer in backbone.layers:
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            height, width = layer.output.shape[1:3]
            kernel_h, kernel_w = layer.kernel_size
            channels_in = layer.input.shape[-1]
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                macs = height * width * kernel_h * kernel_w * channels_in * layer.depth_multiplier
            else:
                macs = height * width * kernel_h * kernel_w * channels_in * layer.filters
            total += 2 * macs
    return int(total)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of numpy's matrix multiply on all cores: the practical arithmetic peak."""
    a, b = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    a @ b
    best = min(timed_seconds(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed_seconds(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def naive_udf(broadcast, cfg):
    """The recipe to avoid: build the model for every batch."""
    from pyspark.sql.functions import pandas_udf

    size, alpha = cfg.model.input_size, cfg.model.alpha

    @pandas_udf("array<float>")
    def rebuild_every_batch(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        for contents in batches:
            backbone = model.build_backbone(size, alpha)
            backbone.set_weights(broadcast.value)
            arrays = prepare_batch(contents, size)
            yield pd.Series(list(backbone(arrays, training=False).numpy()))

    return rebuild_every_batch


def worker_peak_rss_mib(pids) -> dict[str, int]:
    """Peak resident memory (VmHWM) of each Spark Python worker still alive (workers are reused)."""
    peaks = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        peaks[str(pid)] = round(int(line.split()[1]) / 1024)
    return peaks


def empty_tables(cfg) -> None:
    """Featurize is incremental: a run timed from scratch starts without its tables."""
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(table, ignore_errors=True)


def featurize_cold(files: list[Path], engine_cfg) -> dict:
    """The stage as `dvc repro` runs it: its own process (Python, JVM and workers started, the model
    built), from empty tables, timed from the process's start to its end."""
    empty_tables(engine_cfg)
    params = Path(engine_cfg.env.paths.root) / f"params-cold-{engine_cfg.model.engine}.yaml"
    OmegaConf.save(engine_cfg, params)
    return timed(f"spark featurize {engine_cfg.model.engine} (cold: own process)", len(files),
                 lambda: run_stage("featurize", params))


def spark_runs(files: list[Path], cfg, values: dict, rounds: int) -> tuple[list[dict], dict]:
    """Per engine: featurize cold, as its own process; then, in a fresh Spark session, a first run
    (its workers start and build the model; the JVM is warm from the run before it but for the first
    engine) and `rounds` rounds of (the composite ceiling, featurize warm): the module docstring says
    why they are paired."""
    from fruits.core.spark import get_session

    results, rss, cores = [], {}, os.cpu_count()
    for engine in ENGINES:
        engine_cfg = cfg.copy()
        engine_cfg.model.engine = engine
        results.append(featurize_cold(files, engine_cfg))
        # A fresh session per engine (new Python workers, their own memory), started as featurize starts its own.
        spark = get_session(cfg, cfg.env.spark.get("featurize_java_options"))
        pids = set()

        def from_scratch():
            empty_tables(engine_cfg)
            pids.update(featurize.run(engine_cfg, spark)["model_builds_per_worker"])

        results.append(timed(f"spark featurize {engine} (first run in the session)", len(files), from_scratch))
        for number in range(1, rounds + 1):
            paired = ceiling(engine, values, files, cores, 1, True)
            paired["run"] += f", round {number}"
            results += [{**paired, "paired": True},
                        timed(f"spark featurize {engine} (warm, round {number})", len(files), from_scratch)]
        rss[engine] = worker_peak_rss_mib(pids)
        print(f"  peak RSS per Python worker, {engine}: {rss[engine]} MiB", flush=True)
        if engine == "tensorflow":
            tf_cfg = engine_cfg
            broadcast, _ = featurize.broadcast_weights(spark, tf_cfg)
            spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(cfg.featurize.batch_size))
            images = listing.contents(listing.image_files(spark, tf_cfg.env.paths.images, tf_cfg.data.extensions))
            udf = naive_udf(broadcast, tf_cfg)
            results.append(timed("spark naive tensorflow (rebuild/batch)", len(files),
                                 lambda: images.select(udf("content")).write.mode("overwrite").format("noop").save()))
        spark.stop()
    return results, rss


def engines_interleaved(files: list[Path], cfg, values: dict, rounds: int) -> tuple[list[dict], dict]:
    """The engines' ratio without the drift between the two sessions of spark_runs (minutes apart):
    one session, both models warm in each worker, then `rounds` rounds that run each engine's
    composite ceiling and warm featurize back to back, the engines' order alternating."""
    from fruits.core.spark import get_session

    spark, cores, rows = get_session(cfg, cfg.env.spark.get("featurize_java_options")), os.cpu_count(), []
    engine_cfgs = {engine: cfg.copy() for engine in ENGINES}
    for engine, engine_cfg in engine_cfgs.items():
        engine_cfg.model.engine = engine

    def from_scratch(engine):
        empty_tables(cfg)
        featurize.run(engine_cfgs[engine], spark)

    for engine in ENGINES:  # warm-up: each worker builds both models (not reported)
        from_scratch(engine)
    featurize_ratios, composite_ratios = [], []
    for number in range(1, rounds + 1):
        rate = {}
        for engine in ENGINES if number % 2 else reversed(ENGINES):
            composite = ceiling(engine, values, files, cores, 1, True)
            composite["run"] = f"interleaved: {composite['run']}, round {number}"
            warm = timed(f"interleaved: spark featurize {engine} (warm, round {number})", len(files),
                         lambda engine=engine: from_scratch(engine))
            rows += [{**composite, "interleaved": True}, {**warm, "engine": engine, "interleaved": True}]
            rate[engine] = (warm["images_per_second"], composite["images_per_second"])
        featurize_ratios.append(round(rate["onnxruntime"][0] / rate["tensorflow"][0], 3))
        composite_ratios.append(round(rate["onnxruntime"][1] / rate["tensorflow"][1], 3))
    spark.stop()
    summary = {"featurize_ratio_rounds": featurize_ratios, "featurize_ratio": statistics.median(featurize_ratios),
               "composite_ratio_rounds": composite_ratios, "composite_ratio": statistics.median(composite_ratios)}
    print(f"  interleaved onnxruntime / tensorflow: featurize {featurize_ratios}, composite {composite_ratios}",
          flush=True)
    return rows, summary


def summarise(rows: list[dict], rss: dict, interleaved: dict, flops: int, peak_gflops: float, cores: int) -> dict:
    rate = {row["run"]: row["images_per_second"] for row in rows}
    per_engine = {}
    for engine in ENGINES:
        model_only = max(r["images_per_second"] for r in rows if r.get("engine") == engine and r.get("decode") is False)
        composite = max(r["images_per_second"] for r in rows
                        if r.get("engine") == engine and r.get("decode") and not r.get("paired")
                        and not r.get("interleaved"))
        paired = [r["images_per_second"] for r in rows if r.get("engine") == engine and r.get("paired")]
        warm = [rate[f"spark featurize {engine} (warm, round {n})"] for n in range(1, len(paired) + 1)]
        ratios = [round(w / c, 3) for w, c in zip(warm, paired, strict=True)]
        cold = rate[f"spark featurize {engine} (cold: own process)"]
        per_engine[engine] = {
            "model_ceiling": model_only, "composite_ceiling": composite,
            "composite_ceiling_paired_median": statistics.median(paired), "featurize_warm_rounds": warm,
            "featurize_warm": statistics.median(warm), "featurize_cold": cold,
            "featurize_warm_vs_composite_rounds": ratios,
            "featurize_warm_vs_composite": statistics.median(ratios),
            "cold_vs_warm": round(cold / statistics.median(warm), 3),
            "peak_rss_per_worker_mib": max(rss[engine].values(), default=None),
        }
    decode = rate["decode + resize (1 core)"]
    return {
        "per_engine": per_engine,
        "decode_per_core": decode,
        "decode_all_cores_bound": round(decode * cores, 1),
        "flops_per_image": flops,
        "matmul_peak_gflops": round(peak_gflops, 1),
        "flop_bound_images_per_second": round(peak_gflops * 1e9 / flops, 1),
        "onnxruntime_vs_tensorflow_featurize": round(per_engine["onnxruntime"]["featurize_warm"] /
                                                    per_engine["tensorflow"]["featurize_warm"], 2),
        "onnxruntime_vs_tensorflow_featurize_cold": round(per_engine["onnxruntime"]["featurize_cold"] /
                                                         per_engine["tensorflow"]["featurize_cold"], 2),
        "featurize_vs_naive": round(per_engine["tensorflow"]["featurize_warm"] /
                                    rate["spark naive tensorflow (rebuild/batch)"], 2),
        "interleaved": interleaved,
    }


def plot(rows: list[dict], summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["run"] for row in rows]
    values = [row["images_per_second"] for row in rows]
    figure, axes = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
    colours = ["tab:orange" if "onnxruntime" in label else "tab:blue" if "tensorflow" in label else "tab:gray"
               for label in labels]
    axes.barh(labels, values, color=colours)
    axes.axvline(summary["flop_bound_images_per_second"], color="black", linestyle="--", label="FLOP bound")
    axes.axvline(summary["decode_all_cores_bound"], color="tab:green", linestyle=":", label="decode bound (all cores)")
    axes.invert_yaxis()
    axes.set_xlabel("images per second (higher is better)")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def markdown(rows: list[dict], summary: dict, header: str) -> str:
    inter = summary["interleaved"]
    lines = [header, "", "| run | img/s | seconds |", "|---|---:|---:|"]
    lines += [f"| {r['run']} | {r['images_per_second']} | {r['seconds']} |" for r in rows]
    lines += ["", "| engine | model ceiling | composite ceiling (first / paired median) | featurize warm (median) | "
              "warm / paired composite (median; rounds) | cold / warm | peak RSS per worker (MiB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for engine, e in summary["per_engine"].items():
        rounds = ", ".join(str(r) for r in e["featurize_warm_vs_composite_rounds"])
        lines.append(f"| {engine} | {e['model_ceiling']} | {e['composite_ceiling']} / "
                     f"{e['composite_ceiling_paired_median']} | {e['featurize_warm']} | "
                     f"{e['featurize_warm_vs_composite']} ({rounds}) | {e['cold_vs_warm']} | "
                     f"{e['peak_rss_per_worker_mib']} |")
    lines += ["", f"Decode + resize: {summary['decode_per_core']} img/s per core. FLOP bound: "
              f"{summary['flops_per_image'] / 1e9:.2f} GFLOP per image against {summary['matmul_peak_gflops']} GFLOP/s "
              f"(numpy float32 matmul, all cores) = {summary['flop_bound_images_per_second']} img/s. onnxruntime / "
              f"TensorFlow featurize (warm) = {summary['onnxruntime_vs_tensorflow_featurize']}, cold "
              f"{summary['onnxruntime_vs_tensorflow_featurize_cold']}; TensorFlow featurize / "
              f"naive = {summary['featurize_vs_naive']}.", "",
              f"Engines interleaved in one session (each featurize just after its composite, the engines' order "
              f"alternating): onnxruntime / TensorFlow featurize {inter['featurize_ratio']} "
              f"({', '.join(map(str, inter['featurize_ratio_rounds']))}); composites {inter['composite_ratio']} "
              f"({', '.join(map(str, inter['composite_ratio_rounds']))}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=192, help="Training images per label: the real sample's photos, turned as needed")
    parser.add_argument("--rounds", type=int, default=3, help="warm featurize runs per engine, each with its paired ceiling")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.input_size=160")
    args = parser.parse_args()
    # The bench's own data and outputs under bench/ (reports/bench.* excepted): one root moves them.
    cfg, files = bench_sample(args.per_label, *args.overrides)
    cores = os.cpu_count()
    header = (f"{len(files)} images at {cfg.model.input_size} px, batch {cfg.featurize.batch_size}, "
              f"master {cfg.env.spark.master}, {cores} cores, {platform.processor() or platform.machine()}")
    print(header, flush=True)
    values = {"cfg": cfg, "size": cfg.model.input_size, "batch": cfg.featurize.batch_size}
    rows = [decode_per_core(files, cfg.model.input_size, cfg.featurize.batch_size)]
    for engine in ENGINES:
        for decode in (False, True):
            rows += [ceiling(engine, values, files, 1, cores, decode), ceiling(engine, values, files, cores, 1, decode)]
    rows.append(keras_predict_loop(files, cfg))
    spark_rows, rss = spark_runs(files, cfg, values, args.rounds)
    interleaved_rows, interleaved = engines_interleaved(files, cfg, values, args.rounds)
    rows += spark_rows + interleaved_rows
    flops, peak = model_flops(cfg.model.input_size, cfg.model.alpha), matmul_peak_gflops()
    summary = summarise(rows, rss, interleaved, flops, peak, cores)
    out = Path("reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"setup": header, "images": len(files), "input_size": cfg.model.input_size,
                                                "cores": cores, "rows": rows, "worker_peak_rss_mib": rss,
                                                **summary}, indent=2) + "\n")
    text = markdown(rows, summary, header)
    (out / "bench.md").write_text(text)
    plot(rows, summary, out / "bench.png")
    print(text)


if __name__ == "__main__":
    main()
