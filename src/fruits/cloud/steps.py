"""The EMR runner: `python -m fruits.cloud.steps <stage> --params emr/params.yaml` runs a Spark stage as
a step of the cluster that is up, through its backend (fruits.cloud.backend: an EMR step, or the same
spark-submit command on the standalone cluster). The stages themselves do not know either exists.

The client writes the composed config and the stage's small local inputs (from the stage registry)
under a run folder in S3, submits the step (`spark-submit`, the packaged code on --py-files), waits
for it, and brings back the stage's small local outputs (metrics,
plots, reports, the PCA projection) for DVC. Images and features stay in S3. On failure it raises
with EMR's reason and the step's log location. On the node, `bootstrap/run_stage.py` calls
`run_on_cluster`, which runs the stage's own `run(cfg)`.
"""

from __future__ import annotations

import argparse
import importlib
import os

from omegaconf import DictConfig, OmegaConf

from fruits.cloud import backend, locations
from fruits.cloud import state as cluster_state
from fruits.core import logs, registry
from fruits.core.config import load_config
from fruits.core.errors import NoCluster
from fruits.core.ids import stamped_id
from fruits.core.storage import Storage, copy_file, filesystem
from fruits.core.logs import run_command

def stage_files(cfg: DictConfig, name: str) -> tuple[list[str], list[str]]:
    """(small local files the stage reads, small local files it writes), from the stage registry."""
    stage = registry.stage(name)
    if not stage.on_cluster:
        raise ValueError(f"stage {name!r} does not run on the cluster (Spark stages do: "
                         f"{', '.join(s.name for s in registry.STAGES.values() if s.on_cluster)})")
    return registry.small_files(cfg, stage.inputs), registry.small_files(cfg, stage.written())


def in_run_folder(run_uri: str, part: str, relative: str) -> str:
    """Where a small file travels in the run folder: <run>/<inputs|outputs>/<its path, made relative>."""
    return f"{run_uri}/{part}/{os.path.normpath(relative).lstrip('/')}"


def prepare_run(cfg: DictConfig, stage: str, run_uri: str) -> None:
    store = Storage.of(cfg)
    fs, root = filesystem(run_uri, store)
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root}/params.yaml", "w") as stream:
        stream.write(OmegaConf.to_yaml(cfg))
    inputs, _ = stage_files(cfg, stage)
    for relative in inputs:
        if os.path.exists(relative):
            copy_file(relative, in_run_folder(run_uri, "inputs", relative), store)


def fetch_outputs(cfg: DictConfig, stage: str, run_uri: str) -> None:
    _, outputs = stage_files(cfg, stage)
    store = Storage.of(cfg)
    for relative in outputs:
        copy_file(in_run_folder(run_uri, "outputs", relative), relative, store)


def run_on_cluster(stage: str, run_uri: str) -> None:
    """The cluster side (bootstrap/run_stage.py): fetch config and inputs, run the stage, send outputs back."""
    import fsspec

    # The config is not known yet: read it plainly (the client wrote it there through the guarded layer).
    with fsspec.open(f"{run_uri}/params.yaml", "rb") as stream, open("params.yaml", "wb") as out:
        out.write(stream.read())
    cfg = load_config([], "params.yaml")
    store = Storage.of(cfg)
    fs, _ = filesystem(run_uri, store)
    inputs, outputs = stage_files(cfg, stage)
    for relative in inputs:
        source = in_run_folder(run_uri, "inputs", relative)
        if fs.exists(filesystem(source, store)[1]):
            copy_file(source, relative, store)
    importlib.import_module(registry.stage(stage).module).run(cfg)
    for relative in outputs:
        copy_file(relative, in_run_folder(run_uri, "outputs", relative), store)


def submit(cfg: DictConfig, stage: str) -> None:
    """Run the stage on the cluster that `make cluster` recorded (EMR or standalone), then fetch its
    small outputs."""
    record = cluster_state.read(cfg)
    if record is None:
        raise NoCluster("no cluster is recorded: run `make cluster` first (or `make cluster CLUSTER=standalone` "
                        "for one on this machine)")
    cfg = locations.keyed(cfg)  # this experiment's own S3 tables
    run_id = f"{stage}-{stamped_id()}"
    run_uri = f"{cfg.storage.uris.runs}/{run_id}"
    prepare_run(cfg, stage, run_uri)
    cluster = backend.of_kind(record.kind)
    cluster.wait(cfg, record, cluster.submit_step(cfg, record, stage, run_uri, run_id))
    fetch_outputs(cfg, stage, run_uri)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a Spark stage as an EMR step on the project's cluster.")
    parser.add_argument("stage", choices=[s.name for s in registry.STAGES.values() if s.on_cluster])
    parser.add_argument("--params", default=registry.EMR_PARAMS, help="composed config (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. pca.k=50")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs (AWS credentials stay masked)")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    submit(load_config(args.overrides, args.params), args.stage)


if __name__ == "__main__":
    run_command(main)
