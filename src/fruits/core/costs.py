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
    serverless = vcpu_hours * (prices.serverless.vcpu_hour + prices.serverless.gb_per_vcpu * prices.serverless.gb_hour)
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


def fit_line(counts, seconds) -> tuple[float, float]:
    """(fixed seconds, seconds per image): the least-squares line through measured (count, seconds),
    its slope kept >= 0. A stage whose time does not grow measurably can fit a slightly negative slope
    (noise), which would predict less than its fixed cost at 10M images: it is flat (the mean) instead."""
    import numpy as np

    counts, seconds = np.asarray(counts, float), np.asarray(seconds, float)
    per_image, fixed = np.polyfit(counts, seconds, 1)
    if per_image < 0:
        return float(seconds.mean()), 0.0
    return float(fixed), float(per_image)


def search_pairs(images: int, test_share: float, accuracy_queries: int) -> float:
    """Test queries x Training rows the index stage's accuracy search makes for `images`: every Test
    row up to accuracy_queries, then a fixed sample of that many, each against every Training row."""
    test = test_share * images
    return min(test, accuracy_queries) * (images - test)


def stage_work_seconds(fit: dict, images: int) -> float:
    """A stage's measured growth for `images`, beyond its fixed cost, on the cores it was measured on:
    seconds per image, or (fits with per_pair_s: the index stage) seconds per search pair."""
    if "per_pair_s" in fit:
        return fit["per_pair_s"] * search_pairs(images, fit["test_share"], fit["accuracy_queries"])
    return fit["per_image_s"] * images


def describe_growth(fit: dict) -> str:
    """A fit's growth in words: '5.5 ms per image', or per search pair for the index stage."""
    if "per_pair_s" in fit:
        return (f"{fit['per_pair_s'] * 1e9:.3g} ns per Test query x Training row (queries capped at "
                f"{fit['accuracy_queries']:,})")
    return f"{1000 * fit['per_image_s']:.3g} ms per image"


def describe_fit(stage: str, fit: dict) -> str:
    """A fit in words: '<stage> 12 s fixed + 5.5 ms per image' (or per search pair)."""
    return f"{stage} {fit['fixed_s']:.0f} s fixed + {describe_growth(fit)}"


def stage_seconds(fits: dict, images: int, local_cores: int, vcpus: int, speed: float) -> dict[str, float]:
    """Seconds per stage for `images` on `vcpus` workers: each stage's measured fixed cost, plus its
    growth measured on local_cores cores, spread over the vCPUs (speed: one vCPU's speed relative to
    one local core)."""
    return {stage: fit["fixed_s"] + stage_work_seconds(fit, images) * local_cores / (vcpus * speed)
            for stage, fit in fits.items()}


def predict_emr(fits: dict, local_cores: int, images: int, core_nodes: int, cluster: DictConfig) -> dict:
    """Wall time and cost of the Spark stages on EMR on EC2: 1 primary + core_nodes core nodes of the
    configured types, cluster start and bootstrap included, from the measured fits."""
    prices = cluster.prices
    vcpus = core_nodes * prices.instances[cluster.core_instance_type].vcpu
    stages = stage_seconds(fits, images, local_cores, vcpus, prices.vcpu_speed_vs_local_core)
    hours = (prices.startup_hours * 3600 + sum(stages.values())) / 3600
    hourly = node_price(prices, cluster.primary_instance_type) + core_nodes * node_price(prices, cluster.core_instance_type)
    return {"option": f"EMR on EC2, 1 + {core_nodes} x {cluster.core_instance_type}", "images": images, "vcpus": vcpus,
            "stages_s": stages, "hours": hours, "usd": hours * hourly}


def predict_serverless(fits: dict, local_cores: int, images: int, vcpus: int, cluster: DictConfig) -> dict:
    """The same work on EMR Serverless with `vcpus` worker vCPUs (4 vCPU / 16 GB workers) and a driver of
    the same size, billed per vCPU-hour and GB-hour from start to end (start-up included)."""
    prices, serverless = cluster.prices, cluster.prices.serverless
    stages = stage_seconds(fits, images, local_cores, vcpus, prices.vcpu_speed_vs_local_core)
    hours = (serverless.startup_minutes * 60 + sum(stages.values())) / 3600
    billed_vcpus = vcpus + serverless.worker_vcpu  # the driver is billed too
    usd = hours * billed_vcpus * (serverless.vcpu_hour + serverless.gb_per_vcpu * serverless.gb_hour)
    return {"option": f"EMR Serverless, {vcpus} worker vCPUs", "images": images, "vcpus": vcpus, "stages_s": stages,
            "hours": hours, "usd": usd}
