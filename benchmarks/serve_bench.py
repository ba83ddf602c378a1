"""The identify service under load, on loopback: `make bench-serve` (after `make demo`).

Starts `python -m fruits.app.service` (uvicorn, identify.workers processes) on a free port, then sends
the sample's Test photos as POST /identify from 1 and from 8 concurrent clients (each a thread with its
own keep-alive connection), bounded in count and time: requests/s, p50 / p99 / max latency, errors.
Writes reports/serve_bench.json and .md. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np

from fruits.core.config import load_config
from measure import write_results


def multipart(photo: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{photo.name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + photo.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def client(port: int, bodies: list[tuple[bytes, str]], count: int, deadline: float, latencies: list, errors: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(count):
        if time.monotonic() > deadline:
            break
        body, content_type = bodies[i % len(bodies)]
        started = time.perf_counter()
        connection.request("POST", "/identify", body, {"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            errors.append(response.status)
    connection.close()


def load(port: int, bodies, clients: int, requests: int, seconds: float) -> dict:
    latencies, errors = [], []
    deadline = time.monotonic() + seconds
    threads = [threading.Thread(target=client, args=(port, bodies, requests // clients, deadline, latencies, errors))
               for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    row = {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(wall, 2),
           "requests_per_second": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
           "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}
    print(f"  {clients} client(s): {row['requests']} requests, {row['requests_per_second']} req/s, "
          f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['errors']} errors", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per load level")
    parser.add_argument("--seconds", type=float, default=60, help="at most, per load level")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. identify.workers=1")
    args = parser.parse_args()
    cfg = load_config(args.overrides)
    photos = sorted(Path(cfg.data.root).glob("Test/*/*.jpg"))
    if not photos:
        raise SystemExit(f"no Test photos under {cfg.data.root}: run `make demo` first")
    bodies = [multipart(p) for p in photos]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fruits.app.service", f"identify.port={port}", *args.overrides],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        load(port, bodies, 1, 20, 30)  # warm-up: every worker's first calls
        rows = [load(port, bodies, clients, args.requests, args.seconds) for clients in (1, 8)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    setup = (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {cfg.identify.workers} uvicorn "
             f"workers, engine {cfg.model.engine}, {cfg.model.input_size} px, {len(photos)} distinct Test photos")
    lines = [setup, "", "| clients | requests | req/s | p50 (ms) | p99 (ms) | max (ms) | errors |", "|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['requests']} | {r['requests_per_second']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['max_ms']} | {r['errors']} |" for r in rows]
    print(write_results("serve_bench", {"setup": setup, "rows": rows}, lines))


if __name__ == "__main__":
    main()
