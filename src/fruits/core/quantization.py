"""model.precision=int8: the backbone's ONNX graph quantized to int8 by onnxruntime's own tools, as its
documentation prescribes for a CNN on CPU: `quant_pre_process` (shape inference, graph optimisation),
then `quantize_static` in QDQ format with per-channel int8 weights and uint8 activations, their ranges
calibrated (MinMax) on real photos. Where the CPU has no VNNI (AVX-512 VNNI or AVX-VNNI), weights use 7
bits (`reduce_range`): without VNNI the uint8 x int8 products can saturate 16-bit accumulators."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from fruits.core.errors import ConfigError

PRECISIONS = ("fp32", "int8")


def check_precision(precision: str, engine: str) -> None:
    """model.precision names a known precision, and int8 runs where its graph exists (onnxruntime)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"model.precision={precision} is not one of {', '.join(PRECISIONS)}")
    if precision != "fp32" and engine != "onnxruntime":
        raise ConfigError(f"model.precision={precision} runs on model.engine=onnxruntime only (the int8 graph is an "
                          f"ONNX graph); model.engine={engine} runs fp32")


def cpu_flags() -> list[str]:
    """This CPU's flags (/proc/cpuinfo), none where it cannot be read."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])


def cpu_has_vnni() -> bool:
    """The CPU's flags name VNNI (the int8 dot-product instructions onnxruntime's int8 kernels use)."""
    flags = cpu_flags()
    return "avx512_vnni" in flags or "avx_vnni" in flags


def quantize(fp32_model: bytes, calibration: np.ndarray, reduce_range: bool) -> tuple[bytes, dict]:
    """(the int8 graph, what was done) from the fp32 graph and a calibration batch (N, size, size, 3)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = onnx.load_from_string(fp32_model).graph.input[0].name

    class Photos(CalibrationDataReader):
        """One photo at a time, as onnxruntime's calibrator asks for them."""

        def __init__(self):
            self.batches = iter([{name: calibration[i : i + 1].astype(np.float32)} for i in range(len(calibration))])

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(prefix="fruits-int8-") as folder:
        fp32, prepared, int8 = (Path(folder) / f for f in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(fp32_model)
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(int8), Photos(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        quantized = int8.read_bytes()
    return quantized, {"precision": "int8", "quantization": (
        f"onnxruntime {onnxruntime.__version__} quant_pre_process + quantize_static: QDQ, per-channel int8 weights"
        f"{' (reduce_range: 7 bits, no VNNI)' if reduce_range else ''}, uint8 activations, MinMax ranges from "
        f"{len(calibration)} calibration photos")}
