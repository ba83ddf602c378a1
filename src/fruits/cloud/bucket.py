"""The project bucket: created if missing in the configured EU region, locked down, versioned, old
versions expired after storage.noncurrent_days. `make bucket` runs it; re-running changes nothing and
says so. Refuses a bucket located outside the EU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from fruits.core.aws import check_location, client
from fruits.core.config import stage_config
from fruits.core.errors import ConfigError
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

PUBLIC_ACCESS_BLOCK = {
    "BlockPublicAcls": True,
    "IgnorePublicAcls": True,
    "BlockPublicPolicy": True,
    "RestrictPublicBuckets": True,
}


def tls_only_policy(bucket: str) -> dict:
    """Deny every request that does not use TLS."""
    return {
        "Version": "2012-10-17",
        "Statement": [{
            "Sid": "DenyInsecureTransport",
            "Effect": "Deny",
            "Principal": "*",
            "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            "Condition": {"Bool": {"aws:SecureTransport": "false"}},
        }],
    }


def encryption_rule(kms_key: str | None) -> dict:
    if kms_key:
        default = {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": kms_key}
        return {"Rules": [{"ApplyServerSideEncryptionByDefault": default, "BucketKeyEnabled": True}]}
    return {"Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}]}


def ensure_bucket(cfg: DictConfig, s3=None) -> list[str]:
    """Create and configure the bucket as needed, through s3 (default: the config's S3 client); returns
    what was changed (empty: nothing)."""
    from botocore.exceptions import ClientError

    bucket, region = cfg.storage.bucket, cfg.storage.region
    if not bucket:
        raise ConfigError("storage.bucket is empty: choose storage=s3 or set storage.bucket")
    s3 = s3 or client("s3", cfg)
    changes = []
    if check_location(s3, bucket) is None:
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
        changes.append(f"created s3://{bucket} in {region}")

    try:
        current = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    except ClientError:
        current = {}
    if current != PUBLIC_ACCESS_BLOCK:
        s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=PUBLIC_ACCESS_BLOCK)
        changes.append("blocked all public access")

    wanted = encryption_rule(cfg.storage.get("kms_key_id"))
    try:
        rules = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"]
        current_default = [r["ApplyServerSideEncryptionByDefault"] for r in rules]
    except ClientError:
        current_default = []
    if current_default != [r["ApplyServerSideEncryptionByDefault"] for r in wanted["Rules"]]:
        s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration=wanted)
        changes.append(f"default encryption {wanted['Rules'][0]['ApplyServerSideEncryptionByDefault']['SSEAlgorithm']}")

    policy = tls_only_policy(bucket)
    try:
        current_policy = json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])
    except ClientError:
        current_policy = None
    if current_policy != policy:
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        changes.append("policy: deny non-TLS requests")

    if s3.get_bucket_versioning(Bucket=bucket).get("Status") != "Enabled":
        s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        changes.append("versioning on")

    rule = lifecycle_rule(cfg.storage.prefix, cfg.storage.noncurrent_days)
    try:
        current_rules = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError:
        current_rules = []
    current = next((r for r in current_rules if r.get("ID") == rule["ID"]), {})
    if any(current.get(key) != value for key, value in rule.items()):
        others = [r for r in current_rules if r.get("ID") != rule["ID"]]  # a rule someone else set stays
        s3.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration={"Rules": [*others, rule]})
        changes.append(f"lifecycle: old versions under {cfg.storage.prefix}/ deleted after {cfg.storage.noncurrent_days} days")
    return changes


def lifecycle_rule(prefix: str, noncurrent_days: int) -> dict:
    """Versioning keeps what is deleted or replaced (an erased photo, an older table's files): not for
    ever. Also drops the parts of multipart uploads a killed writer left behind."""
    return {"ID": "fruits-old-versions", "Filter": {"Prefix": f"{prefix}/"}, "Status": "Enabled",
            "NoncurrentVersionExpiration": {"NoncurrentDays": noncurrent_days},
            "Expiration": {"ExpiredObjectDeleteMarker": True},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7}}


def dvc_remote_url(cfg: DictConfig) -> str:
    return cfg.storage.uris.dvc


def configure_dvc_remote(cfg: DictConfig, repo: Path = Path(".")) -> None:
    """The DVC remote in the project bucket, default, with its region; a test endpoint goes to
    .dvc/config.local (never committed). Credentials stay in the environment / AWS profile. Through
    DVC's Python API, as the project drives DVC everywhere (`dvc remote add --default` and `modify`)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        with dvc.config.edit("repo") as conf:
            conf["remote"]["storage"] = {"url": dvc_remote_url(cfg), "region": str(cfg.storage.region)}
            conf["core"]["remote"] = "storage"
        with dvc.config.edit("local") as conf:
            local = conf["remote"].setdefault("storage", {})
            local.pop("endpointurl", None)
            if cfg.storage.endpoint_url:
                local["endpointurl"] = str(cfg.storage.endpoint_url)
            if not local:
                conf["remote"].pop("storage")


def run(cfg: DictConfig, dvc_repo: Path | None = None) -> list[str]:
    """Ensure the bucket; with dvc_repo, also point that repository's default DVC remote at it."""
    changes = ensure_bucket(cfg)
    if dvc_repo is not None:
        configure_dvc_remote(cfg, dvc_repo)
        log.info("dvc remote 'storage' -> %s (%s)", dvc_remote_url(cfg), cfg.storage.region)
    if changes:
        for change in changes:
            log.info("bucket %s: %s", cfg.storage.bucket, change)
    else:
        log.info("bucket s3://%s (%s) already as configured: nothing changed", cfg.storage.bucket, cfg.storage.region)
    return changes


def main(argv: list[str] | None = None) -> None:
    cfg = stage_config("Create or check the project bucket (EU region, private, encrypted, TLS only, versioned).", argv)
    run(cfg, Path(".") if Path(".dvc").is_dir() else None)


if __name__ == "__main__":
    run_command(main)
