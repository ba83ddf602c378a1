"""The Spark stages on s3:// URIs, as on EMR: images, shards and tables in S3 (moto's server over TLS),
read and written by local Spark through Hadoop's S3A connector bound to the s3 scheme, as EMR binds
EMRFS. Incremental featurize, committed tables and pca behave as on local disk."""

import uuid

import boto3
import numpy as np
import pytest

from fruits.cloud import bucket
from fruits.core import tables
from fruits.stages import featurize, ingest, pca
from fruits.core.storage import Storage
from helpers.data import jpeg

from helpers.project import S3A_JARS, make_cfg


@pytest.fixture(autouse=True)
def s3a_connector():
    assert len(list(S3A_JARS.glob("*.jar"))) == 2, f"no S3A connector jars in {S3A_JARS}: run `make s3a-jars`"


def s3_project(tmp_path, endpoint, tiny_cfg, *overrides):
    """The tiny sample's images and model; storage, images and every table in a fresh bucket."""
    name = f"fruits-test-{uuid.uuid4().hex[:10]}"
    cfg = make_cfg(tmp_path, "storage=s3", f"storage.bucket={name}", f"storage.endpoint_url={endpoint}", *overrides)
    cfg.data.root = tiny_cfg.data.root
    for key in ("weights", "onnx", "provenance"):
        cfg.env.paths[key] = tiny_cfg.env.paths[key]
    data, root = cfg.storage.uris.data, cfg.storage.uris.root
    cfg.env.paths.images = cfg.storage.uris.raw
    cfg.env.paths.shards, cfg.env.paths.shard_index = f"{root}/shards", f"{root}/shards/index.parquet"
    cfg.env.paths.features, cfg.env.paths.rejects = f"{data}/features", f"{data}/rejects"
    cfg.env.paths.pca_vectors = f"{data}/pca"
    bucket.run(cfg)
    return cfg


def features_by_image(spark, cfg) -> dict:
    """path (inside the images folder, local or S3 alike) -> (label, split, checksum, features) of the
    committed features table."""
    return {r["path"]: r for r in tables.read(spark, cfg.env.paths.features, Storage.of(cfg)).collect()}


def assert_same_features(got: dict, expected: dict) -> None:
    assert set(got) == set(expected)
    for image, row in got.items():
        assert (row["label"], row["split"], row["checksum"]) == \
            (expected[image]["label"], expected[image]["split"], expected[image]["checksum"])
        np.testing.assert_allclose(row["features"], expected[image]["features"], rtol=1e-6, atol=1e-6)


def table_keys(endpoint, cfg, uri: str) -> set[str]:
    prefix = uri.split(f"s3://{cfg.storage.bucket}/", 1)[1] + "/"
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=endpoint)
    listed = s3.list_objects_v2(Bucket=cfg.storage.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):].split("/", 1)[0] for o in listed}


@pytest.mark.slow
def test_incremental_featurize_and_pca_on_s3_equal_a_run_from_scratch(spark, tmp_path, s3_endpoint, tiny_cfg):
    cfg = s3_project(tmp_path, s3_endpoint, tiny_cfg)
    ingest.run(cfg)
    first = featurize.run(cfg, spark)
    assert first["images"] == 32 == first["featurized"] + first["rejected"] and first["run"]["computed"] == 32
    local = make_cfg(tmp_path / "local")
    local.data.root = local.env.paths.images = tiny_cfg.data.root
    for key in ("weights", "onnx", "provenance"):
        local.env.paths[key] = tiny_cfg.env.paths[key]
    featurize.run(local, spark)
    assert_same_features(features_by_image(spark, cfg),
                         features_by_image(spark, local))

    # The raw prefix grows in S3 itself (as the app's uploads will): 3 new, 1 changed, 1 deleted.
    s3 = boto3.client("s3", region_name="eu-west-3", endpoint_url=s3_endpoint)
    raw = cfg.storage.uris.raw.split(f"s3://{cfg.storage.bucket}/", 1)[1]
    for i in range(3):
        s3.put_object(Bucket=cfg.storage.bucket, Key=f"{raw}/Training/Kiwi/grown_{i}.jpg", Body=jpeg("Kiwi", 500 + i))
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=cfg.storage.bucket, Prefix=f"{raw}/Training/Banana/")["Contents"])
    s3.put_object(Bucket=cfg.storage.bucket, Key=listed[0], Body=jpeg("Banana", 600))
    s3.delete_object(Bucket=cfg.storage.bucket, Key=listed[1])

    grown = featurize.run(cfg, spark)
    assert grown["run"] == {"new": 3, "changed": 1, "deleted": 1, "reused": 30, "computed": 4, "rejected": 0,
                            "model_changed_or_first_run": False}
    assert grown["images"] == 34 == grown["featurized"] + grown["rejected"]
    assert table_keys(s3_endpoint, cfg, cfg.env.paths.features) == \
        {tables.COMMIT_FILE, tables.committed_version(cfg.env.paths.features, Storage.of(cfg))}  # old version gone

    scratch = s3_project(tmp_path / "scratch", s3_endpoint, tiny_cfg)
    scratch.env.paths.images = cfg.env.paths.images
    assert featurize.run(scratch, spark)["run"]["reused"] == 0
    assert_same_features(features_by_image(spark, cfg),
                         features_by_image(spark, scratch))

    metrics = pca.run(cfg, spark)
    assert metrics["rows_projected"] == 34
    assert tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).count() == 34


def test_featurize_reads_shards_in_s3_and_computes_only_a_new_shard(spark, tmp_path, s3_endpoint, tiny_cfg):
    import shutil

    cfg = s3_project(tmp_path, s3_endpoint, tiny_cfg, "data.layout=parquet")
    images = tmp_path / "images"
    shutil.copytree(tiny_cfg.data.root, images)
    cfg.data.root = str(images)
    ingest.run(cfg)
    first = featurize.run(cfg, spark)
    assert first["images"] == 32 == first["featurized"] and first["layout"] == "parquet"

    (images / "Test" / "Lemon" / "grown.jpg").write_bytes(jpeg("Lemon", 700))
    assert ingest.run(cfg)["shards"]["images_packed"] == 1
    grown = featurize.run(cfg, spark)
    assert grown["run"]["computed"] == 1 and grown["run"]["reused"] == 32 and grown["featurized"] == 33
