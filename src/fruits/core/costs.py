"""Cost arithmetic from the list prices in conf/cluster and a measured per-core rate (pure)."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from fruits.core.storage import ROW_GROUP_IMAGES


def node_price(prices: DictConfig, instance_type: str) -> float:
    """EC2 + EMR fee per hour for one node of that type."""
    if instance_type not in prices.instances:
        raise KeyError(f"cluster.prices.instances has no entry for {instance_type}: add its hourly prices")
    entry = prices.instances[instance_type]
    return float(entry.ec2) + float(entry.emr)


def cluster_hourly_price(cluster: DictConfig) -> float:
    """USD per hour of the whole configured cluster (primary + core nodes)."""
    prices = cluster.prices
    return node_price(prices, cluster.primary_instance_type) + cluster.core_instance_count * node_price(
        prices, cluster.core_instance_type)


def emr_estimate(images: int, per_core_rate: float, cluster: DictConfig) -> dict:
    """Hours and USD to featurize `images` on the configured EMR cluster, from a measured per-core rate."""
    prices = cluster.prices
    cores = cluster.core_instance_count * prices.instances[cluster.core_instance_type].vcpu
    hours = images / (per_core_rate * cores) / 3600 + prices.startup_hours
    hourly = cluster_hourly_price(cluster)
    return {"images": images, "cores": cores, "hours": hours, "usd": hours * hourly, "usd_per_hour": hourly}


def alternatives(images: int, per_core_rate: float, cluster: DictConfig) -> list[dict]:
    """The same featurization elsewhere, priced from the config's list prices and the measured rate."""
    prices = cluster.prices
    emr = emr_estimate(images, per_core_rate, cluster)
    vcpu_hours = images / per_core_rate / 3600
    serverless = vcpu_hours * (prices.serverless.vcpu_hour + 4 * prices.serverless.gb_hour)
    databricks_hours = emr["hours"]
    databricks = databricks_hours * (1 + cluster.core_instance_count) * (
        prices.databricks.dbu_per_node_hour * prices.databricks.usd_per_dbu + prices.instances[cluster.core_instance_type].ec2
    )
    gpu_hours = images / prices.gpu.images_per_second / 3600 + prices.startup_hours
    gpu = gpu_hours * (node_price(prices, prices.gpu.instance_type) + node_price(prices, cluster.primary_instance_type))
    return [
        {"option": f"EMR on EC2 ({1 + cluster.core_instance_count} x {cluster.core_instance_type})",
         "hours": emr["hours"], "usd": emr["usd"], "note": "cluster start included; idle auto-termination"},
        {"option": "EMR Serverless", "hours": vcpu_hours / emr["cores"], "usd": serverless,
         "note": "billed per vCPU-hour and GB-hour (4 GB/vCPU), no idle cluster"},
        {"option": "Databricks jobs compute", "hours": databricks_hours, "usd": databricks,
         "note": "DBUs on top of EC2; notebooks and MLflow included"},
        {"option": f"one GPU node ({prices.gpu.instance_type}) + primary", "hours": gpu_hours, "usd": gpu,
         "note": f"assumes {prices.gpu.images_per_second} img/s (not measured here)"},
    ]


SHARD_COLUMNS_READ = 3  # featurize reads path, checksum and content from a shard


def s3_reads(images: int, mean_bytes: float, shard_mb: float, s3: DictConfig) -> list[dict]:
    """LIST and GET requests, their cost, and the GET latency paid per image, to read `images` once from
    S3 as loose files (one GET each) or as Parquet shards (a footer and a ranged GET per column chunk)."""
    shards = max(1, math.ceil(images * mean_bytes / (shard_mb * 2**20)))
    layouts = {
        "files": (math.ceil(images / 1000), images),
        "parquet": (math.ceil(shards / 1000), shards + SHARD_COLUMNS_READ * math.ceil(images / ROW_GROUP_IMAGES)),
    }
    rows = []
    for layout, (lists, gets) in layouts.items():
        usd = lists / 1000 * s3.list_per_1000 + gets / 1000 * s3.get_per_1000
        rows.append({"images": images, "layout": layout, "list_requests": lists, "get_requests": gets,
                     "usd": usd, "latency_ms_per_image": s3.first_byte_ms * gets / images})
    return rows
