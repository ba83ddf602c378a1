"""Every AWS client of the project, made here: region from the guarded config, optional endpoint
(a local S3 server in tests), credentials from the environment or the AWS profile, never the repo."""

from __future__ import annotations

from omegaconf import DictConfig

from fruits.config import REGION_SETTINGS, validate


def client(service: str, cfg: DictConfig, region_setting: str = "storage.region"):
    import boto3
    from omegaconf import OmegaConf

    if region_setting not in REGION_SETTINGS:
        raise ValueError(f"{region_setting} is not a region setting the guard checks: {REGION_SETTINGS}")
    validate(cfg)  # refuses a non-EU region before any call
    region = OmegaConf.select(cfg, region_setting)
    options = {"region_name": region}
    # A local endpoint (tests): storage.endpoint_url for S3, cluster.endpoint_url for EMR.
    endpoint = cfg.storage.endpoint_url if service == "s3" else OmegaConf.select(cfg, "cluster.endpoint_url")
    if endpoint:
        options["endpoint_url"] = endpoint
    return boto3.client(service, **options)
