"""Hostile inputs, property-based (Hypothesis): whatever the bytes or the name, the decoder and the path
parser give a result or a reason, never a crash of the batch, and memory stays bounded."""

from __future__ import annotations

import io
import subprocess
import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fruits.core.images import MAX_PIXELS, RejectedImage, parse_image_path, prepare
from fruits.core.listing import walk
from fruits.core.storage import ListedFile
from fruits.stages.featurize import featurize_batch
from helpers.data import gif_claiming, png_claiming

SIZE = 32
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa",
         "I;16", "I;16L", "I;16B"]


def encoded(image: Image.Image) -> bytes:
    """The image in the first format that stores its mode as it is."""
    for fmt in ("PNG", "TIFF", "WEBP"):
        stream = io.BytesIO()
        try:
            image.save(stream, fmt)
        except (OSError, ValueError, KeyError):
            continue
        return stream.getvalue()
    raise AssertionError(f"no format stores mode {image.mode}")


def photo(fmt: str) -> bytes:
    rng = np.random.default_rng(3)
    stream = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (24, 30, 3), dtype=np.uint8)).save(stream, fmt)
    return stream.getvalue()


def assert_result_or_reason(content: bytes) -> None:
    try:
        array = prepare(content, SIZE)
    except RejectedImage as err:
        assert str(err)  # a reason, stored with the file
        return
    assert array.shape == (SIZE, SIZE, 3) and array.dtype == np.float32
    assert np.isfinite(array).all() and -1.0 <= array.min() and array.max() <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_random_bytes_give_an_array_or_a_reason(content):
    assert_result_or_reason(content)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"]), st.binary(min_size=1, max_size=64))
def test_a_valid_header_followed_by_junk_gives_an_array_or_a_reason(fmt, junk):
    content = photo(fmt)
    assert_result_or_reason(content[: len(content) // 2] + junk)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_at_every_cut_gives_an_array_or_a_reason(fmt):
    content = photo(fmt)
    rejected = 0
    for cut in range(len(content)):
        try:
            prepare(content[:cut], SIZE)
        except RejectedImage:
            rejected += 1
    assert rejected >= len(content) // 2  # most cuts are refused, with a reason; none crashed
    assert prepare(content, SIZE).shape == (SIZE, SIZE, 3)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(MODES), st.integers(1, 40), st.integers(1, 40))
def test_every_pillow_mode_decodes_to_rgb(mode, width, height):
    array = prepare(encoded(Image.new(mode, (width, height))), SIZE)
    assert array.shape == (SIZE, SIZE, 3)


@settings(max_examples=40, deadline=None)
@given(st.integers(7_000, 65_535), st.integers(7_000, 65_535), st.sampled_from([png_claiming, gif_claiming]))
def test_declared_dimensions_beyond_memory_are_refused_before_decoding(width, height, make):
    content = make(width, height)
    assert len(content) < 200
    with pytest.raises(RejectedImage, match="too large"):
        prepare(content, SIZE)


def test_decompression_bombs_keep_memory_bounded():
    """In a fresh process: refusing bombs that claim up to 4 gigapixels costs next to no memory."""
    code = f"""
import resource, sys
sys.path[:0] = {sys.path!r}
from helpers.data import png_claiming, gif_claiming
from fruits.core.images import RejectedImage, prepare
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for make in (png_claiming, gif_claiming):
    for side in (8_000, 20_000, 65_535):
        try:
            prepare(make(side, side), 32)
        except RejectedImage:
            pass
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 64 * 1024  # KiB: under 64 MiB more than the imports took
    assert MAX_PIXELS * 3 < 2**30  # the largest accepted image decodes in under 1 GiB


# --- the path parser ---------------------------------------------------------------------------------

NAME_CHARACTERS = st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0")
ODD_PIECES = st.sampled_from(["%20", " ", "'", '"', "é", "e\u0301", "ﬁ", "Å", "\u00a0", "#", "?", "[1]", "{a}", "*", "~"])
NAMES = st.lists(st.one_of(st.text(NAME_CHARACTERS, min_size=1, max_size=20), ODD_PIECES), min_size=1, max_size=12).map("".join)


def usable_part(text: str) -> bool:
    return text not in (".", "..") and "/" not in text


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(["Training", "Test"]), NAMES.filter(usable_part), NAMES.filter(usable_part),
       st.sampled_from(["file:/data", "s3://bucket/fruits/raw", "/abs/path", "relative", "file:/a b/c%20d"]),
       st.sampled_from(["NFC", "NFD", None]), st.integers(0, 200))
def test_the_split_and_label_come_back_exactly_from_any_name(split, label, name, root, form, padding):
    if form:
        label, name = unicodedata.normalize(form, label), unicodedata.normalize(form, name)
    name = name + "x" * padding + ".jpg"  # up to very long names
    assert parse_image_path(f"{root}/{split}/{label}/{name}") == (split, label)


@settings(max_examples=200, deadline=None)
@given(NAMES.filter(usable_part), st.lists(NAMES.filter(usable_part), max_size=3))
def test_a_path_without_split_is_rejected_with_the_path_named(name, folders):
    path = "/".join(["file:/data", *folders, name])
    parts = path.split("/")
    if len(parts) >= 3 and parts[-3] in ("Training", "Test"):
        return
    with pytest.raises(RejectedImage) as err:
        parse_image_path(path)
    assert repr(path) in str(err.value)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([".", "_"]), NAMES.filter(usable_part), st.booleans())
def test_names_spark_would_skip_are_rejects_with_a_reason_not_lost(prefix, name, folder):
    relative = f"Training/{prefix}{name}/a.jpg" if folder else f"Training/Kiwi/{prefix}{name}.jpg"
    rejects = walk([ListedFile(f"file:/d/{relative}", relative, 10)]).unreadable
    assert len(rejects) == 1 and "hidden name" in rejects[0][1]



def test_the_walk_sizes_only_what_spark_will_read():
    """A first run sizes the model's tasks from the walk (no listing job): skipped files weigh nothing."""
    files = [ListedFile("file:/d/Training/Kiwi/a.jpg", "Training/Kiwi/a.jpg", 300),
             ListedFile("file:/d/Training/Kiwi/.b.jpg", "Training/Kiwi/.b.jpg", 9_000),
             ListedFile("file:/d/Training/Kiwi/c.jpg", "Training/Kiwi/c.jpg", 0),
             ListedFile("file:/d/Test/Kiwi/d.jpg", "Test/Kiwi/d.jpg", 700)]
    walked = walk(iter(files))
    assert (walked.readable, walked.readable_bytes, walked.largest) == (2, 1_000, 700)
    assert [reason.split(" ")[0] for _, reason in walked.unreadable] == ["hidden", "empty"]

# --- a batch of hostile files ------------------------------------------------------------------------

@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=512), st.sampled_from([photo("JPEG"), photo("PNG"), b""]),
                          st.builds(lambda w, h: png_claiming(w, h), st.integers(10_000, 60_000), st.integers(10_000, 60_000))),
                min_size=1, max_size=12),
       st.lists(NAMES.filter(usable_part), min_size=12, max_size=12))
def test_a_batch_of_hostile_files_never_crashes_and_every_file_has_features_or_a_reason(contents, names):
    paths = [f"file:/d/{'Training' if i % 2 else 'Nowhere'}/Kiwi/{names[i]}.jpg" for i in range(len(contents))]
    out = featurize_batch(lambda batch: batch.mean(axis=(1, 2)), paths, contents, SIZE, 4)
    assert len(out) == len(contents)
    for features, reason in zip(out["features"], out["reject_reason"], strict=True):
        assert (features is None) != (reason is None)
        assert reason is None or reason.strip()


def test_the_listed_root_is_compared_without_its_scheme_whatever_spark_lists(spark, tmp_path):
    """Spark lists file:/abs/… for local folders and s3://bucket/… (or s3a://) for buckets: paths are
    made relative by comparing them without the scheme, with public APIs only (no call into the JVM)."""
    import os

    from fruits.core.listing import listed_root, relative_paths

    assert listed_root("data/sample") == os.path.abspath("data/sample")
    assert listed_root(f"file://{tmp_path}/x/") == listed_root(f"file:{tmp_path}/x") == f"{tmp_path}/x"
    assert listed_root("s3://bucket/fruits/raw/") == listed_root("s3a://bucket/fruits/raw") == "bucket/fruits/raw"
    files = spark.createDataFrame([(f"file:{tmp_path}/x/Training/Kiwi 1/a b.jpg",), ("s3a://bucket/fruits/raw/Test/K/c.jpg",)],
                                  "path string")
    assert relative_paths(files.limit(1), listed_root(str(tmp_path / "x"))).first()["path"] == "Training/Kiwi 1/a b.jpg"
    assert relative_paths(files.where("path like 's3a%'"), "bucket/fruits/raw").first()["path"] == "Test/K/c.jpg"
    with pytest.raises(Exception, match="listed outside bucket/other"):
        relative_paths(files.where("path like 's3a%'"), "bucket/other").collect()
