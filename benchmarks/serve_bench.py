"""The identify service under load, on loopback: `make bench-serve` (after `make demo`).

Starts `python -m fruits.app.service` (uvicorn, identify.workers processes) on a free port, then sends
the sample's Test photos as POST /identify from 1 and from 8 concurrent clients (each a thread with its
own keep-alive connection), bounded in count and time: requests/s, p50 / p99 / max latency, errors;
for each, before, during and after a swap to a newly committed index (one more image: the service
serves a copy of the index, the pipeline's own is never touched). Writes reports/serve_bench.json and .md. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path


from fruits.app.identify import Identifier
from fruits.core.config import load_config
from fruits.tooling.serve_load import commit_grown_index, load, multipart_body
from measure import write_results


def swap_rows(port: int, bodies, clients: int, requests: int, seconds: float, commit) -> list[dict]:
    """The load before, during and after a swap: the middle window has `commit` called 1 s into it."""
    before = {"phase": "before", **load(port, bodies, clients, requests, seconds)}
    during = {}
    loader = threading.Thread(target=lambda: during.update(load(port, bodies, clients, requests, seconds)))
    loader.start()
    time.sleep(1)
    commit()
    loader.join()
    return [before, {"phase": "during a swap", **during}, {"phase": "after", **load(port, bodies, clients, requests, seconds)}]


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
    bodies = [multipart_body(p.name, p.read_bytes()) for p in photos]
    served = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "knn_index.npz"  # the swaps never touch the pipeline's
    shutil.copy(cfg.env.paths.knn_index, served)
    overrides = [*args.overrides, f"env.paths.knn_index={served}", "identify.index_poll_seconds=0.5"]
    cfg = load_config(overrides)
    identifier = Identifier(cfg)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fruits.app.service", f"identify.port={port}", *overrides],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        load(port, bodies, 1, 20, 30)  # warm-up: every worker's first calls
        rows = []
        for clients in (1, 8):  # each swap adds one image (a Test photo as a new label), as the index stage would
            commit = partial(commit_grown_index, cfg, identifier, photos[clients].read_bytes(), f"Bench {clients}")
            rows += [{"clients": clients, **row} for row in swap_rows(port, bodies, clients, args.requests, args.seconds, commit)]
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(served.parent)
    setup = (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {cfg.identify.workers} uvicorn "
             f"workers, engine {cfg.model.engine}, {cfg.model.input_size} px, {len(photos)} distinct Test photos; "
             f"{len(identifier.current.index.vectors)} index vectors, each worker polling every 0.5 s")
    lines = [setup, "", "| clients | phase | requests | req/s | p50 (ms) | p99 (ms) | max (ms) | errors |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['clients']} | {r['phase']} | {r['requests']} | {r['requests_per_second']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['max_ms']} | {r['errors']} |" for r in rows]
    print(write_results("serve_bench", {"setup": setup, "rows": rows}, lines))


if __name__ == "__main__":
    main()
