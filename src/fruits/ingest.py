"""ingest: put the selected dataset where featurize reads it, and write its manifest.

Local env: the images stay on local disk (data.root); the manifest (count per label and split, total
bytes, a checksum of the listing) is what DVC tracks, so a changed dataset re-runs what follows.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig

from fruits.images import RejectedImage, parse_image_path
from fruits.storage import ListedFile, list_files

log = logging.getLogger(__name__)


def manifest(listed: list[ListedFile]) -> dict:
    """Counts per split and label, total bytes, and a checksum of (relative path, size) of every file."""
    counts: Counter[tuple[str, str]] = Counter()
    outside = []
    digest = hashlib.sha256()
    for file in sorted(listed, key=lambda f: f.relative):
        digest.update(f"{file.relative}\t{file.size}\n".encode())
        try:
            counts[parse_image_path(file.relative)] += 1
        except RejectedImage:
            outside.append(file.relative)
    per_split: dict[str, dict[str, int]] = {}
    for (split, label), count in sorted(counts.items()):
        per_split.setdefault(split, {})[label] = count
    return {
        "images": len(listed),
        "bytes": sum(f.size for f in listed),
        "labels": len({label for _, label in counts}),
        "per_split": per_split,
        "outside_layout": outside,
        "listing_sha256": digest.hexdigest(),
    }


def run(cfg: DictConfig) -> dict:
    listed = list_files(cfg.data.root, cfg, cfg.featurize.extensions)
    if not listed:
        raise FileNotFoundError(f"data.root={cfg.data.root} holds no {list(cfg.featurize.extensions)} files")
    result = manifest(listed)
    path = Path(cfg.env.paths.metrics) / "ingest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    log.info("ingest: %d images, %d labels, %d bytes in %s", result["images"], result["labels"], result["bytes"],
             cfg.env.paths.images)
    return result


def main(argv: list[str] | None = None) -> None:
    from fruits.config import stage_config

    run(stage_config("Place the dataset where featurize reads it and write its manifest.", argv))


if __name__ == "__main__":
    main()
