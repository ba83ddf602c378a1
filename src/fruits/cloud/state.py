"""The running cluster's record (cluster.state_file, git-ignored): which backend is up and how to reach
it. `make cluster` writes it; the steps, `cluster-status` and `cluster-down` read it, so they act on the
cluster that is up whatever the config's cluster option says now."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig


def path(cfg: DictConfig) -> Path:
    return Path(cfg.cluster.state_file)


def read(cfg: DictConfig) -> dict | None:
    found = path(cfg)
    return json.loads(found.read_text()) if found.exists() else None


def write(cfg: DictConfig, state: dict) -> None:
    found = path(cfg)
    found.write_text(json.dumps(state, indent=2) + "\n")
    found.chmod(0o600)  # it may name an S3 endpoint's throw-away credentials


def remove(cfg: DictConfig) -> None:
    path(cfg).unlink(missing_ok=True)
