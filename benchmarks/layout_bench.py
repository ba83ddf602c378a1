"""Loose files vs Parquet shards, featurize's input stage on the same images: `make bench-layout`.

Generates N images (20,000 by default; a few hundred drawn, the rest copies of them, which reading does
not mind), packs them into shards with the ingest stage, then reads path + content with Spark both ways
(what featurize reads before the model): seconds, tasks, files opened. Adds the S3 arithmetic for
100k and 10M images (LIST/GET requests, their cost from the prices in conf/cluster, the GET latency
paid per image). Writes reports/layout_bench.json and .md. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

from fruits.core.config import load_config
from fruits.core.costs import s3_reads
from fruits.core.spark import get_session
from fruits.core.storage import SHARD_GLOB
from fruits.stages import ingest
from fruits.core.listing import image_reader
from fruits.stages.sample import draw_fruit

ROOT = Path("bench/layout")
DRAWN = 400


def generate(root: Path, count: int, labels: list[str]) -> None:
    if len(list(root.rglob("*.jpg"))) == count:
        return
    shutil.rmtree(root, ignore_errors=True)
    drawn = []
    for i in range(DRAWN):
        buffer = io.BytesIO()
        draw_fruit(labels[i % len(labels)], i).save(buffer, "JPEG", quality=95)
        drawn.append(buffer.getvalue())
    for i in range(count):
        label = labels[i % len(labels)]
        path = root / ("Training" if i % 4 else "Test") / label / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(drawn[i % DRAWN])


def read(label: str, frame, files: int) -> dict:
    from pyspark.sql import functions as F

    started = time.perf_counter()
    images, content_bytes = frame.agg(F.count("path"), F.sum(F.length("content"))).first()
    seconds = time.perf_counter() - started
    row = {"layout": label, "images": images, "bytes": content_bytes, "seconds": round(seconds, 2),
           "tasks": frame.rdd.getNumPartitions(), "files_opened": files}
    print(f"  {label:<8} {images} images, {seconds:6.2f} s, {row['tasks']} tasks, {files} files opened", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    args = parser.parse_args()
    cfg = load_config([f"env.paths.root={ROOT}", f"data.root={ROOT}/images", "data.layout=parquet"])
    generate(Path(cfg.data.root), args.images, list(cfg.data.labels))
    shutil.rmtree(cfg.env.paths.shards, ignore_errors=True)
    started = time.perf_counter()
    packed = ingest.run(cfg)
    pack_seconds = time.perf_counter() - started
    spark = get_session(cfg)
    shards = sorted(Path(cfg.env.paths.shards).glob(SHARD_GLOB))
    rows = []
    for _ in range(2):  # the second round is warm (page cache, JVM): the one reported
        rows = [read("files", image_reader(spark, cfg.data.extensions).load(cfg.data.root).select("path", "content"), args.images),
                read("parquet", spark.read.parquet(f"{cfg.env.paths.shards}/{SHARD_GLOB}").select("path", "content"),
                     len(shards))]
    mean_bytes = packed["bytes"] / packed["images"]
    prices = cfg.cluster.prices.s3
    s3 = [row for n in (100_000, 10_000_000) for row in s3_reads(n, mean_bytes, cfg.data.shard_mb, prices)]
    result = {"images": args.images, "mean_image_bytes": round(mean_bytes), "shards": len(shards),
              "shard_mb": cfg.data.shard_mb, "pack_seconds": round(pack_seconds, 1), "reads": rows, "s3": s3,
              "s3_prices": dict(prices)}
    out = Path("reports")
    (out / "layout_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"{args.images} images of {mean_bytes / 1024:.1f} KiB on average, {len(shards)} shard(s) of up to "
             f"{cfg.data.shard_mb} MB (packed in {pack_seconds:.1f} s by ingest).", "",
             "| layout | images | seconds (warm) | tasks | files opened |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['images']} | {r['seconds']} | {r['tasks']} | {r['files_opened']} |" for r in rows]
    lines += ["", f"Reading once from S3 (prices: {prices.source}; GET latency {prices.first_byte_ms} ms assumed):", "",
              "| images | layout | LIST | GET | cost (USD) | GET latency per image (ms) |", "|---:|---|---:|---:|---:|---:|"]
    lines += [f"| {r['images']:,} | {r['layout']} | {r['list_requests']:,} | {r['get_requests']:,} | {r['usd']:.4f} | "
              f"{r['latency_ms_per_image']:.3f} |" for r in s3]
    (out / "layout_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
