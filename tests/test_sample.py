import hashlib
import json
import shutil

from fruits.stages import sample
from fruits.core.images import decode_image

from helpers.project import make_cfg


def digest_tree(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_generated_sample_is_deterministic_in_fruits360_layout(tmp_path):
    first = make_cfg(tmp_path / "a")
    second = make_cfg(tmp_path / "b")
    manifest = sample.run(first)
    sample.run(second)
    root = tmp_path / "a" / "images"
    assert digest_tree(root) == digest_tree(tmp_path / "b" / "images")
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == manifest["images"] == 4 * (6 + 2)
    assert {f.parent.parent.name for f in files} == {"Training", "Test"}
    assert {f.parent.name for f in files} == {"Apple Red", "Banana", "Kiwi", "Lemon"}
    image = decode_image(files[0].read_bytes())
    assert image.size == (100, 100)
    assert image.getpixel((0, 0))[0] > 240  # white background
    assert "not photos" in json.loads((root / "MANIFEST.json").read_text())["origin"]


def test_labels_look_different_and_images_within_a_label_vary():
    import numpy as np

    apple = [np.asarray(sample.draw_fruit("Apple Red", seed), float) for seed in range(3)]
    banana = np.asarray(sample.draw_fruit("Banana", 0), float)
    assert np.abs(apple[0] - apple[1]).mean() > 1  # rotation / lighting vary
    assert np.abs(apple[0] - banana).mean() > np.abs(apple[0] - apple[1]).mean()


def test_a_real_fruits360_folder_or_zip_is_subsampled(tmp_path):
    real = tmp_path / "fruits-360-main"
    sample.generate(real, ["Cherry", "Fig", "Date"], {"Training": 5, "Test": 3}, 100, 1)
    archive = shutil.make_archive(str(tmp_path / "fruits"), "zip", tmp_path, "fruits-360-main")
    for source in (str(real), archive):
        cfg = make_cfg(tmp_path / "out", f"data.source={source}", "data.labels=[Cherry,Fig]",
                       "data.train_per_label=2", "data.test_per_label=1")
        manifest = sample.run(cfg)
        assert manifest["images"] == 2 * 2 + 2 * 1
        assert manifest["labels"] == ["Cherry", "Fig"]
        assert "Fruits-360 images" in manifest["origin"]


def test_an_interrupted_rebuild_keeps_the_previous_sample(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path)
    sample.run(cfg)
    before = digest_tree(tmp_path / "images")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sample, "generate", crash)
    try:
        sample.run(cfg)
    except KeyboardInterrupt:
        pass
    assert digest_tree(tmp_path / "images") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".images-")]


def test_a_source_that_is_not_a_path_is_named_with_what_to_do(tmp_path):
    import pytest

    from fruits.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.source=generate not found: .* recipe of conf/data/sources"):
        sample.run(make_cfg(tmp_path, "data.source=generate"))


def test_a_zip_that_grew_gives_its_new_images(tmp_path):
    """The archive is unpacked afresh each run: an image added to the .zip reaches the sample."""
    real = tmp_path / "fruits-360-main"
    sample.generate(real, ["Fig"], {"Training": 2, "Test": 1}, 100, 1)
    overrides = ["data.labels=null", "data.train_per_label=null", "data.test_per_label=null"]

    def archive_and_sample() -> int:
        archive = shutil.make_archive(str(tmp_path / "fruits"), "zip", tmp_path, "fruits-360-main")
        return sample.run(make_cfg(tmp_path / "out", f"data.source={archive}", *overrides))["images"]

    assert archive_and_sample() == 3
    sample.draw_fruit("Fig", 9).save(real / "Training" / "Fig" / "added.jpg")
    assert archive_and_sample() == 4


def test_approved_contributions_join_the_subset_whatever_data_labels_selects(tmp_path):
    cfg = make_cfg(tmp_path, "data.labels=[Kiwi]")
    approved = tmp_path / "data" / "contributions" / "approved"
    for label, name in (("Kiwi", "a" * 32), ("Yuzu", "b" * 32)):
        (approved / "Training" / label).mkdir(parents=True, exist_ok=True)
        sample.draw_fruit("Kiwi", 5).save(approved / "Training" / label / f"{name}.jpg")
    (approved / "Training" / "Yuzu" / ".DS_Store").write_bytes(b"\0")  # not an image: left where it is
    manifest = sample.run(cfg)
    root = tmp_path / "images"
    assert manifest["contributed"] == 2 and manifest["images"] == 8 + 2 == len(list(root.rglob("*.jpg")))
    assert (root / "Training" / "Yuzu" / f"contributed_{'b' * 32}.jpg").is_file() and manifest["labels"] == ["Kiwi", "Yuzu"]
    assert manifest["source_files"] == manifest["images"] + len(manifest["ignored"]) + manifest["not_selected"]
