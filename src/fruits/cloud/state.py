"""The running cluster's record (cluster.state_file, git-ignored): which backend is up and how to reach
it, as a typed record. `make cluster` writes it; the steps, `cluster-status` and `cluster-down` read it,
so they act on the cluster that is up whatever the config's cluster option says now."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig


@dataclass(frozen=True)
class S3Access:
    """Which S3 a standalone cluster and the pipeline's own processes use, and the environment that
    points them there (empty for AWS itself: the caller's credentials and region apply)."""

    kind: str  # aws | endpoint (storage.endpoint_url) | standin (moto in its own process)
    region: str
    environment: dict[str, str] = field(default_factory=dict)
    endpoint: str | None = None
    truststore: str | None = None  # the JVMs' truststore holding the endpoint's certificate
    pid: int | None = None  # the stand-in's process


@dataclass(frozen=True)
class EmrCluster:
    cluster_id: str
    region: str
    kind: str = "emr"

    @property
    def address(self) -> str:
        return self.cluster_id


@dataclass(frozen=True)
class StandaloneCluster:
    master: str  # spark://host:port
    ui: str
    host: str
    run_dir: str
    python: str  # the nodes' interpreter (the bootstrap script's venv)
    spark_home: str
    workers: int
    env_file: str
    s3: S3Access
    pids: dict[str, int] = field(default_factory=dict)  # master, worker-1 … (each its process group's leader)
    start_seconds: float | None = None
    kind: str = "standalone"

    @property
    def address(self) -> str:
        return self.master

    @property
    def logs(self) -> Path:
        return Path(self.run_dir) / "logs"


Record = EmrCluster | StandaloneCluster


def path(cfg: DictConfig) -> Path:
    return Path(cfg.cluster.state_file)


def read(cfg: DictConfig) -> Record | None:
    found = path(cfg)
    if not found.exists():
        return None
    fields = json.loads(found.read_text())
    if fields.pop("kind", "emr") == "standalone":
        return StandaloneCluster(**{**fields, "s3": S3Access(**fields["s3"])})
    return EmrCluster(**fields)


def write(cfg: DictConfig, record: Record) -> None:
    found = path(cfg)
    found.write_text(json.dumps(dataclasses.asdict(record), indent=2) + "\n")
    found.chmod(0o600)  # it may name an S3 endpoint's throw-away credentials


def remove(cfg: DictConfig) -> None:
    path(cfg).unlink(missing_ok=True)
