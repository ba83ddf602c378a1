"""The MobileNetV2 backbone: build, load and save weights, export them as an ONNX graph, and the
extractor functions each engine builds (fruits.core.engines chooses between them and keeps one per
process). Workers never download anything: they take the weights they are given (the broadcast value
on Spark): weight arrays for TensorFlow, the serialized ONNX model for onnxruntime.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fruits.core.errors import ConfigError, ExpectedFailure
from fruits.core.logs import native_notices_hidden
from fruits.core.storage import atomic_output, file_digest

FEATURE_DIM = 1280
# Set before TensorFlow loads, in every process that builds a model (driver, workers, EMR nodes):
# oneDNN kernels are off by default on some CPUs (AMD here) and double the speed; the C++ log level
# keeps TensorFlow's start-up chatter out of the pipeline's output.
TF_ENVIRONMENT = {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}


class WeightsUnavailable(ExpectedFailure, RuntimeError):
    """The configured weights cannot be had; the message says which setting and what to do."""


def import_keras():
    """Keras, with the TensorFlow environment set first (it is read once, when TensorFlow loads)."""
    for name, value in TF_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    with native_notices_hidden():
        import keras
        import tensorflow as tf

        tf.constant(0.0) + 1.0  # the first op: TensorFlow's second round of start-up notices, hidden too
    return keras


def build_backbone(input_size: int, alpha: float = 1.0, weights: str | None = None):
    """MobileNetV2, no top, global average pooling: (N, size, size, 3) in [-1, 1] -> (N, 1280)."""
    keras = import_keras()
    return keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3),
        alpha=alpha,
        include_top=False,
        weights=weights,
        pooling="avg",
    )


def sha256_file(path: str | Path) -> str:
    """The file's sha256, computed once per version of the file in this process: featurize checks the
    weights and the ONNX export several times per run (~30 ms each for 14 MB). A rewritten file
    changes its inode, size or change time (which no tool sets back), so it is hashed again."""
    stat = os.stat(path)
    return _sha256_of_version(os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size,
                              stat.st_mtime_ns, stat.st_ctime_ns)


@functools.lru_cache(maxsize=64)
def _sha256_of_version(path: str, *version: int) -> str:
    return file_digest(path, "sha256")


def save_weights(model, path: str | Path) -> None:
    """Write atomically: an interrupted save never leaves a half-written weights file."""
    with atomic_output(path) as partial:
        model.save_weights(partial)


def load_weight_arrays(path: str | Path, input_size: int, alpha: float) -> list[np.ndarray]:
    """The weight arrays of a saved file, checked against the architecture (driver side)."""
    model = build_backbone(input_size, alpha, weights=None)
    try:
        model.load_weights(str(path))
    except Exception as err:
        raise WeightsUnavailable(
            f"{path} does not hold MobileNetV2 weights for model.input_size={input_size}, "
            f"model.alpha={alpha}: {err}. Re-run the weights stage (python -m fruits.stages.weights)."
        ) from err
    return model.get_weights()


def configure_tf_threads(threads: int) -> None:
    """One intra-op thread per task: Spark already runs one task per core. Settable once per process."""
    import_keras()
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:
        pass  # TF already initialised in this process: the first setting stands


def make_extractor(weights: Sequence[np.ndarray], input_size: int, alpha: float):
    """A traced function (N, size, size, 3) -> (N, 1280) float32, one fixed signature: no retracing."""
    import_keras()
    import tensorflow as tf

    model = build_backbone(input_size, alpha, weights=None)
    model.set_weights(list(weights))
    signature = [tf.TensorSpec([None, input_size, input_size, 3], tf.float32)]
    call = tf.function(lambda batch: model(batch, training=False), input_signature=signature)
    return lambda batch: call(tf.constant(batch, dtype=tf.float32)).numpy()


def export_onnx(weights: Sequence[np.ndarray], input_size: int, alpha: float, opset: int) -> bytes:
    """The same model as an ONNX graph (tf2onnx, traced from the Keras model with these weights)."""
    import_keras()
    import tensorflow as tf
    import tf2onnx

    model = build_backbone(input_size, alpha, weights=None)
    model.set_weights(list(weights))
    signature = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32, name="images"),)
    call = tf.autograph.experimental.do_not_convert(lambda batch: model(batch, training=False))
    proto, _ = tf2onnx.convert.from_function(tf.function(call), input_signature=signature, opset=opset)
    return proto.SerializeToString()


def make_onnx_extractor(model_bytes: bytes, threads: int):
    """An onnxruntime session (one per process), threads intra-op threads: (N, size, size, 3) -> (N, 1280).

    Its threads do not spin between calls: beside Spark's JVM and the other workers, a spinning thread
    takes the core that decodes the next batch or sends the last one."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


def extract_in_batches(extract, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Run the extractor over images in batches of batch_size; float32 (N, 1280)."""
    outputs = [extract(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0, FEATURE_DIM), np.float32)


def model_identity(weights_file: str | Path, input_size: int, alpha: float, engine: str = "tensorflow",
                   precision: str = "fp32") -> str:
    """What identifies the features a model makes (and its extractor in a worker): architecture, the
    weights' checksum, input size, width, engine, precision (int8 only: fp32 rows keep the identity they
    had before precision existed). Rows made by another identity are recomputed. (Not the ONNX file's
    checksum: tf2onnx's bytes differ between two exports of the same weights.)"""
    identity = f"mobilenetv2/{sha256_file(weights_file)}/{input_size}/{alpha}/{engine}"
    return identity if precision == "fp32" else f"{identity}/{precision}"


def check_weights_file(weights: str | Path, provenance_file: str | Path) -> None:
    """Before any work: the weights file exists, is an HDF5 file, and, when the weights stage's
    provenance describes this very file, has the checksum it recorded (else it is corrupt or replaced)."""
    import json

    import h5py

    weights, provenance_file = Path(weights), Path(provenance_file)
    if not weights.exists():
        raise FileNotFoundError(f"env.paths.weights={weights} not found: run the weights stage first "
                                "(python -m fruits.stages.weights, or make weights)")
    try:
        with h5py.File(weights, "r"):
            pass
    except OSError as err:  # not HDF5, or cut short (the superblock records the file's end)
        raise ConfigError(f"env.paths.weights={weights} is not a readable HDF5 weights file ({err}): "
                          "delete it and re-run the weights stage") from None
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    described = provenance.get("file") and Path(provenance["file"]).resolve() == weights.resolve()
    if described and provenance.get("sha256") != sha256_file(weights):
        raise ConfigError(f"env.paths.weights={weights} does not have the sha256 that {provenance_file} recorded: "
                          "the file is corrupt or was replaced; re-run the weights stage")


def verified_onnx(onnx: str | Path, weights: str | Path, provenance_file: str | Path, precision: str = "fp32") -> Path:
    """The ONNX graph, checked to be the weights stage's export of exactly these weights at this precision
    (its provenance records both checksums and the precision), so that what it computes is labelled with
    the right weights."""
    import json

    onnx, provenance_file = Path(onnx), Path(provenance_file)
    provenance = json.loads(provenance_file.read_text()) if provenance_file.exists() else {}
    if not onnx.exists() or provenance.get("sha256") != sha256_file(weights) or \
            provenance.get("onnx_sha256") != sha256_file(onnx):
        raise FileNotFoundError(f"{onnx} is missing or not the export of {weights} (per {provenance_file}): "
                                "re-run the weights stage (python -m fruits.stages.weights), or use model.engine=tensorflow")
    if provenance.get("precision", "fp32") != precision:
        raise FileNotFoundError(f"{onnx} is the {provenance.get('precision', 'fp32')} graph (per {provenance_file}), "
                                f"not model.precision={precision}: re-run the weights stage")
    return onnx
