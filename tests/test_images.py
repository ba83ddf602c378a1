import io

import numpy as np
import pytest
from PIL import Image

from fruits.core.images import RejectedImage, decode_image, parse_image_path, prepare


@pytest.mark.parametrize(
    "path, expected",
    [
        ("file:/data/sample/Training/Apple Red/0001.jpg", ("Training", "Apple Red")),
        ("file:///data/sample/Test/Banana/x.jpg", ("Test", "Banana")),
        ("s3://bucket/fruits/raw/Training/Pêche plate/1.jpg", ("Training", "Pêche plate")),
        ("/local/Test/Pêche plate/1.jpg", ("Test", "Pêche plate")),
        ("file:/d/Training/100%20/a.jpg", ("Training", "100%20")),  # Hadoop paths are not escaped
    ],
)
def test_split_and_label_come_from_the_two_parent_folders(path, expected):
    assert parse_image_path(path) == expected


@pytest.mark.parametrize("path", ["x.jpg", "file:/data/sample/loose.jpg", "/d/Validation/Fig/1.jpg"])
def test_a_path_outside_split_and_label_folders_is_rejected(path):
    with pytest.raises(RejectedImage, match=r"is not <Training\|Test>/<label>/<file>"):
        parse_image_path(path)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "image, fmt",
    [
        (Image.new("CMYK", (20, 10), (0, 255, 255, 0)), "JPEG"),
        (Image.new("L", (20, 10), 128), "JPEG"),
        (Image.new("I;16", (20, 10), 40000), "PNG"),
        (Image.new("RGBA", (20, 10), (255, 0, 0, 255)), "PNG"),
        (Image.new("P", (20, 10), 3), "PNG"),
    ],
)
def test_every_mode_becomes_rgb_of_the_same_size(image, fmt):
    decoded = decode_image(encode(image, fmt))
    assert decoded.mode == "RGB" and decoded.size == (20, 10)


def test_transparency_is_laid_on_white():
    half = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    half.putpixel((1, 0), (0, 0, 0, 0))
    decoded = decode_image(encode(half))
    assert decoded.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.getpixel((1, 0)) == (255, 255, 255)


def test_cmyk_colours_survive():
    red = decode_image(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG")).getpixel((1, 1))
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (None, "empty file"),
        (b"this is a text file, not a picture", "not an image"),
        (encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")[:200], "corrupt image"),
    ],
)
def test_undecodable_bytes_are_rejected_with_a_reason(content, reason):
    with pytest.raises(RejectedImage, match=reason):
        decode_image(content)


def test_prepare_resizes_and_scales_to_minus_one_one():
    array = prepare(encode(Image.new("RGB", (100, 100), (255, 0, 127))), 96)
    assert array.shape == (96, 96, 3) and array.dtype == np.float32
    np.testing.assert_allclose(array[0, 0], [1.0, -1.0, 127 / 127.5 - 1], atol=1e-6)


def test_a_batch_is_scaled_to_the_same_bits_as_each_image_alone():
    from fruits.core.images import decode_image, prepare_batch

    rng = np.random.default_rng(3)
    contents = [encode(Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8))) for i in range(5)]
    one_by_one = [np.asarray(decode_image(c).resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1.0
                  for c in contents]
    batch = prepare_batch(contents, 32)
    assert batch.dtype == np.float32 and batch.shape == (5, 32, 32, 3)
    assert np.array_equal(batch, np.stack(one_by_one))
    assert np.array_equal(prepare(contents[2], 32), one_by_one[2])


def test_a_real_photo_at_its_own_100_px_is_not_resampled():
    """model.input_size=100: a Fruits-360 photo goes to the model with its own pixels, no resize."""
    from fruits.core.config import PROJECT_ROOT
    from fruits.core.images import pixels

    content = (PROJECT_ROOT / "samples/fruits360/Test/Banana 1/r_50_100.jpg").read_bytes()
    own = np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))
    assert own.shape == (100, 100, 3)
    np.testing.assert_array_equal(pixels(content, 100), own)
    assert not np.array_equal(pixels(content, 96), own[:96, :96])  # another size is resampled
