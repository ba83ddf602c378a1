"""Experiments on the cluster: each S3 table's folder follows what produced it, and the clean-up lists
and deletes only the folders no commit, experiment or the workspace names."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import boto3
import pytest
import yaml
from omegaconf import OmegaConf

from fruits.cloud import bucket, locations
from fruits.core.config import compose


def emr_workspace(tmp_path: Path, *overrides: str):
    """The EMR config with its small files (weights, provenance, featurize's record) in tmp_path."""
    cfg = compose(["env=emr", "storage=s3", f"env.paths.root={tmp_path}", *overrides])
    for key, text in (("weights", "w1"), ("onnx", "o1"), ("provenance", "p1"), ("featurize_metrics", '{"version": "v1"}'),
                      ("ingest_metrics", '{"images": 10}')):
        path = Path(cfg.env.paths[key])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return cfg


def uris(cfg) -> dict[str, str]:
    resolved = locations.keyed(cfg)
    return {key: str(OmegaConf.select(resolved, key)) for key in ("env.paths.features", "env.paths.rejects", "env.paths.pca_vectors")}


def test_each_s3_table_lives_in_the_folder_of_what_produced_it(tmp_path):
    base = uris(emr_workspace(tmp_path))
    assert base == uris(emr_workspace(tmp_path))  # the same inputs: the same folders, every time
    assert base["env.paths.features"].startswith(compose(["env=emr", "storage=s3"]).env.paths.features + "/k-")
    assert base["env.paths.features"].rsplit("/", 1)[1] == base["env.paths.rejects"].rsplit("/", 1)[1]

    other_k = uris(emr_workspace(tmp_path, "pca.k=50"))  # another experiment: its own vectors, the same features
    assert other_k["env.paths.pca_vectors"] != base["env.paths.pca_vectors"]
    assert other_k["env.paths.features"] == base["env.paths.features"]

    cfg = emr_workspace(tmp_path)
    Path(cfg.env.paths.ingest_metrics).write_text('{"images": 15}')  # images added: the same table grows
    assert uris(cfg) == base
    Path(cfg.env.paths.featurize_metrics).write_text('{"version": "v2"}')  # ...so its new version means new vectors
    grown = uris(cfg)
    assert grown["env.paths.features"] == base["env.paths.features"]
    assert grown["env.paths.pca_vectors"] != base["env.paths.pca_vectors"]

    Path(cfg.env.paths.weights).write_text("w2")  # other weights: another features table, and what follows
    reweighted = uris(cfg)
    assert reweighted["env.paths.features"] != base["env.paths.features"]
    assert reweighted["env.paths.pca_vectors"] != grown["env.paths.pca_vectors"]

    local = compose([f"env.paths.root={tmp_path}"])  # the local pipeline: DVC versions its tables itself
    assert locations.keyed(local).env.paths.features == local.env.paths.features


def commit_emr_files(repo: Path, cfg, env: dict, message: str) -> None:
    """emr/params.yaml and an emr/dvc.lock that records the small files' md5 as DVC would."""
    (repo / "emr").mkdir(exist_ok=True)
    (repo / "emr" / "params.yaml").write_text(OmegaConf.to_yaml(cfg))
    files = [cfg.env.paths[k] for k in ("weights", "onnx", "provenance", "featurize_metrics")]
    deps = [{"path": os.path.relpath(f, repo), "md5": locations.file_md5(f)} for f in files]
    (repo / "emr" / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"featurize": {"deps": deps}}}))
    subprocess.run(["git", "add", "emr"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True, env=env)


def test_s3_gc_deletes_only_the_folders_nothing_names(tmp_path, s3_endpoint, monkeypatch):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    monkeypatch.chdir(repo)
    name = f"fruits-gc-{uuid.uuid4().hex[:10]}"
    overrides = [f"storage.bucket={name}", f"storage.endpoint_url={s3_endpoint}"]
    cfg = emr_workspace(repo / "work", *overrides)
    bucket.ensure_bucket(cfg)

    commit_emr_files(repo, emr_workspace(repo / "work", *overrides, "pca.k=10"), env, "k=10")
    k10 = uris(emr_workspace(repo / "work", *overrides, "pca.k=10"))
    commit_emr_files(repo, emr_workspace(repo / "work", *overrides, "pca.k=50"), env, "k=50 (an experiment)")
    k50 = uris(emr_workspace(repo / "work", *overrides, "pca.k=50"))
    experiment = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    subprocess.run(["git", "update-ref", "refs/exps/aa/bb/k50", experiment], cwd=repo, check=True, env=env)
    subprocess.run(["git", "reset", "-q", "--hard", "HEAD~1"], cwd=repo, check=True, env=env)  # the branch: k=10 only
    orphan = k10["env.paths.pca_vectors"].rsplit("/", 1)[0] + "/k-0123456789abcdef"  # a run nothing records any more

    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=s3_endpoint)
    for uri in [*k10.values(), *k50.values(), orphan]:
        key = uri.split(f"s3://{name}/", 1)[1]
        s3.put_object(Bucket=name, Key=f"{key}/v-1/part-0.parquet", Body=b"x")
        s3.put_object(Bucket=name, Key=f"{key}/_commit.json", Body=b"{}")

    params, lock = "emr/params.yaml", "emr/dvc.lock"
    assert locations.gc(cfg, params, lock, apply=False) == [orphan]  # the dry run deletes nothing
    assert s3.list_objects_v2(Bucket=name, Prefix=orphan.split(f"s3://{name}/", 1)[1])["KeyCount"] == 2
    assert locations.gc(cfg, params, lock, apply=True) == [orphan]
    left = {o["Key"] for o in s3.list_objects_v2(Bucket=name)["Contents"]}
    assert not [k for k in left if "k-0123456789abcdef" in k]
    for uri in [*k10.values(), *k50.values()]:  # named by the branch or by the experiment: kept
        assert any(k.startswith(uri.split(f"s3://{name}/", 1)[1] + "/") for k in left), uri
    assert locations.gc(cfg, params, lock, apply=False) == []


@pytest.mark.parametrize("stage", ["featurize", "pca"])
def test_every_keyed_stage_is_a_cluster_stage_with_s3_outputs(stage):
    from fruits.core import registry

    assert registry.stage(stage).on_cluster
    assert set(locations.KEYED[stage]) <= set(registry.stage(stage).outputs)
