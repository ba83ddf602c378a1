"""What the benchmarks share: peak memory of the driver (Python and its JVM), a stage run as its own
process, results written to reports/."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


class PeakRss:
    """Peak resident memory of a process (this one by default: a driver) and of its JVM children,
    sampled every 50 ms."""

    def __init__(self, pid: int | None = None) -> None:
        self.process, self.peak_python, self.peak_jvm, self._stop = psutil.Process(pid), 0, 0, threading.Event()

    def sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_python = max(self.peak_python, self.process.memory_info().rss)
                jvm = sum(child.memory_info().rss for child in self.process.children(recursive=True)
                          if "java" in child.name())
            except psutil.Error:  # the process or a child ended between two samples
                jvm = 0
            self.peak_jvm = max(self.peak_jvm, jvm)
            time.sleep(0.05)

    def __enter__(self):
        self.peak_python = self.peak_jvm = 0
        self._stop.clear()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join()


def run_stage(stage: str, params: Path) -> dict:
    """One stage as its own process: wall seconds, peak RSS of its Python driver and of its JVM. Its log
    (featurize's progress lines included) is kept beside the params, as <stage>.log."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", f"fruits.stages.{stage}", "--params", str(params)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with PeakRss(process.pid) as rss:
        _, errors = process.communicate()
    seconds = time.perf_counter() - started
    (params.parent / f"{stage}.log").write_text(errors)
    if process.returncode:
        raise RuntimeError(f"{stage} failed:\n{errors[-3000:]}")
    return {"stage": stage, "seconds": round(seconds, 2), "driver_python_peak_rss_mib": round(rss.peak_python / 2**20),
            "driver_jvm_peak_rss_mib": round(rss.peak_jvm / 2**20)}


def write_results(name: str, data, lines: list[str]) -> str:
    """reports/<name>.json (the numbers) and reports/<name>.md (the table); returns the Markdown."""
    import json
    from pathlib import Path

    out = Path("reports")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    text = "\n".join(lines) + "\n"
    (out / f"{name}.md").write_text(text)
    return text


# A bench's models folder per input size and precision (resolved by the config): weights made at one
# point are never taken for another's (the engine's check would refuse them).
MODELS_PER_POINT = "${model.input_size}px-${model.precision}"

ROTATIONS = [(angle, mirror) for mirror in (False, True) for angle in (0, 90, 180, 270)]


def rotated_real_photos(source: Path, root: Path, per_label: int) -> list[Path]:
    """per_label Training photos per label under root, made from the real photos of source (the demo's
    sample, both splits) as Fruits-360 makes its own: the same fruit turned (by 90-degree steps, then
    mirrored), on its white background. Deterministic; the photos come back in the same order each time."""
    from PIL import Image

    files = []
    for label_folder in sorted({p.parent.name for p in source.glob("*/*/*.jpg")}):
        photos = sorted(source.glob(f"*/{label_folder}/*.jpg"))
        if per_label > len(photos) * len(ROTATIONS):
            raise ValueError(f"{per_label} images per label asked: {source} has {len(photos)} photos of "
                             f"{label_folder}, {len(photos) * len(ROTATIONS)} with its {len(ROTATIONS)} turns")
        folder = root / "Training" / label_folder
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            angle, mirror = ROTATIONS[i // len(photos)]
            photo = photos[i % len(photos)]
            target = folder / f"{photo.stem}_turn{angle}{'m' if mirror else ''}.jpg"
            if not target.exists():
                image = Image.open(photo).rotate(angle)
                (image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mirror else image).save(target, quality=95)
            files.append(target)
    for stale in set(root.glob("*/*/*")) - set(files):  # a bench's images of an earlier run (other labels, counts)
        stale.unlink()
    return files


def bench_sample(per_label: int, *overrides: str):
    """The featurize bench's images (per_label Training images per label, under bench/: the real photos of
    the demo's sample, turned as Fruits-360 turns its fruits, as many times as needed) and their weights,
    made once and shared by the benches: (config, image files)."""
    from fruits.core.config import load_config
    from fruits.stages import weights

    cfg = load_config(["data.root=bench/sample", "env.paths.root=bench", f"env.paths.models=bench/models/{MODELS_PER_POINT}",
                       *overrides])
    files = sorted(rotated_real_photos(Path(cfg.data.source), Path(cfg.data.root), per_label))
    if not Path(cfg.env.paths.onnx).exists():
        weights.run(cfg)
    return cfg, files
