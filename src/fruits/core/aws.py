"""Every AWS client of the project, made here: region from the validated config (checked again against
the EU list right before the client exists), optional endpoint (a local server in tests), credentials
from the environment or the AWS profile, never the repository. And the bucket-location guard."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from fruits.core.config import REGION_SETTINGS
from fruits.core.errors import EU_REGIONS, ConfigError, check_region


def client(service: str, cfg: DictConfig, region_setting: str = "storage.region", **options):
    """options: boto3's own (endpoint_url, verify, credentials) where a caller knows better than the
    config, e.g. the standalone cluster's S3 stand-in."""
    import boto3

    if region_setting not in REGION_SETTINGS:
        raise ValueError(f"{region_setting} is not a region setting the guard checks: {REGION_SETTINGS}")
    region = OmegaConf.select(cfg, region_setting)
    check_region(region_setting, region)  # refuses a non-EU region before any call
    options["region_name"] = region
    # A local endpoint (tests): storage.endpoint_url for S3, cluster.endpoint_url for EMR.
    endpoint = cfg.storage.endpoint_url if service == "s3" else cfg.cluster.endpoint_url
    if endpoint and not options.get("endpoint_url"):
        options["endpoint_url"] = endpoint
    return boto3.client(service, **options)


def bucket_region(s3, bucket: str) -> str | None:
    """The bucket's region, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        location = s3.get_bucket_location(Bucket=bucket)["LocationConstraint"]
    except ClientError as err:
        if err.response["Error"]["Code"] in ("NoSuchBucket", "404"):
            return None
        raise
    return location or "us-east-1"  # S3 reports us-east-1 as an empty constraint


def check_location(s3, bucket: str) -> str | None:
    """Refuse a bucket that exists outside the EU (whatever storage.region says); its region or None."""
    region = bucket_region(s3, bucket)
    if region is not None and region not in EU_REGIONS:
        raise ConfigError(
            f"storage.bucket={bucket} is located in {region}, outside the EU; GDPR requires one of "
            f"{', '.join(EU_REGIONS)}. Use another bucket name."
        )
    return region


def require_bucket(s3, bucket: str) -> str:
    """check_location, and the bucket must exist: its region."""
    region = check_location(s3, bucket)
    if region is None:
        raise ConfigError(f"storage.bucket={bucket} does not exist: create it with `make bucket` "
                          "(python -m fruits.cloud.bucket) or set storage.bucket")
    return region
