"""Every AWS client of the project, made here: region from the guarded config, optional endpoint
(a local S3 server in tests), credentials from the environment or the AWS profile, never the repo."""

from __future__ import annotations

from omegaconf import DictConfig

from fruits.config import EU_REGIONS, ConfigError, validate


def client(service: str, cfg: DictConfig, region_setting: str = "storage.region"):
    import boto3
    from omegaconf import OmegaConf

    validate(cfg)  # refuses a non-EU region before any call
    region = OmegaConf.select(cfg, region_setting)
    if region not in EU_REGIONS:
        raise ConfigError(f"{region_setting}={region} is outside the EU; GDPR requires one of {', '.join(EU_REGIONS)}")
    options = {"region_name": region}
    # A local endpoint (tests): storage.endpoint_url for S3, cluster.endpoint_url for EMR.
    endpoint = cfg.storage.endpoint_url if service == "s3" else OmegaConf.select(cfg, "cluster.endpoint_url")
    if endpoint:
        options["endpoint_url"] = endpoint
    return boto3.client(service, **options)
