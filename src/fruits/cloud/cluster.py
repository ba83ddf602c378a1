"""The cluster lifecycle: plan, create (or reuse), status, down, whichever backend (cluster.kind: EMR, or
Spark standalone on this machine) the config names; status and down act on the one that is recorded.

`make cluster` ensures the bucket, uploads the bootstrap script, the pins and the packaged code, then
creates the cluster (EMR: EU region, idle auto-termination always set, no SSH open to the world, at-rest
encryption, logs in the project bucket), waits until it is ready, and records it in a git-ignored
state file. A running cluster of this project is reused.
"""

from __future__ import annotations

import argparse
import json

from omegaconf import DictConfig

from fruits.cloud import backend
from fruits.cloud import state as cluster_state
from fruits.cloud.emr import check_definition, run_job_flow_request
from fruits.core import logs
from fruits.core.config import load_config
from fruits.core.errors import ConfigError
from fruits.core.logs import run_command


def create(cfg: DictConfig) -> str:
    """Bucket, artifacts, cluster (or the running one), state file. Returns the cluster id (EMR) or the
    master's URL (standalone)."""
    check_definition(cfg)
    recorded, kind = cluster_state.read(cfg), str(cfg.cluster.kind)
    if recorded is not None and recorded.kind != kind:  # its record would be overwritten: the cluster forgotten
        raise ConfigError(f"cluster.kind={kind}: a cluster of kind {recorded.kind} is recorded in {cluster_state.path(cfg)} "
                          f"({recorded.address}); stop it first with `make cluster-down`")
    return backend.of_kind(kind).create(cfg).address


def status(cfg: DictConfig) -> dict:
    record = cluster_state.read(cfg)
    if record is None:
        return {"kind": str(cfg.cluster.kind), "state": "NONE",
                "message": "no cluster recorded: `make cluster` creates one"}
    return backend.of_kind(record.kind).status(cfg, record)


def down(cfg: DictConfig) -> str:
    """Stop the recorded cluster and wait; safe to run twice."""
    record = cluster_state.read(cfg)
    if record is None:
        return "no cluster recorded: nothing to stop"
    return backend.of_kind(record.kind).destroy(cfg, record)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The cluster lifecycle (EMR, or standalone on this machine)")
    parser.add_argument("action", choices=["plan", "create", "status", "down"])
    parser.add_argument("--params", default="emr/params.yaml", help="composed config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. cluster.core_instance_count=4")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (AWS credentials stay masked)")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    cfg = load_config(args.overrides, args.params)
    if args.action == "plan":
        print(json.dumps(run_job_flow_request(cfg), indent=2))
    elif args.action == "create":
        print(create(cfg))
    elif args.action == "status":
        print(json.dumps(status(cfg), indent=2, default=str))
    else:
        print(down(cfg))


if __name__ == "__main__":
    run_command(main)
