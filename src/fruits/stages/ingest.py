"""ingest: put the selected dataset where featurize reads it, and write its manifest.

data.layout=parquet packs the images into Parquet shards (path, split, label, checksum, size, content)
of about data.shard_mb, locally or in S3: a run writes only the new and changed images, into new
shards, never rewriting an old one; an index (path, checksum, size, shard, md5) says which shard holds
each current image. Otherwise:

storage=local: the images stay on local disk (data.root). storage=s3: they are uploaded in parallel
to storage.uris.raw (s3://<bucket>/<prefix>/raw/<split>/<label>/<file>), skipping objects already there with the same
content (so an interrupted upload resumes), and the final count is verified. "The same content" never
relies on the ETag being the MD5, which holds only for single-part SSE-S3 objects: each object carries
its content MD5 in its metadata, and storage.uris.uploads records the ETag S3 gave each upload, so a
rerun under SSE-KMS skips from the listing alone. Either way the
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

from fruits.core.aws import client, require_bucket
from fruits.core.config import stage_config
from fruits.core.errors import ConfigError
from fruits.core.ids import stamped_id
from fruits.core.images import CONTRIBUTED_PREFIX, RejectedImage, parse_image_path
from fruits.core.registry import SAMPLE_MANIFEST
from fruits.core.storage import (
    ROW_GROUP_IMAGES,
    ListedFile,
    Storage,
    atomic_output,
    file_digest,
    filesystem,
    is_s3,
    list_files,
    local_path,
    object_encryption,
    shard_name,
    write_record,
)
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

# What compares experiments (the DVC metrics file): the per-label counts go to the diagnostics file. The
# listing checksums are what featurize's DVC dependency on this file sees change when images do.
COMPARED = ("origin", "source_files", "ignored", "not_selected", "images", "bytes", "labels", "listing_sha256",
            "destination", "remote_images", "remote_listing_sha256", "contributed_in_bucket")

UPLOAD_THREADS = 8  # small objects: latency-bound, so a few requests in flight
MD5_METADATA = "fruits-md5"  # object metadata: the MD5 of the content ingest uploaded


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


def to_upload(local: list[ListedFile], remote: list[ListedFile], md5s: dict[str, str],
              uploads: dict[str, dict]) -> tuple[list[ListedFile], list[ListedFile]]:
    """(pending, unsure): the local files whose object is missing or has another size, and those whose
    object has the right size but whose content the listing cannot confirm.

    The listing confirms an object when its ETag is the one S3 gave to the upload of this very content
    (the upload record), or equals the content's MD5 (single-part SSE-S3). An object replaced by
    anyone since has another ETag: unsure, so its metadata decides."""
    present = {f.relative: f for f in remote}
    pending, unsure = [], []
    for file in local:
        there, md5 = present.get(file.relative), md5s[file.relative]
        if there is None or there.size != file.size:
            pending.append(file)
        elif there.etag != md5 and uploads.get(file.relative) != {"md5": md5, "etag": there.etag}:
            unsure.append(file)
    return pending, unsure


def read_uploads(fs, path: str) -> dict[str, dict]:
    """The upload record ({relative path: {md5, etag}}); empty when there is none or it is unreadable
    (then every object's metadata is checked once: slower, never wrong)."""
    try:
        with fs.open(path, "rb") as stream:
            record = json.load(stream)
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("ingest: ignoring the unreadable upload record %s (%s); checking object metadata instead", path, err)
        return {}


def upload(cfg: DictConfig, local: list[ListedFile], md5s: dict[str, str]) -> dict:
    """Upload what is missing or differs, in parallel with a progress bar; verify the count at the end."""
    destination = cfg.storage.uris.raw
    store = Storage.of(cfg)
    fs, root = filesystem(destination, store)
    require_bucket(client("s3", cfg), cfg.storage.bucket)  # never write into a non-EU (or missing) bucket
    _, record_path = filesystem(cfg.storage.uris.uploads, store)
    fs.invalidate_cache()  # a listing cached earlier in this process may predate others' changes
    remote = list_files(destination, store, cfg.data.extensions) if fs.exists(root) else []
    pending, unsure = to_upload(local, remote, md5s, read_uploads(fs, record_path))
    if unsure:  # one HEAD each: after an interrupted run, the objects it uploaded before the record
        with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
            stored = list(pool.map(lambda f: fs.metadata(f"{root}/{f.relative}").get(MD5_METADATA), unsure))
        pending += [file for file, md5 in zip(unsure, stored, strict=True) if md5 != md5s[file.relative]]
    log.info("ingest: %d of %d files to upload to %s", len(pending), len(local), destination)
    put_options = object_encryption(store)

    def put(file: ListedFile) -> None:
        fs.put_file(local_path(file.uri), f"{root}/{file.relative}",
                    Metadata={MD5_METADATA: md5s[file.relative]}, **put_options)

    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        for _ in tqdm(pool.map(put, pending), total=len(pending), desc="upload", unit="file", disable=not pending):
            pass
    contributed = sync_contributed(cfg, fs, root, {f.relative for f in local}, remote)
    fs.invalidate_cache()
    uploaded = list_files(destination, store, cfg.data.extensions)
    missing = {f.relative for f in local} - {f.relative for f in uploaded}
    if missing:
        raise RuntimeError(f"ingest: {len(missing)} file(s) missing in {destination} after upload, e.g. {sorted(missing)[:3]}")
    etags = {f.relative: f.etag for f in uploaded}
    record = {f.relative: {"md5": md5s[f.relative], "etag": etags[f.relative]} for f in local}
    fs.pipe_file(record_path, json.dumps(record, sort_keys=True).encode(), **put_options)
    return {"destination": destination, "uploaded": len(pending), "skipped": len(local) - len(pending),
            "checked_metadata": len(unsure), "remote_images": len(uploaded), **contributed,
            "remote_listing_sha256": listing_checksum(uploaded)}


def sync_contributed(cfg: DictConfig, fs, root: str, local: set[str], remote: list[ListedFile]) -> dict:
    """The app's approved photos kept in the bucket (env.paths.approved on S3, `<split>/<label>/<id>.jpg`)
    join the raw prefix as `<split>/<label>/contributed_<id>.jpg`, as the sample stage adds local ones
    to data.root; and a contributed photo of the raw prefix whose approved photo is gone (erased) is
    deleted there, unless data.root holds it. Images put in the raw prefix by other hands are left alone.
    remote: the raw prefix's listing from before this run's uploads, which touch no contributed copy."""
    approved = str(cfg.env.paths.approved).rstrip("/")
    wanted: dict[str, ListedFile] = {}
    fs.invalidate_cache()  # the app may have approved or erased photos since this process listed
    store = Storage.of(cfg)
    if is_s3(approved) and fs.exists(filesystem(approved, store)[1]):
        for photo in list_files(approved, store, cfg.data.extensions):
            folder, _, name = photo.relative.rpartition("/")
            if folder.count("/") == 1:  # <split>/<label>, as the store writes them
                wanted[f"{folder}/{CONTRIBUTED_PREFIX}{name}"] = photo
    there = {f.relative: f for f in remote if f.relative.rpartition("/")[2].startswith(CONTRIBUTED_PREFIX)}
    copies = [relative for relative, photo in wanted.items()
              if relative not in there or there[relative].size != photo.size]
    erased = sorted(set(there) - set(wanted) - local)
    for relative in copies:
        content = fs.cat_file(filesystem(wanted[relative].uri, store)[1])
        fs.pipe_file(f"{root}/{relative}", content, Metadata={MD5_METADATA: hashlib.md5(content).hexdigest()},
                     **object_encryption(store))
    for relative in erased:
        fs.rm_file(f"{root}/{relative}")
    if copies or erased:
        log.info("ingest: %d approved contribution(s) copied from %s, %d erased one(s) deleted from the raw prefix",
                 len(copies), approved, len(erased))
    return {"contributed_in_bucket": len(wanted), "contributed_copied": len(copies), "contributed_deleted": len(erased)}


def listing_checksum(remote: list[ListedFile]) -> str:
    """A change signal for the S3 prefix from its LIST alone (key, size, ETag, LastModified): images added,
    replaced or deleted there by anyone change it, and so does a prefix written again from scratch (a
    bucket emptied and refilled, a restarted S3 stand-in), whose tables downstream are gone with it.
    No object is downloaded."""
    digest = hashlib.sha256()
    for file in sorted(remote, key=lambda f: f.relative):
        digest.update(f"{file.relative}\t{file.size}\t{file.etag}\t{file.modified}\n".encode())
    return digest.hexdigest()


def content_md5s(local: list[ListedFile]) -> dict[str, str]:
    """{relative path: MD5 of the content}, read once per run (manifest and upload skip both use it)."""
    return {file.relative: file_digest(local_path(file.uri), "md5") for file in local}


SHARD_COLUMNS = [("path", "string"), ("split", "string"), ("label", "string"), ("checksum", "string"),
                 ("size", "int64"), ("content", "binary")]


def arrow_schema(columns):
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in columns])


def read_index(cfg: DictConfig) -> dict[str, tuple[str, int, str, str | None]]:
    """{image path: (checksum, size, shard, md5)} of the images the shards hold now; empty before the first."""
    import pyarrow.parquet as pq

    fs, index = filesystem(cfg.env.paths.shard_index, Storage.of(cfg))
    fs.invalidate_cache()  # s3fs keeps listings across calls: the index may be newer than they are
    if not fs.exists(index):
        return {}
    with fs.open(index, "rb") as stream:
        table = pq.read_table(stream)
    return {row["path"]: (row["checksum"], row["size"], row["shard"], row.get("md5")) for row in table.to_pylist()}


def write_parquet(table, destination: str, cfg: DictConfig, replace: bool = True) -> None:
    """Written beside it under a hidden name (Spark skips those), then moved into place: a reader never
    sees half a file (a rename locally; on S3 an object appears whole). replace=False refuses to
    overwrite an existing file."""
    import pyarrow.parquet as pq

    store = Storage.of(cfg)
    fs, path = filesystem(destination, store)
    if not replace and fs.exists(path):
        raise FileExistsError(f"{destination} exists already: a shard is never rewritten")
    with atomic_output(destination, store) as partial:
        pq.write_table(table, partial, row_group_size=ROW_GROUP_IMAGES)


def pack(cfg: DictConfig, local: list[ListedFile], md5s: dict[str, str]) -> dict:
    """Pack new and changed images into new shards of about data.shard_mb; old shards are never
    rewritten. The index (path, checksum, size, shard, md5 of every current image) is rewritten last.
    An image whose MD5 (already computed for the manifest) is the indexed one is not read again."""
    import pyarrow as pa

    index, current = read_index(cfg), {}
    # Unique per run: a shard, once written, is never replaced (two runs may start in the same second).
    run = stamped_id()
    pending: list[dict] = []
    pending_bytes, shards_written = 0, []

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            name = shard_name(run, len(shards_written))
            write_parquet(pa.Table.from_pylist(pending, arrow_schema(SHARD_COLUMNS)), f"{cfg.env.paths.shards}/{name}",
                          cfg, replace=False)
            for row in pending:
                current[row["path"]] = (row["checksum"], row["size"], name, md5s[row["path"]])
            shards_written.append(name)
            pending, pending_bytes = [], 0

    for file in sorted(local, key=lambda f: f.relative):
        known = index.get(file.relative)
        if known and known[3] == md5s[file.relative]:
            current[file.relative] = known
            continue
        content = Path(local_path(file.uri)).read_bytes()
        checksum = hashlib.sha256(content).hexdigest()
        if known and known[0] == checksum:  # an index written before it recorded MD5s
            current[file.relative] = (*known[:3], md5s[file.relative])
            continue
        try:
            split, label = parse_image_path(file.relative)
        except RejectedImage:
            split = label = None  # featurize rejects it with the reason
        pending.append({"path": file.relative, "split": split, "label": label, "checksum": checksum,
                        "size": len(content), "content": content})
        pending_bytes += len(content)
        if pending_bytes >= cfg.data.shard_mb * 2**20:
            flush()
    flush()
    rows = [{"path": path, "checksum": c, "size": s, "shard": shard, "md5": md5}
            for path, (c, s, shard, md5) in sorted(current.items())]
    index_columns = [("path", "string"), ("checksum", "string"), ("size", "int64"), ("shard", "string"), ("md5", "string")]
    write_parquet(pa.Table.from_pylist(rows, arrow_schema(index_columns)), cfg.env.paths.shard_index, cfg)
    per_shard = Counter(shard for _, _, shard, _ in current.values())
    digest = hashlib.sha256("".join(f"{r['path']}\t{r['checksum']}\t{r['shard']}\n" for r in rows).encode())
    return {"shards": len(per_shard), "shards_written": len(shards_written), "images_packed": sum(
        1 for _, _, shard, _ in current.values() if shard in shards_written), "images_per_shard": dict(sorted(per_shard.items())),
        "shard_index_sha256": digest.hexdigest()}


def extract(cfg: DictConfig) -> tuple[list[ListedFile], dict[str, str], dict]:
    """The image files under data.root, their MD5s, and where they come from (the sample's manifest)."""
    local = list_files(cfg.data.root, Storage.of(cfg), cfg.data.extensions)
    if not local:
        raise ConfigError(f"data.root={cfg.data.root} is missing or holds no {'/'.join(cfg.data.extensions)} "
                          "image: run the sample stage (make sample) or set data.root")
    return local, content_md5s(local), source_accounting(cfg)


def source_accounting(cfg: DictConfig) -> dict:
    """Where the images come from and what their source held (the sample stage's manifest): every file
    of the source is an image here, an ignored file (listed with its reason) or left out of the subset."""
    manifest_file = Path(cfg.data.root) / SAMPLE_MANIFEST
    if not manifest_file.exists():
        return {"origin": f"images found in {cfg.data.root}"}
    manifest = json.loads(manifest_file.read_text())
    accounting = {"origin": manifest.get("origin") or f"images found in {cfg.data.root}"}
    if "source_files" in manifest:
        accounting.update(source_files=manifest["source_files"], ignored=len(manifest["ignored"]),
                          ignored_files=manifest["ignored"], not_selected=manifest["not_selected"])
    return accounting


def transform(local: list[ListedFile], md5s: dict[str, str], origin: dict) -> dict:
    return {**origin, **manifest(local, md5s)}


def load(cfg: DictConfig, local: list[ListedFile], md5s: dict[str, str], result: dict) -> dict:
    """Pack into shards (data.layout=parquet) or upload the files (storage=s3), then write the manifest
    that DVC tracks."""
    if cfg.data.layout == "parquet":
        if is_s3(str(cfg.env.paths.approved)):
            log.warning("ingest: data.layout=parquet packs data.root only: approved photos kept in %s are not "
                        "packed (data.layout=files copies them to the raw prefix)", cfg.env.paths.approved)
        result["shards"] = pack(cfg, local, md5s)
        log.info("ingest: %d image(s) packed into %d new shard(s) under %s", result["shards"]["images_packed"],
                 result["shards"]["shards_written"], cfg.env.paths.shards)
    elif cfg.storage.name == "s3":
        transfer = upload(cfg, local, md5s)
        result.update(destination=transfer["destination"], remote_images=transfer["remote_images"],
                      remote_listing_sha256=transfer["remote_listing_sha256"],
                      **{k: v for k, v in transfer.items() if k.startswith("contributed_")})
        log.info("ingest: %d uploaded, %d already there", transfer["uploaded"], transfer["skipped"])
    write_record(cfg.env.paths.ingest_metrics, cfg.env.paths.ingest_diagnostics, result, COMPARED)
    return result


def run(cfg: DictConfig) -> dict:
    if cfg.storage.name == "s3":  # before reading any image: the bucket exists, in the EU
        require_bucket(client("s3", cfg), cfg.storage.bucket)
    local, md5s, origin = extract(cfg)
    result = load(cfg, local, md5s, transform(local, md5s, origin))
    log.info("ingest: %d images, %d labels, %d bytes in %s", result["images"], result["labels"], result["bytes"],
             cfg.env.paths.images)
    return result


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Place the dataset where featurize reads it and write its manifest.", argv))


if __name__ == "__main__":
    run_command(main)
