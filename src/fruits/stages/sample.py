"""The sample subset, in the Fruits-360 layout `<Training|Test>/<Label>/<name>.jpg`, 100x100 RGB on white.

Taken from a real Fruits-360 folder or archive when `data.source` points to one (the recipe
conf/data/sources/download.yaml fetches the public archive); with the recipe generate.yaml, drawn
deterministically and offline: each label has its own shape, colour and texture; rotation, size,
position and lighting vary within a label. data.source is always a path, which DVC watches.

The app users' approved photos (env.paths.approved, `<split>/<label>/<id>.jpg`, written by `make
approve`) join the subset as `<split>/<label>/contributed_<id>.jpg`, whatever data.labels selects: they
are how the collection grows, new labels included.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig
from PIL import Image, ImageDraw, ImageFilter

from fruits.core.config import stage_config
from fruits.core.errors import ConfigError
from fruits.core.images import CONTRIBUTED_PREFIX, SPLITS, TEST, TRAINING, spread_over_rotation
from fruits.core.registry import SAMPLE_MANIFEST
from fruits.core.storage import atomic_output, write_json
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

RECIPES = ("generate", "download")  # what a recipe file of conf/data/sources may say


@dataclass(frozen=True)
class FruitLook:
    shape: str  # round | oval | crescent | heart | cluster | pear
    colour: tuple[int, int, int]
    texture: str  # smooth | speckled | fuzzy | seeds | dimpled
    size: float  # radius as a share of the image


# Known looks for common Fruits-360 labels; any other label gets one derived from its name.
LOOKS = {
    "Apple Red": FruitLook("round", (190, 25, 35), "speckled", 0.36),
    "Banana": FruitLook("crescent", (235, 205, 55), "smooth", 0.42),
    "Lemon": FruitLook("oval", (245, 225, 60), "dimpled", 0.33),
    "Orange": FruitLook("round", (245, 140, 20), "dimpled", 0.38),
    "Kiwi": FruitLook("oval", (125, 95, 50), "fuzzy", 0.32),
    "Strawberry": FruitLook("heart", (215, 30, 45), "seeds", 0.33),
    "Grape Blue": FruitLook("cluster", (70, 50, 110), "smooth", 0.40),
    "Pear": FruitLook("pear", (175, 200, 70), "speckled", 0.36),
    "Plum": FruitLook("round", (110, 30, 70), "smooth", 0.30),
    "Lime": FruitLook("oval", (90, 175, 45), "dimpled", 0.28),
}
SHAPES = ("round", "oval", "crescent", "heart", "cluster", "pear")
TEXTURES = ("smooth", "speckled", "fuzzy", "seeds", "dimpled")


def look_for(label: str) -> FruitLook:
    if label in LOOKS:
        return LOOKS[label]
    digest = hashlib.sha256(label.encode()).digest()
    return FruitLook(
        SHAPES[digest[0] % len(SHAPES)],
        (40 + digest[1] % 200, 40 + digest[2] % 200, 40 + digest[3] % 200),
        TEXTURES[digest[4] % len(TEXTURES)],
        0.28 + (digest[5] % 12) / 100,
    )


def fruit_mask(shape: str, canvas: int, radius: float, rng: np.random.Generator) -> Image.Image:
    """A white-on-black mask of the fruit's silhouette, centred, before rotation."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    c = canvas / 2
    if shape == "round":
        draw.ellipse([c - radius, c - radius * 0.95, c + radius, c + radius * 0.95], fill=255)
    elif shape == "oval":
        draw.ellipse([c - radius * 1.25, c - radius * 0.85, c + radius * 1.25, c + radius * 0.85], fill=255)
    elif shape == "crescent":
        draw.ellipse([c - radius * 1.3, c - radius, c + radius * 1.3, c + radius], fill=255)
        draw.ellipse([c - radius * 1.3, c - radius * 1.45, c + radius * 1.3, c + radius * 0.45], fill=0)
    elif shape == "heart":
        draw.polygon([(c - radius, c - radius * 0.5), (c + radius, c - radius * 0.5), (c, c + radius * 1.1)], fill=255)
        draw.ellipse([c - radius, c - radius * 1.0, c + radius, c + radius * 0.3], fill=255)
    elif shape == "cluster":
        berry = radius * 0.32
        for row in range(4):
            for col in range(4 - row):
                x = c + (col - (3 - row) / 2) * berry * 1.8 + rng.normal(0, berry * 0.1)
                y = c - radius * 0.7 + row * berry * 1.6
                draw.ellipse([x - berry, y - berry, x + berry, y + berry], fill=255)
    elif shape == "pear":
        draw.ellipse([c - radius, c - radius * 0.1, c + radius, c + radius * 1.0], fill=255)
        draw.ellipse([c - radius * 0.6, c - radius * 0.9, c + radius * 0.6, c + radius * 0.3], fill=255)
    return mask


def draw_fruit(label: str, seed: int, size: int = 100) -> Image.Image:
    """One deterministic fruit-like image: the label fixes the look, the seed the variation."""
    look = look_for(label)
    rng = np.random.default_rng(seed)
    canvas = size * 2  # drawn at 2x, then downsampled: smooth edges like a photo
    radius = canvas * look.size * rng.uniform(0.85, 1.1)
    mask = fruit_mask(look.shape, canvas, radius, rng)
    mask = mask.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR)
    shift = rng.normal(0, canvas * 0.03, 2)
    mask = mask.transform(mask.size, Image.Transform.AFFINE, (1, 0, shift[0], 0, 1, shift[1]))

    yy, xx = np.mgrid[0:canvas, 0:canvas].astype(np.float32)
    # Lighting: a soft highlight from a random direction, and a global brightness.
    light = rng.uniform(0, 2 * math.pi)
    lx, ly = canvas / 2 + math.cos(light) * radius * 0.5, canvas / 2 + math.sin(light) * radius * 0.5
    shade = 1.15 - 0.55 * np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2) / (radius * 1.6)
    shade = np.clip(shade, 0.45, 1.25) * rng.uniform(0.85, 1.1)
    colour = np.array(look.colour, np.float32) * rng.uniform(0.9, 1.1, 3)
    pixels = colour[None, None, :] * shade[..., None]

    if look.texture == "speckled":
        spots = rng.random((canvas, canvas)) > 0.985
        pixels[spots] = pixels[spots] * 0.6 + 90
    elif look.texture == "fuzzy":
        pixels += rng.normal(0, 18, pixels.shape)
    elif look.texture == "seeds":
        seeds = (np.sin(xx / 5.0) * np.sin(yy / 5.0)) > 0.93
        pixels[seeds] = (235, 215, 120)
    elif look.texture == "dimpled":
        pixels *= (1 + 0.06 * np.sin(xx / 2.2) * np.sin(yy / 2.2))[..., None]

    fruit = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    image.paste(fruit, mask=mask.filter(ImageFilter.GaussianBlur(1.2)))
    return image.resize((size, size), Image.Resampling.LANCZOS)


def image_seed(base_seed: int, split: str, label: str, index: int) -> int:
    key = f"{base_seed}/{split}/{label}/{index}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def generate(root: Path, labels: list[str], per_split: dict[str, int], size: int, seed: int) -> int:
    """Write the generated subset under root; returns the number of images."""
    count = 0
    for split, n in per_split.items():
        for label in labels:
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(n):
                image = draw_fruit(label, image_seed(seed, split, label, index), size)
                image.save(folder / f"{index:04d}_{size}.jpg", quality=95)
                count += 1
    return count


def find_fruits360_root(folder: Path) -> Path:
    """The folder holding Training/ and Test/ inside an extracted Fruits-360 archive."""
    for candidate in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        if all((candidate / split).is_dir() for split in SPLITS):
            return candidate
    raise FileNotFoundError(f"no Training/ and Test/ folders found under {folder}: not a Fruits-360 layout")


def download(url: str, destination: Path) -> Path:
    """The public Fruits-360 archive (a few hundred MB); resumable only by re-running."""
    destination.mkdir(parents=True, exist_ok=True)
    archive = destination / "fruits-360.zip"
    if not archive.exists():
        log.info("downloading %s", url)
        with atomic_output(archive) as partial, urllib.request.urlopen(url, timeout=60) as response, \
                open(partial, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
    return archive


# Files that operating systems and archivers leave beside images: never data, listed as ignored.
SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".directory"})


def ignored_reason(relative: Path, extensions) -> str | None:
    """Why a source file is not copied (None: it is an image, copied or left out of the subset)."""
    if relative.name in SYSTEM_FILES or relative.name.startswith("._") or "__MACOSX" in relative.parts:
        return "system file"
    if relative.suffix.lower().lstrip(".") not in {e.lower() for e in extensions}:
        return f"not an image file (data.extensions: {', '.join(extensions)})"
    return None


def copy_subset(source: Path, root: Path, labels: list[str] | None, per_split: dict[str, int | None],
                extensions) -> dict:
    """Copy from a real folder: n images per label and split, spread over each film's turn (deterministic), and
    every image outside <split>/<label>/ as it is (featurize rejects it with its reason). Every file of
    the source is accounted for: source_files = images + ignored (listed with the reason) + not_selected."""
    in_layout: dict[tuple[str, str], list[Path]] = {}
    outside, ignored, files = [], {}, sorted(p for p in source.rglob("*") if p.is_file())
    for path in files:
        relative = path.relative_to(source)
        if reason := ignored_reason(relative, extensions):
            ignored[relative.as_posix()] = reason
        elif len(relative.parts) == 3 and relative.parts[0] in SPLITS:
            in_layout.setdefault(relative.parts[:2], []).append(path)
        else:
            outside.append(path)
    chosen = [copy_layout(source, root, split, labels, n, in_layout) for split, n in per_split.items()]
    for path in outside:
        (root / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, root / path.relative_to(source))
    images = sum(chosen) + len(outside)
    return {"images": images, "source_files": len(files), "ignored": ignored,
            "not_selected": len(files) - len(ignored) - images, "outside_layout": len(outside)}


def copy_layout(source: Path, root: Path, split: str, labels: list[str] | None, n: int | None,
                in_layout: dict[tuple[str, str], list[Path]]) -> int:
    """n images (all: None) of each chosen label of one split, spread over the fruit's turn; how many were copied."""
    available = sorted(p.name for p in (source / split).iterdir() if p.is_dir())
    chosen = labels or available
    missing = [label for label in chosen if label not in available]
    if missing:
        raise FileNotFoundError(f"data.labels {missing} not found in {source / split}")
    count = 0
    for label in chosen:
        (root / split / label).mkdir(parents=True, exist_ok=True)
        files = {file.name: file for file in in_layout.get((split, label), [])}
        for name in spread_over_rotation(list(files), n):
            shutil.copy2(files[name], root / split / label / name)
            count += 1
    return count


def add_contributions(approved: Path, root: Path, extensions) -> int:
    """Copy the approved contributions into the subset; how many (none when the folder is absent)."""
    count = 0
    for photo in sorted(approved.glob("*/*/*")) if approved.is_dir() else []:
        split, label = photo.parent.parent.name, photo.parent.name
        if split in SPLITS and photo.is_file() and ignored_reason(photo.relative_to(approved), extensions) is None:
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, root / split / label / f"{CONTRIBUTED_PREFIX}{photo.name}")
            count += 1
    return count


def source_kind(source: str) -> str:
    """What data.source names: a recipe of conf/data/sources (generate, download), a .zip or a folder.
    Always a path, so that DVC watches it (a keyword would leave DVC nothing to hash)."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"data.source={source} not found: name a Fruits-360 folder, a .zip, or a recipe of "
                          "conf/data/sources (generate.yaml draws the sample, download.yaml fetches data.url)")
    if path.suffix in (".yaml", ".yml"):
        recipe = (yaml.safe_load(path.read_text()) or {}).get("recipe")
        if recipe not in RECIPES:
            raise ConfigError(f"data.source={source}: recipe {recipe!r} is not one of {', '.join(RECIPES)}")
        return recipe
    return "zip" if path.suffix == ".zip" else "folder"


def extract(cfg: DictConfig, scratch: Path) -> Path | None:
    """The real Fruits-360 folder data.source names (downloaded, and unpacked under scratch, as needed);
    None: generate. An archive is unpacked afresh each run: a changed .zip gives its new images."""
    data = cfg.data
    kind = source_kind(data.source)
    if kind == "generate":
        return None
    source = download(data.url, Path(data.root).parent / "downloads") if kind == "download" else Path(data.source)
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            archive.extractall(scratch)
        source = scratch
    return find_fruits360_root(source)


def attribution(source: Path) -> str:
    """Where the source's attribution and licence are written (a SOURCE.md in it or beside it), for the
    manifest's origin; "" where there is none (an archive names its own)."""
    for notes in (source / "SOURCE.md", source.parent / "SOURCE.md"):
        if notes.is_file():
            return f" (real photos; attribution and licence: {notes})"
    return ""


def transform(cfg: DictConfig, source: Path | None, staging: Path) -> dict:
    """Write the subset under staging (copied from source, or generated); its manifest."""
    data = cfg.data
    per_split = {TRAINING: data.train_per_label, TEST: data.test_per_label}
    if source is None:
        count = generate(staging, list(data.labels), per_split, data.image_size, data.seed)
        origin = f"generated offline (seed {data.seed}): synthetic fruit-like images, not photos"
        accounting = {"images": count, "source_files": count, "ignored": {}, "not_selected": 0, "outside_layout": 0}
    else:
        accounting = copy_subset(source, staging, data.labels and list(data.labels), per_split, data.extensions)
        origin = f"Fruits-360 images from {data.source}" + attribution(Path(data.source))
    contributed = add_contributions(Path(cfg.env.paths.approved), staging, data.extensions)
    accounting.update(images=accounting["images"] + contributed,
                      source_files=accounting["source_files"] + contributed)
    manifest = {"origin": origin, **accounting, "contributed": contributed,
                "labels": sorted(p.name for p in (staging / TRAINING).iterdir() if p.is_dir())}
    write_json(staging / SAMPLE_MANIFEST, manifest)
    return manifest


def load(staging: Path, root: Path) -> None:
    """Swap the finished subset into place."""
    if root.exists():
        shutil.rmtree(root)
    os.replace(staging, root)


def run(cfg: DictConfig) -> dict:
    root = Path(cfg.data.root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target, then swap: an interrupted run never leaves a half sample.
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        with tempfile.TemporaryDirectory(prefix=f".{root.name}-source-", dir=root.parent) as scratch:
            manifest = transform(cfg, extract(cfg, Path(scratch)), staging)
        load(staging, root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("sample: %d images in %s (%s)", manifest["images"], root, manifest["origin"])
    return manifest


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Build the sample subset in the Fruits-360 layout.", argv))


if __name__ == "__main__":
    run_command(main)
