"""Data the tests make: drawn photos as JPEG bytes, files that claim sizes beyond memory, and features
with a known low-rank structure written as the features table."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np

from PIL import Image, ImageCms
from PIL.ExifTags import IFD
from fruits.core.storage import Storage


def jpeg(label: str, seed: int) -> bytes:
    """A drawn fruit of this label as JPEG bytes (seeded)."""
    from fruits.stages.sample import draw_fruit

    buffer = io.BytesIO()
    draw_fruit(label, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def synthetic_features(rows: int, dim: int, scale: float, seed: int = 0) -> np.ndarray:
    """Low-rank structure plus noise, like image features: a few strong, well-separated directions."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, 6)))[0].T
    strengths = np.array([12.0, 7.0, 4.0, 2.5, 1.5, 1.0])[:, None]
    return scale * (rng.normal(size=(rows, 6)) @ (strengths * basis) + 0.05 * rng.normal(size=(rows, dim)) + 3.0)


def write_features(spark, cfg, features: np.ndarray, train_rows: int) -> None:
    """The features table with these rows: the first train_rows Training, the rest Test, labels L0-L2."""
    from fruits.core import tables

    rows = [
        (f"file:/d/{'Training' if i < train_rows else 'Test'}/L{i % 3}/{i}.jpg", f"L{i % 3}",
         "Training" if i < train_rows else "Test", [float(v) for v in features[i]])
        for i in range(len(features))
    ]
    df = spark.createDataFrame(rows, "path string, label string, split string, features array<float>")
    tables.write(df, cfg.env.paths.features, Storage.of(cfg))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares width x height pixels (its data is one compressed empty row)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def gif_claiming(width: int, height: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HH", width, height) + b"\x00\x00\x00" + b"," + struct.pack("<HHHH", 0, 0, width, height)
            + b"\x00\x02\x02\x44\x01\x00;")


def phone_photo() -> bytes:
    """A JPEG as a phone writes it: GPS position, maker, device, time, orientation, XMP, ICC, comment."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0132] = "FruitPhone Inc", "FruitPhone 15 Pro", "2026:11:30 12:34:56"
    exif[0x0112] = 6  # stored sideways: the viewer turns it 90 degrees clockwise
    gps = exif.get_ifd(IFD.GPSInfo)
    gps.update({1: "N", 2: (48.0, 51.0, 24.12), 3: "E", 4: (2.0, 21.0, 7.99)})  # Paris
    exif.get_ifd(IFD.Exif)[0x927C] = b"MAKERNOTE-SERIAL-0042"
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:Description GPSLatitude="48,51.402N"/></x:xmpmeta>'
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    out = io.BytesIO()
    Image.new("RGB", (120, 80), (120, 200, 60)).save(out, "JPEG", exif=exif, xmp=xmp, icc_profile=icc,
                                                      comment=b"taken at 12 rue des Fruits")
    return out.getvalue()
