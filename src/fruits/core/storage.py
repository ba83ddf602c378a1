"""One filesystem abstraction (fsspec) for local paths and S3, configured from the validated config."""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from fruits.core.errors import check_region

# data.layout=parquet: ingest's shards are named shard-<run id>-<n>.parquet; the index beside them is not one.
SHARD_GLOB = "shard-*.parquet"
ROW_GROUP_IMAGES = 256  # images per row group: Spark splits a Parquet file by row groups (a task reads a few)


def shard_name(run: str, number: int) -> str:
    return SHARD_GLOB.replace("*", f"{run}-{number:05d}")


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a local file, read in blocks."""
    with open(path, "rb") as stream:
        return hashlib.file_digest(stream, algorithm).hexdigest()


@dataclass(frozen=True)
class Storage:
    """How to reach the project's files: the storage settings that S3 needs, read only when an S3 URI
    needs them (a stage on local files reads none, so its DVC params need not list them). Functions
    that read or write files take this, not the whole config."""
    settings: Mapping  # the storage group: region, endpoint_url, kms_key_id

    @classmethod
    def of(cls, cfg: DictConfig) -> Storage:
        return cls(cfg.storage)

    @property
    def region(self) -> str | None:  # every S3 client's, checked to be in the EU before any call
        return self.settings.get("region")

    @property
    def endpoint_url(self) -> str | None:  # another S3 endpoint (a stand-in), or None for AWS
        return self.settings.get("endpoint_url") or None

    @property
    def kms_key_id(self) -> str | None:  # SSE-KMS for the objects the project writes, or None
        return self.settings.get("kms_key_id") or None


def filesystem(uri: str, store: Storage):
    """(fsspec filesystem, path inside it) for a local path or an s3:// URI.

    S3 clients take the region (checked to be in the EU) and the optional endpoint of store.
    """
    import fsspec

    if is_s3(uri):
        check_region("storage.region", store.region)  # the GDPR guard, before any call
        options = {"client_kwargs": {"region_name": store.region}}
        if store.endpoint_url:
            options["endpoint_url"] = store.endpoint_url
        fs = fsspec.filesystem("s3", **options)
        return fs, uri.split("://", 1)[1]
    return fsspec.filesystem("file"), local_path(uri)


def object_encryption(store: Storage) -> dict[str, str]:
    """Request options for objects the project writes: SSE-KMS with storage.kms_key_id when set (as
    the bucket default, stated on each object so that a bucket policy requiring it is met); none
    otherwise (the bucket's default SSE-S3 applies)."""
    key = store.kms_key_id
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": key} if key else {}


def local_path(uri: str) -> str:
    """A local path from a path or a `file:` URI as Spark writes it (`file:/a/b`)."""
    return uri.removeprefix("file:")


class ListedFile(NamedTuple):
    uri: str  # as Spark names it: file:/abs/path or s3://bucket/key
    relative: str  # below the listed root
    size: int
    etag: str | None = None  # S3 only; the MD5 of the content only for a single-part SSE-S3 object
    modified: str | None = None  # S3 only: when the object was written (LastModified)


def iter_files(uri: str, store: Storage, extensions):
    """Every file under uri whose extension is one of extensions (any case), one at a time: memory does
    not grow with the number of files (one folder's listing at most)."""
    from fsspec.core import strip_protocol

    fs, root = filesystem(uri, store)
    root = strip_protocol(uri if is_s3(uri) else root).rstrip("/")  # local: absolute, as fs.walk names files
    wanted = {e.lower() for e in extensions}
    scheme = "s3://" if is_s3(uri) else "file:"
    for folder, _, files in fs.walk(root, detail=True):
        for name, info in sorted(files.items()):
            if name.rsplit(".", 1)[-1].lower() in wanted:
                path = f"{folder}/{name}"
                modified = info.get("LastModified")
                yield ListedFile(scheme + path, path[len(root) + 1 :], int(info.get("size") or 0),
                                 info["ETag"].strip('"') if info.get("ETag") else None,
                                 modified.isoformat() if modified is not None else None)


def list_files(uri: str, store: Storage, extensions) -> list[ListedFile]:
    """Every file under uri whose extension is one of extensions (any case), sorted by URI, in memory:
    for the driver-side work that needs them all at once (ingest's upload and manifest)."""
    return sorted(iter_files(uri, store, extensions), key=lambda f: f.uri)


def copy_file(source: str, destination: str, store: Storage) -> None:
    """One file between local disk and S3 (either side), through the guarded filesystems."""
    source_fs, source_path = filesystem(source, store)
    destination_fs, destination_path = filesystem(destination, store)
    if not is_s3(destination):  # S3 has no folders to create
        Path(destination_path).parent.mkdir(parents=True, exist_ok=True)
    with source_fs.open(source_path, "rb") as src, destination_fs.open(destination_path, "wb") as dst:
        shutil.copyfileobj(src, dst)


@contextmanager
def atomic_output(destination: str | Path, store: Storage | None = None) -> Iterator[Path]:
    """The one way the project writes a file whole: yields a local path beside the destination (same
    name ending, so writers that check it accept it), written by the caller; then a rename into place
    locally, one PUT on S3 (an object appears whole). A failed write leaves no partial file and the
    previous file as it was. S3 destinations need store (the guarded filesystem)."""
    destination = str(destination)
    if is_s3(destination):
        with tempfile.TemporaryDirectory() as folder:
            partial = Path(folder) / destination.rsplit("/", 1)[-1]
            yield partial
            fs, path = filesystem(destination, store)
            fs.put_file(str(partial), path, **object_encryption(store))
        return
    path = Path(local_path(destination))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".partial-{secrets.token_hex(4)}.{path.name}")  # hidden: Spark and DVC skip it
    try:
        yield partial
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_record(metrics: str | Path, diagnostics: str | Path, record: dict, compared) -> None:
    """A stage's record, in two files: the keys that compare experiments (compared) to its DVC metrics
    file, so that `dvc exp show` stays readable; the whole record (timings, per-worker and per-label
    counts) to its diagnostics file, which the report reads and DVC keeps without comparing."""
    write_json(diagnostics, record)
    write_json(metrics, {key: record[key] for key in compared if key in record})


def write_json(path: str | Path, data: dict) -> Path:
    """A small JSON output (metrics, provenance, manifest), written whole (atomic_output)."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: str | Path, text: str) -> Path:
    """A small text output, replaced atomically (a reader sees the old or the new file, whole)."""
    with atomic_output(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)
