"""One interface to the cluster, two implementations: EMR (AWS) and Spark standalone (this machine).
The lifecycle (`make cluster`, `cluster-status`, `cluster-down`) and the steps speak only to this."""

from __future__ import annotations

from typing import Any, Protocol

from omegaconf import DictConfig

from fruits.cloud.emr import EmrBackend
from fruits.cloud.standalone import StandaloneBackend
from fruits.cloud.state import Record


class ClusterBackend(Protocol):
    kind: str

    def create(self, cfg: DictConfig) -> Record:
        """Start the cluster (or reuse the running one), the bucket and the artifacts; record it; wait until
        it is ready."""

    def status(self, cfg: DictConfig, record: Record) -> dict: ...

    def submit_step(self, cfg: DictConfig, record: Record, stage: str, run_uri: str, run_id: str) -> Any:
        """Start the stage's spark-submit step; a handle for wait()."""

    def wait(self, cfg: DictConfig, record: Record, step: Any) -> None:
        """Until the step ends; its failure raises with the reason and where its log is."""

    def destroy(self, cfg: DictConfig, record: Record) -> str:
        """Stop everything the cluster holds, remove its record; what was done, in a line."""


BACKENDS: dict[str, ClusterBackend] = {backend.kind: backend for backend in (EmrBackend(), StandaloneBackend())}


def of_kind(kind: str) -> ClusterBackend:
    return BACKENDS[kind]
