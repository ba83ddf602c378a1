"""From `make approve` to an answerable photo: part of `make bench-serve`.

Works in a clone of the last commit (the workspace, its data and its contributions are never touched):
1. `dvc repro` there: the demo pipeline, timed as the starting point;
2. the service started there (`python -m fruits.app.service`: identify.workers uvicorn processes, each
   looking at its index every identify.index_poll_seconds);
3. for N = 1, then 100: N generated photos (drawn like the sample's, not real ones) stored as
   contributions of a new label by the app's store (as POST /contributions stores them; over HTTP the
   per-client rate limit would refuse 100), then timed: `python -m fruits.app.contributions approve
   IDS` (what `make approve` runs), `dvc repro` stage by stage (sample copies them, featurize computes
   them alone, pca, index, report), and until the service answers the new label for three of the
   photos (asked every 0.5 s from the approval on): the swap is the time from the index stage's end.
Writes reports/approve_bench.json and .md. A benchmark: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from fruits.app.contributions import ContributionStore
from fruits.core.config import PROJECT_ROOT, load_config
from fruits.stages.sample import draw_fruit
from measure import write_results
from serve_bench import multipart_body

STAGE_LINE = re.compile(r"Running stage '([\w-]+)'")


def repro(clone: Path, env: dict) -> dict:
    """`dvc repro` in the clone: its wall seconds and each stage's, from when its line appeared."""
    started = time.perf_counter()
    marks: list[tuple[str, float]] = []
    process = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if found := STAGE_LINE.search(line):
            marks.append((found.group(1), time.perf_counter()))
    if process.wait():
        raise RuntimeError("dvc repro failed:\n" + "".join(output)[-3000:])
    ended = time.perf_counter()
    ends = dict(zip([name for name, _ in marks], [t for _, t in marks[1:]] + [ended]))
    return {"seconds": round(ended - started, 1), "index_committed_at": ends.get("index", ended),
            "stages": {name: round(ends[name] - begun, 1) for name, begun in marks}}


def answer(port: int, content: bytes) -> dict:
    body, content_type = multipart_body("photo.jpg", content)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/identify", body, {"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


class Poller(threading.Thread):
    """Asks the service about photos every half second (one photo a time, all of them once it gets
    label) until it answers label for each: when that first happened."""

    def __init__(self, port: int, photos: list[bytes], label: str):
        super().__init__(daemon=True)
        self.port, self.photos, self.label = port, photos, label
        self.answered_at: float | None = None
        self.last = None  # the last answer or error: what the bench says if the label never comes
        self.stop = threading.Event()

    def answers(self, photo: bytes) -> bool:
        try:
            got = answer(self.port, photo)
        except OSError as err:  # said at the end; the service may be between workers' restarts
            self.last = repr(err)
            return False
        self.last = {key: got[key] for key in ("label", "confidence", "sure", "index_version")}
        return got["label"] == self.label

    def run(self) -> None:
        while not self.stop.wait(0.5):
            if self.answers(self.photos[0]) and all(self.answers(photo) for photo in self.photos[1:]):
                self.answered_at = time.perf_counter()
                return


def contribute_and_approve(clone: Path, env: dict, port: int, count: int, label: str, seed: int) -> dict:
    store = ContributionStore(load_config())  # the clone's params.yaml: the working folder is the clone
    photos = []
    for number in range(count):
        buffer = io.BytesIO()
        draw_fruit(label, seed + number).save(buffer, format="JPEG", quality=90)  # a look of its own: a new fruit
        photos.append(buffer.getvalue())
    ids = [store.add(photo, label, {"label": "unknown", "confidence": 0.0})[0]["id"] for photo in photos]
    poller = Poller(port, [photos[0], photos[len(photos) // 2], photos[-1]], label)
    started = time.perf_counter()
    poller.start()
    subprocess.run([sys.executable, "-m", "fruits.app.contributions", "approve", *ids], cwd=clone, env=env,
                   check=True, capture_output=True)
    approve_seconds = time.perf_counter() - started
    rebuilt = repro(clone, env)
    index_committed_at = rebuilt.pop("index_committed_at")
    poller.join(timeout=300)
    poller.stop.set()
    if poller.answered_at is None:
        raise RuntimeError(f"the service did not answer {label!r} within 300 s of the repro's end; "
                           f"last answer: {poller.last}")
    featurized = json.loads((clone / "metrics/featurize.json").read_text())
    indexed = json.loads((clone / "metrics/index.json").read_text())
    row = {"contributions": count, "approve_seconds": round(approve_seconds, 2), "repro": rebuilt,
           "computed": featurized["run"]["computed"], "reused": featurized["run"]["reused"],
           "contributed_vectors": indexed["contributed_vectors"],
           "swap_seconds": round(poller.answered_at - index_committed_at, 1),
           "total_seconds": round(poller.answered_at - started, 1)}
    print(f"  {count} contribution(s): approve {row['approve_seconds']} s, dvc repro {rebuilt['seconds']} s "
          f"{rebuilt['stages']}, answerable {row['swap_seconds']} s after the index stage ended; "
          f"{row['total_seconds']} s from approve", flush=True)
    return row


def start_service(clone: Path, env: dict) -> tuple[subprocess.Popen, int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "fruits.app.service", f"identify.port={port}"], cwd=clone,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the service did not start within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,100", help="contributions approved at once, in turn (default: %(default)s)")
    counts = [int(count) for count in parser.parse_args().counts.split(",")]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYSPARK_PYTHON": sys.executable}
    reports = Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="approve-bench-"))
    clone = work / "clone"
    subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], check=True)
    os.chdir(clone)
    try:
        print("approve bench: the demo pipeline in a clone of the last commit", flush=True)
        baseline = repro(clone, env)
        baseline.pop("index_committed_at")
        server, port = start_service(clone, env)
        try:
            rows = [contribute_and_approve(clone, env, port, count, f"Bench {count}", 5000 + 1000 * turn)
                    for turn, count in enumerate(counts)]
        finally:
            server.terminate()
            server.wait(timeout=30)
        cfg = load_config()
    finally:
        os.chdir(reports)
        shutil.rmtree(work)
    setup = (f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), the demo sample "
             f"(a clone's `dvc repro`: {baseline['seconds']} s), engine {cfg.model.engine}, {cfg.model.input_size} px, "
             f"{cfg.identify.workers} uvicorn workers polling every {cfg.identify.index_poll_seconds} s; "
             "generated photos, not real ones")
    stages = list(dict.fromkeys(name for row in rows for name in row["repro"]["stages"]))  # in the order they ran
    lines = [setup, "", "| approved | approve (s) | dvc repro (s) | " + " | ".join(f"{s} (s)" for s in stages)
             + " | computed / reused | swap (s) | approve → answerable (s) |",
             "|---:|---:|---:|" + "---:|" * len(stages) + "---|---:|---:|"]
    lines += [f"| {r['contributions']} | {r['approve_seconds']} | {r['repro']['seconds']} | "
              + " | ".join(str(r["repro"]["stages"].get(s, "")) for s in stages)
              + f" | {r['computed']} / {r['reused']} | {r['swap_seconds']} | {r['total_seconds']} |" for r in rows]
    print(write_results("approve_bench", {"setup": setup, "baseline": baseline, "rows": rows}, lines))


if __name__ == "__main__":
    main()
