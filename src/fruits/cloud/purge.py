"""Erasure's last step: purge the copies that outlive an erased photo once `dvc repro` has rebuilt every
current output without it.

Two places still hold what was derived from it (docs/app.md: "What still holds an erased photo"):
- **the DVC cache and remote**: the outputs of older commits and experiments (the sample folder that
  held the photo, the features table with its row, the index naming it). `dvc gc --workspace` keeps
  only what the workspace's outputs use; with `--cloud`, in the DVC remote too.
- **the bucket's object versions**: the bucket is versioned, so an object deleted or overwritten (a
  contributed photo, a table version's Parquet files, the previous upload record, what `dvc gc
  --cloud` removed from the remote) stays as a noncurrent version. Every noncurrent version and delete
  marker under the project's prefix (`storage.uris.root`) is deleted, nothing outside it. (The bucket's
  lifecycle rule expires them after `storage.noncurrent_days` anyway.)

The bucket is touched only when the config's storage is S3 (the EMR pipeline's: `--params
emr/params.yaml`). A dry run by default: what would go, counted; `--apply` deletes.

    python -m fruits.cloud.purge [--params emr/params.yaml] [--apply] [overrides]   # make purge-erased [APPLY=1]
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from fruits.core import logs, registry
from fruits.core.aws import client, require_bucket
from fruits.core.config import load_config
from fruits.core.logs import run_command

DELETE_BATCH = 1000  # the most keys one DeleteObjects request takes


@dataclass(frozen=True)
class OldVersion:
    key: str
    version_id: str
    size: int  # 0 for a delete marker
    delete_marker: bool


def old_versions(s3, bucket: str, prefix: str) -> list[OldVersion]:
    """Every noncurrent version and every delete marker under prefix (a folder: `prefix/`)."""
    found = []
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=f"{prefix.rstrip('/')}/"):
        found += [OldVersion(v["Key"], v["VersionId"], v["Size"], False) for v in page.get("Versions", [])
                  if not v["IsLatest"]]
        found += [OldVersion(m["Key"], m["VersionId"], 0, True) for m in page.get("DeleteMarkers", [])]
    return found


def delete_versions(s3, bucket: str, versions: list[OldVersion]) -> None:
    for start in range(0, len(versions), DELETE_BATCH):
        batch = [{"Key": v.key, "VersionId": v.version_id} for v in versions[start:start + DELETE_BATCH]]
        errors = s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}).get("Errors", [])
        if errors:
            first = errors[0]
            raise RuntimeError(f"S3 refused to delete {len(errors)} version(s) in s3://{bucket}, e.g. "
                               f"{first['Key']} ({first.get('Code')}: {first.get('Message')})")


def purge_bucket(cfg: DictConfig, apply: bool) -> list[OldVersion]:
    """The project prefix's noncurrent versions and delete markers: listed, deleted with apply."""
    s3 = client("s3", cfg)
    bucket, prefix = cfg.storage.bucket, cfg.storage.prefix
    require_bucket(s3, bucket)
    versions = old_versions(s3, bucket, prefix)
    markers = sum(v.delete_marker for v in versions)
    size_mb = sum(v.size for v in versions) / 1e6
    verb = "deleted" if apply else "would delete"
    if apply:
        delete_versions(s3, bucket, versions)
    print(f"s3://{bucket}/{prefix}/: {verb} {len(versions) - markers} noncurrent version(s) ({size_mb:.1f} MB) "
          f"and {markers} delete marker(s)")
    return versions


def purge_dvc(repo: Path, cloud: bool, apply: bool) -> str:
    """DVC's gc over the workspace (and the remote): keep only what the workspace's outputs use. What
    DVC said. Through DVC's Python API, as the project drives DVC everywhere."""
    from dvc.repo import Repo

    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("dvc", "dvc_data")]  # gc's counts; the objects it removes
    saved = [(found.level, found.propagate) for found in loggers]
    for found in loggers:
        found.addHandler(handler)
        found.setLevel(logging.INFO)  # said at INFO
        found.propagate = False  # said once, below
    try:
        with Repo(str(repo)) as dvc:
            dvc.gc(workspace=True, force=True, cloud=cloud, dry=not apply)
    finally:
        for found, (level, propagate) in zip(loggers, saved):
            found.removeHandler(handler)
            found.setLevel(level)
            found.propagate = propagate
    command = f"dvc gc --workspace --force{' --cloud' if cloud else ''}{'' if apply else ' --dry'}"
    dry = "" if apply else " (a dry run: DVC counts what it would remove, nothing is removed)"
    text = "\n".join(said) or "nothing to remove"
    print(f"DVC cache{' and remote' if cloud else ''}, as `{command}`{dry}:\n{text}")
    return text


def purge(cfg: DictConfig, repo: Path, apply: bool) -> None:
    in_s3 = cfg.storage.name == "s3"
    purge_dvc(repo, cloud=in_s3, apply=apply)  # first: what it removes from the remote becomes noncurrent versions
    if in_s3:
        purge_bucket(cfg, apply)
    else:
        print(f"storage.name={cfg.storage.name}: no bucket to purge (the EMR pipeline's: --params {registry.EMR_PARAMS})")
    if not apply:
        print("A dry run: `make purge-erased APPLY=1` deletes these. Older commits and experiments lose their "
              "cached outputs (`dvc repro` or `dvc exp run` rebuilds them).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Purge the DVC cache and the bucket's old object versions")
    parser.add_argument("--params", help="composed config (default: the project's params.yaml)")
    parser.add_argument("--repo", default=".", help="the DVC repository (default: the current folder)")
    parser.add_argument("--apply", action="store_true", help="delete (without it: a dry run)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. storage.bucket=…")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    purge(load_config(args.overrides, args.params), Path(args.repo), args.apply)


if __name__ == "__main__":
    run_command(main)
