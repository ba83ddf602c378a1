"""The engines that run the backbone: one interface, one class per engine.

An engine answers two questions: what the driver sends to the workers (`payload`, read once on the
driver: featurize broadcasts it, the app and the bench keep it) and how a worker turns that into an
extractor (`build`: (N, size, size, 3) in [-1, 1] -> (N, 1280) float32). The TensorFlow payload is the
weight arrays, the onnxruntime one the serialized ONNX graph (weights inside). Each engine checks its
own files before any work (`check`). Workers never download anything: they build from the payload.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from fruits.core import backbone
from fruits.core.errors import ConfigError
from fruits.core.quantization import check_precision

Extractor = Callable[[np.ndarray], np.ndarray]

# Per Python process: how many times each extractor was built (Spark reuses worker processes, so
# this stays at 1 per process however many tasks and batches go through it).
BUILD_COUNT: dict[str, int] = {}
_EXTRACTORS: dict[str, Extractor] = {}


class TensorFlow:
    name = "tensorflow"

    def check(self, cfg: DictConfig) -> None:
        check_precision(str(cfg.model.precision), self.name)
        backbone.check_weights_file(cfg.env.paths.weights, cfg.env.paths.provenance)

    def payload(self, cfg: DictConfig) -> list[np.ndarray]:
        return backbone.load_weight_arrays(cfg.env.paths.weights, cfg.model.input_size, cfg.model.alpha)

    def build(self, payload, input_size: int, alpha: float, threads: int) -> Extractor:
        backbone.configure_tf_threads(threads)
        return backbone.make_extractor(payload, input_size, alpha)


class OnnxRuntime:
    name = "onnxruntime"

    def check(self, cfg: DictConfig) -> None:
        check_precision(str(cfg.model.precision), self.name)
        backbone.check_weights_file(cfg.env.paths.weights, cfg.env.paths.provenance)
        backbone.verified_onnx(cfg.env.paths.onnx, cfg.env.paths.weights, cfg.env.paths.provenance,
                               str(cfg.model.precision))

    def payload(self, cfg: DictConfig) -> bytes:
        paths = cfg.env.paths
        return Path(backbone.verified_onnx(paths.onnx, paths.weights, paths.provenance,
                                           str(cfg.model.precision))).read_bytes()

    def build(self, payload: bytes, input_size: int, alpha: float, threads: int) -> Extractor:
        return backbone.make_onnx_extractor(payload, threads)


ENGINES = {engine.name: engine for engine in (TensorFlow(), OnnxRuntime())}


def engine(name: str):
    """The engine model.engine names; a clear error for any other name."""
    if name not in ENGINES:
        raise ConfigError(f"model.engine={name} is not one of {', '.join(ENGINES)}")
    return ENGINES[name]


def model_identity(cfg: DictConfig) -> str:
    """What identifies the features this config's model makes (rows of another identity are recomputed)."""
    return backbone.model_identity(cfg.env.paths.weights, cfg.model.input_size, cfg.model.alpha, cfg.model.engine,
                                   str(cfg.model.precision))


def cached_extractor(key: str, payload: Callable[[], object], name: str, input_size: int, alpha: float,
                     threads: int) -> Extractor:
    """The extractor of this process, built at most once per key; payload() is fetched lazily, once
    (on a Spark worker: the broadcast value)."""
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = engine(name).build(payload(), input_size, alpha, threads)
        BUILD_COUNT[key] = BUILD_COUNT.get(key, 0) + 1
    return _EXTRACTORS[key]
