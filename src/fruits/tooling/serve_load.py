"""The identify service under load, from this machine: keep-alive clients posting photos, latencies and
errors counted, and an index grown by one photo committed as the index stage commits it. Shared by
`make bench-serve` (benchmarks/serve_bench.py) and the service's swap test; imported by no layer."""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np

from fruits.app.identify import Identifier
from fruits.core.neighbours import NeighbourIndex


def multipart_body(name: str, content: bytes) -> tuple[bytes, str]:
    """(body, content type) of a POST /identify with this photo."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"photo\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def commit_grown_index(cfg, identifier: Identifier, content: bytes, label: str, base: NeighbourIndex | None = None) -> str:
    """Commit, as the index stage does (a whole file renamed into place), the index at
    env.paths.knn_index (or base) plus this photo as a Training image of label; its version."""
    index = base or NeighbourIndex.load(cfg.env.paths.knn_index)
    vector = identifier.vector(content).astype(np.float32)
    name = f"Training/{label}/contributed_{uuid.uuid4().hex}.jpg"
    replace(index, vectors=np.vstack([index.vectors, vector]), labels=np.append(index.labels, label),
            paths=np.append(index.paths, name)).save(cfg.env.paths.knn_index)
    return hashlib.sha256(Path(cfg.env.paths.knn_index).read_bytes()).hexdigest()[:12]


def client(port: int, bodies: list[tuple[bytes, str]], count: int, deadline: float, latencies: list, errors: list) -> None:
    """One client with a keep-alive connection: a failed request (a status other than 200, or a broken
    connection) is counted, said, and the client goes on with a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for i in range(count):
        if time.monotonic() > deadline:
            break
        body, content_type = bodies[i % len(bodies)]
        started = time.perf_counter()
        try:
            connection.request("POST", "/identify", body, {"Content-Type": content_type})
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as err:
            errors.append(repr(err))
            print(f"  request failed: {err!r}", flush=True)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            errors.append(response.status)
            print(f"  HTTP {response.status}: {answer[:300]!r}", flush=True)
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
    ms = np.array(latencies or [float("nan")]) * 1000  # nan: every request failed
    row = {"clients": clients, "requests": len(latencies), "errors": len(errors), "seconds": round(wall, 2),
           "requests_per_second": round(len(latencies) / wall, 1), "p50_ms": round(float(np.percentile(ms, 50)), 1),
           "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}
    print(f"  {clients} client(s): {row['requests']} requests, {row['requests_per_second']} req/s, "
          f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, {row['errors']} errors", flush=True)
    return row
