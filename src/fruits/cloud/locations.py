"""Where the EMR pipeline's S3 outputs live: one folder per what produced them, so that experiments
never share, overwrite or mix up a table; and the clean-up of the folders nothing names any more.

Features, rejects and PCA vectors stay in S3, outside DVC. Each goes to `<its configured URI>/k-<key>`,
the key a digest of what made it: the stage's params, the md5 of the small files it read (the very
hashes DVC records in emr/dvc.lock) and the keys of the S3 tables it read. So `-S pca.k=10` and
`-S pca.k=50` write two vector tables, two queued experiments never touch each other's, and
`dvc exp apply` brings back the params and small files from which that experiment's key, hence its
tables, follow. A table that grows incrementally (the features) is not keyed by the record of what
it grows with (ingest's metrics): new images update the same table, as locally.

`python -m fruits.cloud.locations gc [--apply]` lists (and with --apply deletes) the keyed folders
that no branch, tag, experiment (refs/exps) nor the workspace names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from fruits.core import logs, registry
from fruits.core.config import load_config
from fruits.core.storage import Storage, filesystem, is_s3
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

KEYED = {"featurize": ("env.paths.features", "env.paths.rejects"), "pca": ("env.paths.pca_vectors",)}  # pipeline order
GROWS_WITH = {"featurize": ("env.paths.ingest_metrics",)}  # new images update the same table
PREFIX = "k-"


def file_md5(path: str) -> str | None:
    """DVC's hash of a file (md5 of its bytes); None when it does not exist (yet)."""
    found = Path(path)
    return hashlib.md5(found.read_bytes()).hexdigest() if found.is_file() else None


def stage_key(cfg: DictConfig, name: str, md5_of, table_keys: dict[str, str]) -> str:
    """The digest of what the stage's S3 outputs are made from (cfg: the unkeyed config)."""
    stage = registry.stage(name)
    producers = registry.producers(registry.STAGES.values())
    files, tables = {}, {}
    for key in stage.inputs:
        if key in GROWS_WITH.get(name, ()):
            continue
        if key in table_keys:  # an S3 table: its key, and the record of the version it holds
            tables[key] = table_keys[key]
            for record in registry.small_files(cfg, producers[key].metrics):
                files[record] = md5_of(record)
        for path in registry.small_files(cfg, [key]):
            files[path] = md5_of(path)
    made_of = {"stage": name, "params": registry.params_of(cfg, [stage]), "files": files, "tables": tables}
    return hashlib.sha256(json.dumps(made_of, sort_keys=True, default=str).encode()).hexdigest()[:16]


def table_keys(cfg: DictConfig, md5_of=file_md5) -> dict[str, str]:
    """{output config key: key} for every keyed S3 output."""
    keys: dict[str, str] = {}
    for name, outputs in KEYED.items():
        key = stage_key(cfg, name, md5_of, keys)
        keys.update({output: key for output in outputs})
    return keys


def keyed(cfg: DictConfig, md5_of=file_md5) -> DictConfig:
    """A copy of cfg whose S3 tables point at the folders of what produced them. Local tables (the
    local pipeline, where DVC versions them itself) are left as they are."""
    resolved = cfg.copy()
    for output, key in table_keys(cfg, md5_of).items():
        base = str(OmegaConf.select(cfg, output))
        if is_s3(base):
            OmegaConf.update(resolved, output, f"{base}/{PREFIX}{key}")
    return resolved


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def lock_md5s(lock_text: str) -> dict[str, str]:
    """{path: md5} of every dependency and output a dvc.lock records."""
    found: dict[str, str] = {}
    for stage in (yaml.safe_load(lock_text) or {}).get("stages", {}).values():
        for entry in [*stage.get("deps", []), *stage.get("outs", [])]:
            if "md5" in entry:
                found[os.path.normpath(entry["path"])] = entry["md5"]
    return found


def referenced(params_file: str, lock_file: str) -> dict[str, set[str]]:
    """{output key: keyed URIs} named by the workspace and by every ref (branches, tags, experiments)."""
    named: dict[str, set[str]] = {}

    def add(params_text: str, lock_text: str) -> None:
        cfg = OmegaConf.create(yaml.safe_load(params_text))
        md5s = lock_md5s(lock_text)
        resolved = keyed(cfg, lambda path: md5s.get(os.path.normpath(os.path.relpath(path) if os.path.isabs(path) else path)))
        for output, uri in ((o, str(OmegaConf.select(resolved, o))) for o in table_keys(cfg)):
            named.setdefault(output, set()).add(uri)

    for ref in git("for-each-ref", "--format=%(refname)").split():
        try:
            add(git("show", f"{ref}:{params_file}"), git("show", f"{ref}:{lock_file}"))
        except subprocess.CalledProcessError:
            continue  # a ref without the EMR pipeline, or one that never ran it
    if Path(params_file).exists() and Path(lock_file).exists():
        add(Path(params_file).read_text(), Path(lock_file).read_text())
    return named


def unreferenced(cfg: DictConfig, named: dict[str, set[str]]) -> list[str]:
    """The keyed folders under each S3 output's URI that nothing names."""
    stale = []
    for output in table_keys(cfg):
        base = str(OmegaConf.select(cfg, output))
        if not is_s3(base):
            continue
        fs, root = filesystem(base, Storage.of(cfg))
        if not fs.exists(root):
            continue
        # The folders that hold objects (a listing with a delimiter can also name folders whose objects
        # are all deleted, behind delete markers: moto does)
        folders = {path[len(root):].lstrip("/").split("/", 1)[0] for path in fs.find(root)}
        stale += [f"{base}/{f}" for f in folders if f.startswith(PREFIX) and f"{base}/{f}" not in named.get(output, set())]
    return sorted(set(stale))


def gc(cfg: DictConfig, params_file: str, lock_file: str, apply: bool) -> list[str]:
    stale = unreferenced(cfg, referenced(params_file, lock_file))
    for uri in stale:
        if apply:
            fs, path = filesystem(uri, Storage.of(cfg))
            fs.rm(path, recursive=True)
        print(("deleted " if apply else "would delete ") + uri)
    if not apply and stale:
        print(f"{len(stale)} folder(s) no commit or experiment names: `make s3-gc APPLY=1` deletes them "
              "(the bucket is versioned: S3 keeps their noncurrent versions until its lifecycle rule expires them "
              "after storage.noncurrent_days, or `make purge-erased PARAMS=emr/params.yaml APPLY=1` deletes them)")
    return stale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The EMR pipeline's S3 tables that no commit or experiment names")
    parser.add_argument("action", choices=["gc"])
    parser.add_argument("--params", default=registry.EMR_PARAMS, help="composed config (default: %(default)s)")
    parser.add_argument("--apply", action="store_true", help="delete them (without it: a dry run)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    lock = str(Path(args.params).with_name("dvc.lock"))
    gc(load_config([], args.params), args.params, lock, args.apply)


if __name__ == "__main__":
    run_command(main)
