"""Cluster bench (`make bench-cluster`): the standalone cluster's start, what it ships to its nodes,
featurize on it against `local[2]` on the same images and the same 2 cores, and the EMR pipeline's
stages on it, each timed as `make emr-repro` runs it.

S3 is the cluster's local stand-in whatever credentials the shell has (the bench measures the cluster
path, not AWS): AWS_* variables are dropped from this process first. Results: reports/cluster_bench.*
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from measure import bench_sample, run_stage
from omegaconf import OmegaConf, open_dict

from fruits.cloud import cluster, locations, steps
from fruits.cloud.artifacts import package_code
from fruits.cloud import state as cluster_state
from fruits.core import tables
from fruits.core.config import PROJECT_ROOT, load_config
from fruits.stages import ingest
from fruits.core.storage import Storage

REPORTS = PROJECT_ROOT / "reports"


def timed(work) -> float:
    started = time.perf_counter()
    work()
    return round(time.perf_counter() - started, 2)


def folder_mib(path: Path) -> float:
    found = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    return round(int(found) / 2**20, 1)


def local_featurize(cfg) -> float:
    """featurize as `dvc repro` runs it locally: its own process, local[2], from empty tables."""
    for uri in (cfg.env.paths.features, cfg.env.paths.rejects):
        shutil.rmtree(uri, ignore_errors=True)
    params = Path(cfg.env.paths.root) / "params-local.yaml"
    OmegaConf.save(cfg, params)
    return run_stage("featurize", params)["seconds"]


def local_featurize_on_s3(cluster_cfg, local_cfg, running) -> float:
    """featurize as its own local[2] process (the local env's Spark settings), reading the images the
    cluster read, from the same S3 through the same S3A connector, into tables of its own: the cluster's
    overhead apart from what S3 itself costs."""
    from fruits.cloud.nodes import s3a_connector
    from fruits.cloud.standalone import S3A_JARS

    cfg = cluster_cfg.copy()
    s3 = running.s3
    with open_dict(cfg):
        cfg.env.spark = local_cfg.env.spark.copy()
        cfg.env.spark.conf.update({
            "spark.jars": ",".join(str(jar) for jar in sorted(S3A_JARS.glob("*.jar"))),
            **s3a_connector(s3.region, s3.endpoint, s3.truststore),
            "spark.hadoop.fs.s3a.aws.credentials.provider": "com.amazonaws.auth.EnvironmentVariableCredentialsProvider",
        })
        for table in ("features", "rejects"):
            cfg.env.paths[table] = f"{cluster_cfg.env.paths[table]}-bench-local"
    params = Path("params-local-on-s3.yaml").resolve()
    OmegaConf.save(cfg, params)
    return run_stage("featurize", params)["seconds"]


def cluster_pipeline(local_cfg, per_label: int, workdir: Path) -> dict:
    """make cluster (standalone), then the EMR pipeline's stages, in workdir, on the same images and weights."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        os.environ.pop(name)
    workdir.mkdir(parents=True, exist_ok=True)
    images = Path(local_cfg.data.root).resolve()
    model_files = {key: Path(local_cfg.env.paths[key]).resolve() for key in ("weights", "onnx", "provenance")}
    previous = os.getcwd()
    os.chdir(workdir)
    cfg = load_config(["cluster=standalone", "env.allow_offline_weights=true", f"data.root={images}",
                       f"data.train_per_label={per_label}", "data.test_per_label=0"], PROJECT_ROOT / "emr" / "params.yaml")
    result: dict = {"stages_s": {}}
    try:
        result["cluster_start_s"] = timed(lambda: cluster.create(cfg))
        running = cluster_state.read(cfg)
        result["s3"] = running.s3.kind
        os.environ.update(running.s3.environment)  # as `make emr-repro` reads .cluster-env
        result["stages_s"]["ingest (local, upload to S3)"] = timed(lambda: ingest.run(cfg))
        Path(cfg.env.paths.weights).parent.mkdir(parents=True, exist_ok=True)
        for key, path in model_files.items():  # the local run's weights: the same model on both sides
            shutil.copy2(path, cfg.env.paths[key])
        for stage in ("featurize", "pca", "index", "report"):
            result["stages_s"][f"{stage} (step)"] = timed(lambda: steps.submit(cfg, stage))
        result["featurized"] = tables.row_count(locations.keyed(cfg).env.paths.features, Storage.of(cfg))
        result["local_on_s3_featurize_s"] = local_featurize_on_s3(cfg, local_cfg, running)
        result["node_env_mib"] = folder_mib(Path(running.python).parents[2])
        result["s3a_jars_mib"] = folder_mib(Path(running.run_dir) / "jars")
    finally:
        cluster.down(cfg)
        os.chdir(previous)
    result["code_zip_kib"] = round(len(package_code()) / 1024, 1)
    return result


def markdown(found: dict) -> str:
    lines = [f"# Cluster bench: {found['setup']}", "",
             "| what | value |", "|---|---:|",
             f"| cluster start (master + {found['workers']} workers registered) | {found['cluster_start_s']} s |",
             f"| code shipped (fruits.zip on --py-files) | {found['code_zip_kib']} KiB |",
             f"| nodes' environment (bootstrap-built venv, once per pin set) | {found['node_env_mib']} MiB |",
             f"| S3A connector jars copied to the nodes | {found['s3a_jars_mib']} MiB |",
             f"| featurize, local[2], own process | {found['local_featurize_s']} s |",
             f"| featurize, local[2], own process, images in the S3 stand-in through S3A | {found['local_on_s3_featurize_s']} s |",
             f"| featurize, standalone cluster, EMR step path | {found['stages_s']['featurize (step)']} s |",
             f"| **cluster path / local[2]** | **{found['cluster_over_local']}** |",
             f"| of which S3 (local[2] on S3 / local[2] on disk) | {found['s3_over_disk']} |",
             f"| of which the cluster (cluster path / local[2] on S3) | {found['cluster_over_local_on_s3']} |", "",
             "EMR pipeline on the cluster, by stage (weights: the local run's, copied):", "",
             "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds} |" for stage, seconds in found["stages_s"].items()]
    lines += [f"| **total** | **{round(sum(found['stages_s'].values()), 1)}** |", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-label", type=int, default=192, help="Training images per label: the real sample's photos, turned as needed")
    args = parser.parse_args()
    cfg, files = bench_sample(args.per_label)  # the featurize bench's images and weights
    found = {"setup": f"{len(files)} images at {cfg.model.input_size} px, engine {cfg.model.engine}, {os.cpu_count()} cores",
             "images": len(files), "workers": 2}
    found["local_featurize_s"] = local_featurize(cfg)
    found |= cluster_pipeline(cfg, args.per_label, Path("bench/cluster").resolve())
    found["cluster_over_local"] = round(found["stages_s"]["featurize (step)"] / found["local_featurize_s"], 2)
    found["s3_over_disk"] = round(found["local_on_s3_featurize_s"] / found["local_featurize_s"], 2)
    found["cluster_over_local_on_s3"] = round(found["stages_s"]["featurize (step)"] / found["local_on_s3_featurize_s"], 2)
    assert found["featurized"] == len(files), found
    (REPORTS / "cluster_bench.json").write_text(json.dumps(found, indent=2) + "\n")
    text = markdown(found)
    (REPORTS / "cluster_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
