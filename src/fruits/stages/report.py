"""report: a critique report built from measured numbers only (HTML, self-contained, and a Markdown twin).

extract: what the other stages wrote (metrics, provenance, the ingest manifest, aggregates of the
features, rejects and PCA vectors) and the price table in conf/cluster; transform: the report's
sections, the critique computed from those numbers (fruits.core.critique); load: both documents,
rendered by Jinja2 templates (fruits.core.rendering), each written whole.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from pathlib import Path

from omegaconf import DictConfig

from fruits.core import tables
from fruits.core.config import stage_config
from fruits.core.costs import alternatives, emr_estimate, s3_reads
from fruits.core.critique import answered_test_images, critique, right_share, scale_predictions, source_accounting
from fruits.core.registry import params_of
from fruits.core.rendering import Section, plot_scatter, plot_variance, render_html, render_markdown
from fruits.core.spark import get_session
from fruits.core.storage import write_text

log = logging.getLogger(__name__)

IGNORED_SHOWN = 50  # ignored source files listed in the report (all of them are in the ingest diagnostics)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def scale_fits(cfg: DictConfig) -> dict | None:
    """make bench-scale's fits (None if it was not run), with the index stage's query cap of this config,
    as the prices are: the predictions are for the pipeline as configured."""
    path = Path(cfg.report.scale_fits)
    if not path.exists():
        return None
    scale = json.loads(path.read_text())
    if "per_pair_s" in scale["fits"].get("index", {}):
        scale["fits"]["index"]["accuracy_queries"] = cfg.identify.accuracy_queries
    return scale


def extract(spark, cfg: DictConfig) -> dict:
    """The small numbers the report needs; the big tables stay in Spark (aggregates and a bounded sample)."""
    from pyspark.sql import functions as F

    paths = cfg.env.paths
    features = tables.read(spark, paths.features, cfg)
    counts = features.groupBy("split", "label").count().orderBy("label", "split").collect()
    rejects = tables.read(spark, paths.rejects, cfg).groupBy("reject_reason").count().collect()
    vectors = tables.read(spark, paths.pca_vectors, cfg)
    total = vectors.count()
    fraction = min(1.0, cfg.report.scatter_points / max(1, total))
    sample = vectors.sample(fraction=fraction, seed=0).limit(cfg.report.scatter_points)
    points = sample.select(F.col("pca")[0], F.col("pca")[1], "label").collect()
    return {
        "featurize": read_json(paths.featurize_diagnostics),  # each stage's whole record
        "pca": read_json(paths.pca_diagnostics),
        "index": read_json(paths.index_diagnostics),
        "provenance": read_json(paths.provenance),
        "manifest": read_json(paths.ingest_diagnostics),
        "scale": scale_fits(cfg),
        "counts": [(r["label"], r["split"], r["count"]) for r in counts],
        "rejects": [(r["reject_reason"], r["count"]) for r in rejects],
        "points": [(float(p[0]), float(p[1]), p[2]) for p in points],
        "spark_version": spark.version,
        "master": spark.sparkContext.master,
        "cores": spark.sparkContext.defaultParallelism,
    }



def summary_sections(facts: dict, cfg: DictConfig) -> list[Section]:
    """The summary, images per label, rejects, the model and the featurize run."""
    featurize_m, pca_m, provenance = facts["featurize"], facts["pca"], facts["provenance"]
    header = Section("Summary")
    if provenance.get("warning"):
        header.blocks.append(("banner", f"{provenance['warning']} (source: {provenance.get('source')})"))
    header.blocks.append(("p", f"Data: {cfg.data.name} - {facts['manifest'].get('origin', 'origin unknown')}."))
    if accounted := source_accounting(facts["manifest"], featurize_m):
        header.blocks.append(("p", accounted))
    header.blocks.append(("table", ["images", "featurized", "rejected", "img/s", "k", "variance kept"],
                          [[featurize_m["images"], featurize_m["featurized"], featurize_m["rejected"],
                            featurize_m["images_per_second"], pca_m["k"], f"{pca_m['explained_variance_at_k']:.1%}"]]))
    per_label: dict[str, dict[str, int]] = {}
    for label, split, count in facts["counts"]:
        per_label.setdefault(label, {})[split] = count
    run = featurize_m["run"]
    return [header,
            Section("Images per label and split", [("table", ["label", "Training", "Test"], [
                [label, c.get("Training", 0), c.get("Test", 0)] for label, c in sorted(per_label.items())])]),
            Section("Rejects", [("table", ["reason", "files"], sorted(facts["rejects"]))] if facts["rejects"]
                    else [("p", "No file was rejected.")]),
            *([Section("Ignored source files", [("table", ["file", "reason"], sorted(ignored.items())[:IGNORED_SHOWN])])]
              if (ignored := facts["manifest"].get("ignored_files")) else []),
            Section("Model and weights", [("table", ["key", "value"], [
                [k, provenance[k]] for k in ("architecture", "input_size", "alpha", "feature_dim", "source",
                                             "pretrained", "imagenet", "sha256") if k in provenance])]),
            Section("Featurize", [("table", ["measure", "value"], [
                ["images now (featurized + rejected)", featurize_m["images"]],
                ["this run: new / changed / deleted / reused",
                 f"{run['new']} / {run['changed']} / {run['deleted']} / {run['reused']}"],
                ["this run: images through the model", run["computed"]], ["this run: rejected", run["rejected"]],
                ["wall time (s)", featurize_m["seconds"]],
                ["images per second (through the model)", featurize_m["images_per_second"]],
                ["partitions", featurize_m["partitions"]],
                ["model builds per worker", featurize_m["model_builds_per_worker"] or "none (no image to compute)"]])])]


def pca_and_app_sections(facts: dict, cfg: DictConfig) -> list[Section]:
    """The PCA (with its two figures, drawn here) and the app's accuracy on Test images."""
    pca_m, index_m = facts["pca"], facts["index"]
    variance_png, scatter_png = Path(cfg.env.paths.variance_plot), Path(cfg.env.paths.scatter_plot)
    for figure in (variance_png, scatter_png):
        figure.parent.mkdir(parents=True, exist_ok=True)
    plot_variance(Path(cfg.env.paths.pca_variance), pca_m["k"], variance_png)
    plot_scatter(facts["points"], scatter_png)
    pca = Section("PCA", [
        ("p", f"k = {pca_m['k']} ({pca_m['k_rule']}), {pca_m['explained_variance_at_k']:.1%} of the variance; "
              f"fitted on {pca_m['rows_fitted']} Training rows, {pca_m['rows_projected']} rows projected; "
              f"standardised: {pca_m['standardize']}."),
        ("img", variance_png, "explained variance per component and cumulative"),
        ("p", f"First two components of {len(facts['points'])} images, coloured by label:"),
        ("img", scatter_png, "2-D projection coloured by label")])
    app = Section("The app: which fruit is this?", [
        ("p", f"A photo is answered by the vote of its {index_m['neighbours']} nearest Training images in PCA space "
              f"({index_m['training_vectors']} vectors, {index_m['labels']} labels), weighted by 1 / distance. On the "
              f"{answered_test_images(index_m)}, that answer is right for "
              + right_share(index_m)
              + f" at k = {index_m['components']} components. With fewer components (the first j of the same PCA):"),
        ("table", ["components", "right answers on Test"],
         [[j, "-" if share is None else f"{share:.1%}"] for j, share in index_m["knn_accuracy_by_components"].items()])])
    return [pca, app]


def marginal_rate(facts: dict) -> float:
    """Images per second per core: measured at scale by make bench-scale when its fits exist, else this run's."""
    if facts["scale"] is not None:
        return 1 / (facts["scale"]["fits"]["featurize"]["per_image_s"] * facts["scale"]["cores"])
    return (facts["featurize"]["images_per_second"] or 0) / max(1, facts["cores"])


def critique_section(facts: dict, cfg: DictConfig) -> Section:
    """The critique paragraphs and what larger runs would cost, on EMR and the alternatives."""
    featurize_m, cluster, scale = facts["featurize"], cfg.cluster, facts["scale"]
    per_core, rows = marginal_rate(facts), []
    if scale is not None:
        for option in scale_predictions(scale, cluster, cfg.report):
            rows.append([f"{option['images']:,}", option["option"], f"{option['hours']:.2f}", f"${option['usd']:.2f}",
                         "from the fits of make bench-scale; start-up included"])
        counts = list(cfg.report.predict_images)
    else:
        counts = [featurize_m["images"] * factor for factor in (10, 100)] if per_core else []
    for images in counts:
        options = alternatives(images, per_core, cluster)
        for option in options[2:] if scale is not None else options:  # with fits, the EMR rows are above
            rows.append([f"{images:,}", option["option"], f"{option['hours']:.2f}", f"${option['usd']:.2f}", option["note"]])
    return Section("Critique", [("p", line) for line in critique(featurize_m, facts["pca"], facts["provenance"], cluster,
                                                                 facts["cores"], scale, cfg.report)]
                   + [("table", ["images", "option", "hours", "cost", "note"], rows)])


def storage_and_run_sections(facts: dict, cfg: DictConfig) -> list[Section]:
    """S3 reads by layout, the run's environment (and its cost on EMR), the configuration."""
    manifest, s3, cluster = facts["manifest"], cfg.cluster.prices.s3, cfg.cluster
    mean_bytes = manifest["bytes"] / max(1, manifest["images"])
    reads = Section("Reading the images from S3: loose files or Parquet shards", [
        ("p", f"Featurize reads every image once. Loose files cost a GET each, whose latency (about "
              f"{s3.first_byte_ms} ms, assumed) is paid inside the tasks; shards of {cfg.data.shard_mb} MB "
              f"(`data.layout=parquet`) are read with a few ranged GETs per {mean_bytes / 1024:.1f} KiB image row group. "
              f"Prices: {s3.source}."),
        ("table", ["images", "layout", "LIST", "GET", "cost (USD)", "GET latency per image (ms)"],
         [[f"{r['images']:,}", r["layout"], f"{r['list_requests']:,}", f"{r['get_requests']:,}", f"{r['usd']:.4f}",
           f"{r['latency_ms_per_image']:.3f}"] for n in (100_000, 10_000_000)
          for r in s3_reads(n, mean_bytes, cfg.data.shard_mb, s3)])])
    environment = [["env", cfg.env.name], ["Spark master", facts["master"]], ["Spark", facts["spark_version"]],
                   ["cores", facts["cores"]], ["Python", platform.python_version()], ["machine", platform.machine()]]
    if cfg.env.name == "emr" and (per_core := marginal_rate(facts)):
        estimate = emr_estimate(facts["featurize"]["images"], per_core, cluster)
        environment += [["cluster", f"{cluster.release_label}, 1 x {cluster.primary_instance_type} + "
                                    f"{cluster.core_instance_count} x {cluster.core_instance_type}"],
                        ["estimated cost of this run", f"${estimate['usd']:.2f}"]]
    return [reads, Section("Run environment", [("table", ["key", "value"], environment)]),
            Section("Configuration", [("p", "The parameters the pipeline's stages ran with (params.yaml):"),
                                      ("table", ["key", "value"], [[k, v] for k, v in params_of(cfg).items()])])]


def transform(facts: dict, cfg: DictConfig) -> list[Section]:
    return [*summary_sections(facts, cfg), *pca_and_app_sections(facts, cfg), critique_section(facts, cfg),
            *storage_and_run_sections(facts, cfg)]


def load(sections: list[Section], cfg: DictConfig) -> tuple[Path, Path]:
    html_path, md_path = Path(cfg.env.paths.report_html), Path(cfg.env.paths.report_md)
    title = f"Fruits! pipeline report ({cfg.env.name}, {cfg.data.name})"
    write_text(html_path, render_html(title, sections))
    write_text(md_path, render_markdown(title, sections, md_path.parent))
    return html_path, md_path


def run(cfg: DictConfig, spark=None) -> tuple[Path, Path]:
    tables.require("env.paths.features", cfg, "featurize")
    spark = spark or get_session(cfg)
    paths = load(transform(extract(spark, cfg), cfg), cfg)
    log.info("report: %s and %s", *paths)
    return paths


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    run(stage_config("Build the critique report from the measured numbers.", argv))


if __name__ == "__main__":
    main()
