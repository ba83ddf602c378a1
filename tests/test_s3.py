"""Bucket, ingest and DVC remote against a real S3 endpoint (moto's server on 127.0.0.1)."""

import hashlib
import json
import re
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest

from fruits.cloud import bucket
from fruits.stages import ingest, sample
from fruits.core.errors import ConfigError
from fruits.core.storage import Storage

from helpers.clones import repo_env, run
from helpers.project import make_cfg


def s3_cfg(tmp_path, endpoint, *overrides):
    name = f"fruits-test-{uuid.uuid4().hex[:10]}"
    return make_cfg(tmp_path, "storage=s3", f"storage.bucket={name}", f"storage.endpoint_url={endpoint}", *overrides)


def raw_client(endpoint, region="eu-west-3"):
    return boto3.client("s3", region_name=region, endpoint_url=endpoint)


def test_bucket_is_created_in_paris_locked_down_and_rerun_changes_nothing(tmp_path, s3_endpoint):
    cfg = s3_cfg(tmp_path, s3_endpoint)
    changes = bucket.run(cfg)
    assert changes[0] == f"created s3://{cfg.storage.bucket} in eu-west-3"
    s3 = raw_client(s3_endpoint)
    name = cfg.storage.bucket
    assert s3.get_bucket_location(Bucket=name)["LocationConstraint"] == "eu-west-3"
    assert s3.get_public_access_block(Bucket=name)["PublicAccessBlockConfiguration"] == bucket.PUBLIC_ACCESS_BLOCK
    rule = s3.get_bucket_encryption(Bucket=name)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    statement = json.loads(s3.get_bucket_policy(Bucket=name)["Policy"])["Statement"][0]
    assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert s3.get_bucket_versioning(Bucket=name)["Status"] == "Enabled"
    [rule] = s3.get_bucket_lifecycle_configuration(Bucket=name)["Rules"]
    assert rule["Filter"] == {"Prefix": "fruits/"} and rule["NoncurrentVersionExpiration"] == {"NoncurrentDays": 30}
    assert bucket.run(cfg) == []


def test_kms_key_gives_sse_kms(tmp_path, s3_endpoint):
    cfg = s3_cfg(tmp_path, s3_endpoint, "storage.kms_key_id=alias/fruits")
    bucket.run(cfg)
    rule = raw_client(s3_endpoint).get_bucket_encryption(Bucket=cfg.storage.bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": "alias/fruits"}


def test_us_east_1_is_refused_before_any_call(tmp_path, s3_endpoint):
    cfg = s3_cfg(tmp_path, s3_endpoint)
    cfg.storage.region = "us-east-1"
    with pytest.raises(ConfigError, match="storage.region=us-east-1 is outside the EU"):
        bucket.run(cfg)
    names = [b["Name"] for b in raw_client(s3_endpoint).list_buckets()["Buckets"]]
    assert cfg.storage.bucket not in names


def test_an_existing_bucket_outside_the_eu_is_refused(tmp_path, s3_endpoint):
    cfg = s3_cfg(tmp_path, s3_endpoint)
    raw_client(s3_endpoint, "us-west-2").create_bucket(
        Bucket=cfg.storage.bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"})
    with pytest.raises(ConfigError, match="is located in us-west-2, outside the EU"):
        bucket.run(cfg)
    sample.run(cfg)
    with pytest.raises(ConfigError, match="outside the EU"):
        ingest.run(cfg)


def keys(s3_endpoint, cfg):
    s3 = raw_client(s3_endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=cfg.storage.bucket, Prefix=f"{cfg.storage.prefix}/raw/")
    return {obj["Key"]: obj["ETag"].strip('"') for page in pages for obj in page.get("Contents", [])}


@pytest.fixture
def opaque_kms_etags(monkeypatch):
    """moto gives every object the MD5 of its content as ETag; S3 does so only for single-part SSE-S3
    objects. Under SSE-KMS the ETag is another value: so here too."""
    from moto.s3.models import FakeKey

    md5_etag = FakeKey.etag

    def etag(key):
        value = md5_etag.fget(key)
        return f'"{hashlib.sha256(value.encode()).hexdigest()[:32]}"' if key.encryption == "aws:kms" else value

    monkeypatch.setattr(FakeKey, "etag", property(etag))


def object_md5s(s3_endpoint, cfg) -> dict[str, str]:
    s3 = raw_client(s3_endpoint)
    return {key: hashlib.md5(s3.get_object(Bucket=cfg.storage.bucket, Key=key)["Body"].read()).hexdigest()
            for key in keys(s3_endpoint, cfg)}


@pytest.mark.parametrize("kms_key", [None, "alias/fruits"], ids=["sse-s3", "sse-kms"])
def test_ingest_uploads_once_then_skips_and_resumes_after_an_interruption(tmp_path, s3_endpoint, monkeypatch,
                                                                          opaque_kms_etags, kms_key):
    cfg = s3_cfg(tmp_path, s3_endpoint, f"storage.kms_key_id={kms_key or 'null'}")
    bucket.run(cfg)
    sample.run(cfg)
    local = sorted(Path(cfg.data.root).rglob("*.jpg"))

    # Interrupted after 10 uploads.
    from fruits.core.storage import filesystem

    fs, _ = filesystem(cfg.storage.uris.raw, Storage.of(cfg))  # fsspec caches it: ingest gets this very instance
    real_put, calls = fs.put_file, {"n": 0}

    def flaky_put(lpath, rpath, **kwargs):
        calls["n"] += 1
        if calls["n"] > 10:
            raise ConnectionError("network cut")
        return real_put(lpath, rpath, **kwargs)

    monkeypatch.setattr(fs, "put_file", flaky_put)
    with pytest.raises(ConnectionError):
        ingest.run(cfg)
    assert len(keys(s3_endpoint, cfg)) == 10
    monkeypatch.setattr(fs, "put_file", real_put)

    manifest = ingest.run(cfg)
    uploaded = object_md5s(s3_endpoint, cfg)
    assert len(uploaded) == len(local) == manifest["images"] == 32
    for path in local:
        relative = path.relative_to(cfg.data.root).as_posix()
        assert uploaded[f"{cfg.storage.prefix}/raw/{relative}"] == hashlib.md5(path.read_bytes()).hexdigest()
    s3 = raw_client(s3_endpoint)
    head = s3.head_object(Bucket=cfg.storage.bucket, Key=next(iter(uploaded)))
    assert head["ServerSideEncryption"] == ("aws:kms" if kms_key else "AES256")
    etag_is_md5 = head["ETag"].strip('"') == head["Metadata"][ingest.MD5_METADATA]
    assert etag_is_md5 is (kms_key is None)
    assert manifest["per_split"]["Training"]["Kiwi"] == 6
    assert json.loads(Path(cfg.env.paths.ingest_metrics).read_text())["images"] == 32
    # The S3 change signal: an image put straight into the raw prefix changes it, without a download.
    s3.put_object(Bucket=cfg.storage.bucket, Key=f"{cfg.storage.prefix}/raw/Test/Kiwi/direct.jpg", Body=local[0].read_bytes())
    again = ingest.run(cfg)
    assert again["remote_images"] == 33 and again["remote_listing_sha256"] != manifest["remote_listing_sha256"]
    assert again["listing_sha256"] == manifest["listing_sha256"]  # the local images did not change
    assert ingest.run(cfg)["remote_listing_sha256"] == again["remote_listing_sha256"]  # nothing new: same signal
    # The prefix emptied and filled again with the same bytes (a bucket recreated, a restarted stand-in):
    # what was computed from it is gone too, so the signal changes and featurize runs again.
    time.sleep(1.1)  # S3's LastModified has a resolution of one second
    for key in keys(s3_endpoint, cfg):
        s3.delete_object(Bucket=cfg.storage.bucket, Key=key)
    s3.put_object(Bucket=cfg.storage.bucket, Key=f"{cfg.storage.prefix}/raw/Test/Kiwi/direct.jpg", Body=local[0].read_bytes())
    refilled = ingest.run(cfg)
    assert refilled["remote_images"] == 33 and refilled["listing_sha256"] == again["listing_sha256"]
    assert refilled["remote_listing_sha256"] != again["remote_listing_sha256"]

    # Idempotent under either encryption, from the listing alone (no object's metadata read).
    listed = ingest.list_files(cfg.data.root, Storage.of(cfg), ["jpg"])
    rerun = ingest.upload(cfg, listed, ingest.content_md5s(listed))
    assert rerun["uploaded"] == 0 and rerun["checked_metadata"] == 0
    # A changed file is uploaded again; so is an object someone replaced in S3 with the same size.
    local[0].write_bytes(local[1].read_bytes())
    replaced = local[2].relative_to(cfg.data.root).as_posix()
    body = bytearray(local[2].read_bytes())
    body[-3] ^= 0xFF
    s3.put_object(Bucket=cfg.storage.bucket, Key=f"{cfg.storage.prefix}/raw/{replaced}", Body=bytes(body))
    listed = ingest.list_files(cfg.data.root, Storage.of(cfg), ["jpg"])
    result = ingest.upload(cfg, listed, ingest.content_md5s(listed))
    assert result["uploaded"] == 2
    assert object_md5s(s3_endpoint, cfg)[f"{cfg.storage.prefix}/raw/{replaced}"] == hashlib.md5(local[2].read_bytes()).hexdigest()


def test_approved_photos_in_the_bucket_join_the_raw_prefix_and_leave_it_when_erased(tmp_path, s3_endpoint):
    """On EMR the app keeps contributions in the bucket: ingest copies an approved one into the raw
    prefix as contributed_<id>.jpg (encrypted like every object), and deletes it there once erased,
    leaving images put there by other hands alone."""
    from fruits.app.contributions import ContributionStore
    from fruits.core.storage import filesystem

    name = f"fruits-test-{uuid.uuid4().hex[:10]}"
    contributions = f"s3://{name}/fruits/contributions"
    cfg = make_cfg(tmp_path, "storage=s3", f"storage.bucket={name}", f"storage.endpoint_url={s3_endpoint}",
                   f"env.paths.contributions={contributions}", f"env.paths.approved={contributions}/approved")
    bucket.run(cfg)
    sample.run(cfg)
    store = ContributionStore(cfg)
    photo = (sorted(Path(cfg.data.root).rglob("*.jpg"))[0]).read_bytes()
    record, token = store.add(photo, "Yuzu", {"label": "Kiwi", "confidence": 0.4})
    assert ingest.run(cfg)["contributed_copied"] == 0  # in quarantine: not a pipeline input
    store.approve(record["id"])
    s3 = raw_client(s3_endpoint)
    by_hand = f"{cfg.storage.prefix}/raw/Test/Kiwi/direct.jpg"
    s3.put_object(Bucket=name, Key=by_hand, Body=photo)

    joined = ingest.run(cfg)
    copy = f"{cfg.storage.prefix}/raw/Training/Yuzu/contributed_{record['id']}.jpg"
    assert (joined["contributed_in_bucket"], joined["contributed_copied"], joined["remote_images"]) == (1, 1, 34)
    fs, approved = filesystem(f"{contributions}/approved/Training/Yuzu/{record['id']}.jpg", Storage.of(cfg))
    assert s3.get_object(Bucket=name, Key=copy)["Body"].read() == fs.cat_file(approved)
    assert s3.head_object(Bucket=name, Key=copy)["ServerSideEncryption"] == "AES256"
    again = ingest.run(cfg)
    assert (again["contributed_copied"], again["contributed_deleted"]) == (0, 0)
    assert again["remote_listing_sha256"] == joined["remote_listing_sha256"]  # nothing new: featurize does not run

    assert store.erase(record["id"], token)
    erased = ingest.run(cfg)
    assert (erased["contributed_in_bucket"], erased["contributed_deleted"], erased["remote_images"]) == (0, 1, 33)
    assert copy not in keys(s3_endpoint, cfg) and by_hand in keys(s3_endpoint, cfg)
    assert erased["remote_listing_sha256"] != joined["remote_listing_sha256"]  # featurize runs and drops its row


def test_an_unreadable_upload_record_costs_metadata_reads_not_uploads(tmp_path, s3_endpoint, opaque_kms_etags):
    cfg = s3_cfg(tmp_path, s3_endpoint, "storage.kms_key_id=alias/fruits")
    bucket.run(cfg)
    sample.run(cfg)
    ingest.run(cfg)
    from fruits.core.storage import filesystem

    fs, record = filesystem(cfg.storage.uris.uploads, Storage.of(cfg))
    fs.pipe_file(record, b"{not json")
    listed = ingest.list_files(cfg.data.root, Storage.of(cfg), ["jpg"])
    rerun = ingest.upload(cfg, listed, ingest.content_md5s(listed))
    assert rerun["uploaded"] == 0 and rerun["checked_metadata"] == 32


def dvc_repo(tmp_path):
    """A new git + DVC repository, and a function that runs a command there (asserting it succeeds)."""
    repo, env = tmp_path / "repo", repo_env()
    repo.mkdir()

    def sh(*cmd):
        return run(list(cmd), repo, env)

    sh("git", "init", "-q")
    sh("dvc", "init", "-q")
    return repo, sh


def test_dvc_push_pull_round_trip(tmp_path, s3_endpoint):
    cfg = s3_cfg(tmp_path, s3_endpoint)
    bucket.run(cfg)
    repo, sh = dvc_repo(tmp_path)
    bucket.configure_dvc_remote(cfg, repo)
    data = repo / "data"
    data.mkdir()
    for i in range(3):
        (data / f"{i}.bin").write_bytes(os.urandom(1000 + i))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    sh("dvc", "add", "data")
    sh("dvc", "push")
    config = (repo / ".dvc" / "config").read_text()
    assert f"url = s3://{cfg.storage.bucket}/fruits/dvc" in config and "region = eu-west-3" in config
    assert "endpointurl" not in config and "secret" not in config  # only in config.local
    subprocess.run(["rm", "-rf", str(data), str(repo / ".dvc" / "cache")], check=True)
    sh("dvc", "pull")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data.iterdir()}
    assert after == before
    assert any(k.startswith(f"{cfg.storage.prefix}/dvc/") for k in
               {o["Key"] for o in raw_client(s3_endpoint).list_objects_v2(Bucket=cfg.storage.bucket)["Contents"]})


def test_weights_from_an_s3_uri_go_through_the_guarded_layer(tmp_path, s3_endpoint, tiny_project):
    from fruits.core import backbone
    from fruits.stages import weights

    cfg = s3_cfg(tmp_path, s3_endpoint)
    bucket.ensure_bucket(cfg)
    source = make_cfg(tiny_project).env.paths.weights
    raw_client(s3_endpoint).upload_file(source, cfg.storage.bucket, "fruits/models/w.weights.h5")
    cfg.model.weights = f"s3://{cfg.storage.bucket}/fruits/models/w.weights.h5"
    provenance = weights.run(cfg)
    assert provenance["sha256"] == backbone.sha256_file(source) and provenance["source"] == cfg.model.weights
    cfg.model.weights = f"s3://{cfg.storage.bucket}/fruits/models/missing.weights.h5"
    with pytest.raises(backbone.WeightsUnavailable, match="missing.weights.h5: file not found"):
        weights.run(cfg)


def test_shards_in_s3_grow_by_new_objects_only(tmp_path, s3_endpoint):
    import pyarrow.parquet as pq

    cfg = s3_cfg(tmp_path, s3_endpoint, "data.layout=parquet")
    bucket.run(cfg)
    sample.run(cfg)
    shards = f"s3://{cfg.storage.bucket}/{cfg.storage.prefix}/shards"
    cfg.env.paths.shards, cfg.env.paths.shard_index = shards, f"{shards}/index.parquet"
    first = ingest.run(cfg)["shards"]
    assert first["images_packed"] == 32 and first["shards_written"] == 1
    s3 = raw_client(s3_endpoint)

    def objects():
        listed = s3.list_objects_v2(Bucket=cfg.storage.bucket, Prefix=f"{cfg.storage.prefix}/shards/")["Contents"]
        return {o["Key"].rsplit("/", 1)[1]: (o["ETag"], o["LastModified"]) for o in listed}

    before = objects()
    assert "index.parquet" in before and len(before) == 2  # one shard and its index, no partial left
    new_image = Path(cfg.data.root) / "Test" / "Kiwi" / "new.jpg"
    new_image.write_bytes(sorted(Path(cfg.data.root).rglob("*.jpg"))[0].read_bytes())
    grown = ingest.run(cfg)["shards"]
    assert grown["images_packed"] == 1 and grown["shards"] == 2
    after = objects()
    old_shard = next(name for name in before if name.startswith("shard-"))
    assert after[old_shard] == before[old_shard]  # never rewritten
    with fsspec_open(cfg, cfg.env.paths.shard_index) as stream:
        index = {row["path"]: row["shard"] for row in pq.read_table(stream).to_pylist()}
    assert len(index) == 33 and index["Test/Kiwi/new.jpg"] != old_shard


def fsspec_open(cfg, uri):
    from fruits.core.storage import filesystem

    fs, path = filesystem(uri, Storage.of(cfg))
    return fs.open(path, "rb")


def test_the_purge_leaves_no_old_copy_in_the_dvc_cache_the_remote_or_the_bucket_versions(tmp_path, s3_endpoint):
    """After an erasure and the repro that rebuilt the outputs without the photo, what still holds it:
    the DVC cache and remote (an older commit's output), the bucket's noncurrent versions (the erased
    quarantine object, an overwritten upload record). `make purge-erased` lists them, then with APPLY=1
    deletes them, and nothing the workspace uses nor anything outside the project's prefix."""
    cfg = s3_cfg(tmp_path, s3_endpoint)
    bucket.run(cfg)
    name, prefix = cfg.storage.bucket, cfg.storage.prefix
    repo, sh = dvc_repo(tmp_path)
    bucket.configure_dvc_remote(cfg, repo)
    photo, kept = os.urandom(3000), os.urandom(2000)
    photo_md5, kept_md5 = hashlib.md5(photo).hexdigest(), hashlib.md5(kept).hexdigest()
    (repo / "sample").mkdir()
    (repo / "sample" / "contributed_1.jpg").write_bytes(photo)
    (repo / "sample" / "kept.jpg").write_bytes(kept)
    sh("dvc", "add", "sample")
    sh("dvc", "push")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "with the photo")
    s3 = raw_client(s3_endpoint)
    quarantined = f"{prefix}/contributions/quarantine/Training/Kiwi/1.jpg"
    s3.put_object(Bucket=name, Key=quarantined, Body=photo)
    s3.delete_object(Bucket=name, Key=quarantined)  # erased: a delete marker over the photo's version
    record = f"{prefix}/ingest/uploads.json"
    s3.put_object(Bucket=name, Key=record, Body=json.dumps({"Training/Kiwi/contributed_1.jpg": photo_md5}))
    s3.put_object(Bucket=name, Key=record, Body=json.dumps({"Training/Kiwi/kept.jpg": kept_md5}))
    outside = "another-project/photo.jpg"
    s3.put_object(Bucket=name, Key=outside, Body=photo)
    s3.delete_object(Bucket=name, Key=outside)
    (repo / "sample" / "contributed_1.jpg").unlink()  # the erasure, then the repro's new output
    sh("dvc", "add", "sample")
    sh("dvc", "push")

    def cached(md5):
        return (repo / ".dvc/cache/files/md5" / md5[:2] / md5[2:]).exists()

    def versions(key_part):
        listed = s3.list_object_versions(Bucket=name)
        return [v for v in listed.get("Versions", []) + listed.get("DeleteMarkers", []) if key_part in v["Key"]]

    purge = [sys.executable, "-m", "fruits.cloud.purge", "storage=s3", f"storage.bucket={name}",
             f"storage.endpoint_url={s3_endpoint}"]
    dry = sh(*purge)
    assert f"s3://{name}/{prefix}/: would delete" in dry and "A dry run" in dry, dry
    assert re.search(r"Removed [1-9]\d* objects from repo cache", dry), dry  # what DVC's gc counted, said
    assert cached(photo_md5) and len(versions(quarantined)) == 2 and len(versions(record)) == 2  # nothing gone

    applied = sh(*purge, "--apply")
    assert f"s3://{name}/{prefix}/: deleted" in applied, applied
    assert re.search(r"Removed [1-9]\d* objects from remote", applied), applied
    assert not cached(photo_md5) and cached(kept_md5)
    assert versions(photo_md5[2:]) == [] and versions(quarantined) == []  # nor in the remote, in any version
    assert [v["IsLatest"] for v in versions(kept_md5[2:])] == [True]
    assert [v["IsLatest"] for v in versions(record)] == [True]
    current = s3.get_object(Bucket=name, Key=record)["Body"].read()
    assert b"contributed_1" not in current
    assert len(versions(outside)) == 2  # outside the project's prefix: untouched
    sh("dvc", "status", "-c")  # the workspace's data is still complete in the remote
    assert "deleted 0 noncurrent version(s)" in sh(*purge, "--apply")
