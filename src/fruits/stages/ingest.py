"""ingest: put the selected dataset where featurize reads it, and write its manifest.

storage=local: the images stay on local disk (data.root). storage=s3: they are uploaded in parallel
to storage.uris.raw (s3://<bucket>/<prefix>/raw/<split>/<label>/<file>), skipping objects already there with the same
size and MD5 (so an interrupted upload resumes), and the final count is verified. Either way the
manifest (count per label and split, total bytes, a checksum of the listing) is what DVC tracks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from fruits.core.aws import check_location, client
from fruits.core.config import stage_config
from fruits.core.images import RejectedImage, parse_image_path
from fruits.core.storage import ListedFile, file_digest, filesystem, list_files, local_path, write_json

log = logging.getLogger(__name__)

UPLOAD_THREADS = 8  # small objects: latency-bound, so a few requests in flight


def manifest(listed: list[ListedFile], md5s: dict[str, str]) -> dict:
    """Counts per split and label, total bytes, and a checksum of (relative path, size, content MD5) of
    every file: any image added, changed or deleted changes it, so DVC re-runs what depends on it."""
    counts: Counter[tuple[str, str]] = Counter()
    outside = []
    digest = hashlib.sha256()
    for file in sorted(listed, key=lambda f: f.relative):
        digest.update(f"{file.relative}\t{file.size}\t{md5s[file.relative]}\n".encode())
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


def to_upload(local: list[ListedFile], remote: list[ListedFile], md5s: dict[str, str]) -> list[ListedFile]:
    """The local files whose object is missing or differs (size, then MD5 against the ETag)."""
    present = {f.relative: f for f in remote}
    pending = []
    for file in local:
        there = present.get(file.relative)
        if there is None or there.size != file.size or there.etag != md5s[file.relative]:
            pending.append(file)
    return pending


def upload(cfg: DictConfig, local: list[ListedFile], md5s: dict[str, str]) -> dict:
    """Upload what is missing, in parallel with a progress bar; verify the count at the end."""
    destination = cfg.storage.uris.raw
    fs, root = filesystem(destination, cfg)
    check_location(client("s3", cfg), cfg.storage.bucket)  # never write into a non-EU bucket
    remote = list_files(destination, cfg, cfg.data.extensions) if fs.exists(root) else []
    pending = to_upload(local, remote, md5s)
    log.info("ingest: %d of %d files to upload to %s", len(pending), len(local), destination)

    def put(file: ListedFile) -> None:
        fs.put_file(local_path(file.uri), f"{root}/{file.relative}")

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        for _ in tqdm(pool.map(put, pending), total=len(pending), desc="upload", unit="file", disable=not pending):
            pass
    fs.invalidate_cache()
    uploaded = list_files(destination, cfg, cfg.data.extensions)
    missing = {f.relative for f in local} - {f.relative for f in uploaded}
    if missing:
        raise RuntimeError(f"ingest: {len(missing)} file(s) missing in {destination} after upload, e.g. {sorted(missing)[:3]}")
    return {"destination": destination, "uploaded": len(pending), "skipped": len(local) - len(pending),
            "remote_images": len(uploaded), "remote_listing_sha256": listing_checksum(uploaded)}


def listing_checksum(remote: list[ListedFile]) -> str:
    """A change signal for the S3 prefix from its LIST alone (key, size, ETag): images added, replaced or
    deleted there by anyone change it, and no object is downloaded."""
    digest = hashlib.sha256()
    for file in sorted(remote, key=lambda f: f.relative):
        digest.update(f"{file.relative}\t{file.size}\t{file.etag}\n".encode())
    return digest.hexdigest()


def content_md5s(local: list[ListedFile]) -> dict[str, str]:
    """{relative path: MD5 of the content}, read once per run (manifest and upload skip both use it)."""
    return {file.relative: file_digest(local_path(file.uri), "md5") for file in local}


def extract(cfg: DictConfig) -> tuple[list[ListedFile], dict[str, str], dict]:
    """The image files under data.root, their MD5s, and where they come from (the sample's manifest)."""
    local = list_files(cfg.data.root, cfg, cfg.data.extensions)
    if not local:
        raise FileNotFoundError(f"data.root={cfg.data.root} holds no {list(cfg.data.extensions)} files")
    origin_file = Path(cfg.data.root) / "MANIFEST.json"
    origin = json.loads(origin_file.read_text()).get("origin") if origin_file.exists() else None
    return local, content_md5s(local), {"origin": origin or f"images found in {cfg.data.root}"}


def transform(local: list[ListedFile], md5s: dict[str, str], origin: dict) -> dict:
    return {**origin, **manifest(local, md5s)}


def load(cfg: DictConfig, local: list[ListedFile], md5s: dict[str, str], result: dict) -> dict:
    """Upload to S3 (storage=s3), then write the manifest that DVC tracks."""
    if cfg.storage.name == "s3":
        transfer = upload(cfg, local, md5s)
        result.update(destination=transfer["destination"], remote_images=transfer["remote_images"],
                      remote_listing_sha256=transfer["remote_listing_sha256"])
        log.info("ingest: %d uploaded, %d already there", transfer["uploaded"], transfer["skipped"])
    write_json(cfg.env.paths.ingest_metrics, result)
    return result


def run(cfg: DictConfig) -> dict:
    local, md5s, origin = extract(cfg)
    result = load(cfg, local, md5s, transform(local, md5s, origin))
    log.info("ingest: %d images, %d labels, %d bytes in %s", result["images"], result["labels"], result["bytes"],
             cfg.env.paths.images)
    return result


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Place the dataset where featurize reads it and write its manifest.", argv))


if __name__ == "__main__":
    main()
