"""Growth, measured: `make bench-growth`.

1. Incremental featurize: a full run on the sample, then +1 % and +10 % more images, each run
   incremental, then a from-scratch run on the grown set (all in one warm Spark session).
2. Listing + accounting at 10k and 100k input files (tiny generated files): Spark's metadata listing
   and the streaming walk for the files Spark skips; wall time and peak RSS of the driver (the Python
   process and its JVM), to show that driver memory does not grow with a Python list of the files.

Writes reports/growth_bench.json and reports/growth_bench.md. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from fruits.core.config import load_config
from fruits.core.spark import get_session
from fruits.core.storage import Storage, iter_files
from fruits.stages import featurize, sample, weights
from fruits.core.listing import image_files, walk
from fruits.core.listing import listing as listing_rows
from measure import PeakRss

ROOT = Path("bench/growth")


def incremental(spark, base_overrides: list[str]) -> list[dict]:
    cfg = load_config([*base_overrides, f"env.paths.root={ROOT}", f"data.root={ROOT}/sample"])
    sample.run(cfg)
    if not Path(cfg.env.paths.weights).exists():
        weights.run(cfg)
    images = sorted(Path(cfg.data.root).rglob("*.jpg"))
    for table in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(table, ignore_errors=True)
    rows = []

    def measured(label: str, target_cfg) -> None:
        started = time.perf_counter()
        metrics = featurize.run(target_cfg, spark)
        seconds = time.perf_counter() - started
        rows.append({"run": label, "images": metrics["images"], "computed": metrics["run"]["computed"],
                     "reused": metrics["run"]["reused"], "seconds": round(seconds, 2)})
        print(f"  {label:<34} {metrics['images']:6d} images, {metrics['run']['computed']:5d} computed, "
              f"{seconds:6.1f} s", flush=True)

    featurize.run(cfg, spark)  # warm-up: JVM, workers, TensorFlow, model build
    shutil.rmtree(cfg.env.paths.features)
    shutil.rmtree(cfg.env.paths.rejects)
    measured("full run", cfg)
    for share in (0.01, 0.10):
        count = max(1, round(len(images) * share))
        for i, source in enumerate(images[:count]):
            shutil.copy(source, source.with_name(f"grown_{share}_{i}.jpg"))
        measured(f"incremental, +{share:.0%} ({count} images)", cfg)
    fresh = load_config([*base_overrides, f"env.paths.root={ROOT}/fresh", f"data.root={ROOT}/sample",
                         f"env.paths.weights={cfg.env.paths.weights}", f"env.paths.provenance={cfg.env.paths.provenance}"])
    shutil.rmtree(fresh.env.paths.root, ignore_errors=True)  # from scratch: no table of an earlier bench
    measured("from scratch, grown set", fresh)
    return rows


def listing(spark, counts: list[int]) -> list[dict]:
    rows = []
    for count in counts:
        folder = ROOT / f"listing-{count}"
        if not folder.exists():
            for i in range(count):
                path = folder / "Training" / f"L{i % 100}" / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"x")
        cfg = load_config([f"data.root={folder}"])
        with PeakRss() as rss:
            started = time.perf_counter()
            listed = listing_rows(image_files(spark, cfg.env.paths.images, cfg.data.extensions)).count()
            unreadable = walk(iter_files(cfg.env.paths.images, Storage.of(cfg), cfg.data.extensions)).unreadable
            seconds = time.perf_counter() - started
        rows.append({"files": count, "listed_by_spark": listed, "skipped_by_spark": len(unreadable),
                     "seconds": round(seconds, 2), "driver_python_peak_rss_mib": round(rss.peak_python / 2**20),
                     "driver_jvm_peak_rss_mib": round(rss.peak_jvm / 2**20)})
        print(f"  listing {count:7d} files: {seconds:6.1f} s, python {rows[-1]['driver_python_peak_rss_mib']} MiB, "
              f"JVM {rows[-1]['driver_jvm_peak_rss_mib']} MiB", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listing", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.input_size=160")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    spark = get_session(cfg)
    print(f"{os.cpu_count()} cores, master {cfg.env.spark.master}, {cfg.model.input_size} px")
    result = {"incremental": incremental(spark, args.overrides), "listing": listing(spark, args.listing)}
    out = Path("reports")
    (out / "growth_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| run | images | computed | reused | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['run']} | {r['images']} | {r['computed']} | {r['reused']} | {r['seconds']} |" for r in result["incremental"]]
    lines += ["", "| input files | listed by Spark | skipped (walk) | seconds | driver Python peak RSS (MiB) | driver JVM peak RSS (MiB) |",
              "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['files']} | {r['listed_by_spark']} | {r['skipped_by_spark']} | {r['seconds']} | "
              f"{r['driver_python_peak_rss_mib']} | {r['driver_jvm_peak_rss_mib']} |" for r in result["listing"]]
    (out / "growth_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
