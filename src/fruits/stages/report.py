"""report: a critique report built from measured numbers only (HTML, self-contained, and a Markdown twin).

Reads what the other stages wrote (metrics, provenance, the ingest manifest, features, rejects, PCA
vectors) and the price table in conf/cluster; computes the critique (what k keeps, where the time went, what the
run would cost on EMR at 10x and 100x the data, the alternatives) from those numbers.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from fruits.core import tables
from fruits.core.config import stage_config
from fruits.core.costs import alternatives, describe_fit, emr_estimate, predict_emr, predict_serverless, s3_reads
from fruits.core.registry import params_of
from fruits.core.spark import get_session

log = logging.getLogger(__name__)

SMALL_RUN_IMAGES = 5000


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("p", text) | ("table", headers, rows) | ("img", file, alt) | ("banner", text)


# --- pure computations ---------------------------------------------------------------------------------


def scale_predictions(scale: dict, cluster: DictConfig, report_cfg: DictConfig) -> list[dict]:
    """EMR on EC2 and EMR Serverless, for each configured image count and core-node count, from the
    measured per-stage fits (featurize, pca, index, report; ingest lists S3 on EMR) and today's config prices."""
    fits = {stage: scale["fits"][stage] for stage in ("featurize", "pca", "index", "report") if stage in scale["fits"]}
    rows = []
    for images in report_cfg.predict_images:
        for nodes in report_cfg.predict_core_nodes:
            emr = predict_emr(fits, scale["cores"], images, nodes, cluster)
            rows += [emr, predict_serverless(fits, scale["cores"], images, emr["vcpus"], cluster)]
    return rows


def critique(featurize_m: dict, pca_m: dict, provenance: dict, cluster: DictConfig, local_cores: int,
             scale: dict | None = None, report_cfg: DictConfig | None = None) -> list[str]:
    """The critique paragraphs, each from measured numbers (scale: the fits of `make bench-scale`, if any)."""
    lines = []
    kept = pca_m["explained_variance_at_k"]
    lines.append(
        f"k = {pca_m['k']} ({pca_m['k_rule']}) keeps {kept:.1%} of the variance and drops {1 - kept:.1%}; "
        f"90% would need {pca_m['components_for_90pct']} components and 95% {pca_m['components_for_95pct']}, "
        f"out of {pca_m['dimension']}. Storage per image: {pca_m['k'] * 8} bytes instead of "
        f"{pca_m['dimension'] * 4} ({pca_m['dimension'] * 4 / (pca_m['k'] * 8):.0f}x smaller)."
    )
    if pca_m["rows_fitted"] <= pca_m["dimension"]:
        lines.append(
            f"The PCA was fitted on {pca_m['rows_fitted']} Training rows, fewer than the {pca_m['dimension']} "
            "dimensions: at most rows - 1 components carry variance, so the curve says little about the full "
            "dataset. Refit on the full data before trusting the choice of k."
        )
    rate, computed = featurize_m["images_per_second"], featurize_m["run"]["computed"]
    total = featurize_m["seconds"] + pca_m["seconds"]
    lines.append(
        f"Of {total:.1f} s of Spark work, featurize took {featurize_m['seconds']:.1f} s "
        f"({featurize_m['seconds'] / total:.0%}) for {computed} image(s) through the model out of "
        f"{featurize_m['images']} ({featurize_m['run']['reused']} reused; {rate or 0:.1f} img/s on "
        f"{local_cores} cores, {featurize_m['partitions']} partitions, model "
        f"{model_builds(featurize_m['model_builds_per_worker'])}) and the PCA {pca_m['seconds']:.1f} s."
    )
    if not rate:
        lines.append("No image went through the model in this run (all reused): there is no throughput to "
                     "extrapolate costs from; `make bench` measures it.")
        return lines + rejects_and_weights(featurize_m, provenance)
    if computed < SMALL_RUN_IMAGES:
        lines.append(
            f"With fewer than {SMALL_RUN_IMAGES} images through the model, fixed costs (Spark jobs, worker start, "
            "engine import, model build, about 10 s) dominate the rate above; `make bench` measures the warm rate on "
            "1,920 images."
        )
    if scale is None:
        per_core = rate / max(1, local_cores)
        for factor in (10, 100):
            estimate = emr_estimate(featurize_m["images"] * factor, per_core, cluster)
            lines.append(
                f"At {factor}x the data ({estimate['images']} images) the EMR cluster ({estimate['cores']} worker vCPUs) "
                f"would need about {estimate['hours']:.2f} h, ${estimate['usd']:.2f} at ${estimate['usd_per_hour']:.2f}/h "
                "(a crude scaling of this run's rate: `make bench-scale` fits how each stage grows, and the report "
                "then predicts from those fits)."
            )
    else:
        costs = ", ".join(describe_fit(stage, fit) for stage, fit in scale["fits"].items() if stage != "ingest")
        lines.append(
            f"How time grows, measured (`make bench-scale`, {scale['cores']} cores, each stage its own process): "
            f"{costs}. The predictions below spread that growth over the cluster's vCPUs and keep the fixed "
            "costs; on EMR, ingest only lists S3."
        )
        predicted = scale_predictions(scale, cluster, report_cfg)
        for images in report_cfg.predict_images:
            emr = [r for r in predicted if r["images"] == images and r["option"].startswith("EMR on EC2")]
            cheapest, fastest = min(emr, key=lambda r: r["usd"]), min(emr, key=lambda r: r["hours"])
            lines.append(f"{images:,} images: cheapest on {cheapest['option']} (about {cheapest['hours']:.2f} h, "
                         f"${cheapest['usd']:.2f}), fastest on {fastest['option']} (about {fastest['hours']:.2f} h, "
                         f"${fastest['usd']:.2f}), cluster start included.")
    return lines + rejects_and_weights(featurize_m, provenance)


def model_builds(builds_per_worker: dict) -> str:
    """'built 2 time(s) over 2 worker(s)'; a run with nothing to compute looks no model up."""
    if not builds_per_worker:
        return "not built (no image to compute)"
    return f"built {sum(builds_per_worker.values())} time(s) over {len(builds_per_worker)} worker(s)"


def rejects_and_weights(featurize_m: dict, provenance: dict) -> list[str]:
    lines = []
    if featurize_m["rejected"]:
        lines.append(f"{featurize_m['rejected']} file(s) were rejected: {featurize_m['reject_reasons']}.")
    if not provenance.get("pretrained", False):
        lines.append(
            "The weights are NOT pretrained (offline fallback): the features exercise the pipeline but carry "
            "no ImageNet knowledge; the variance curve and the scatter are not evidence about real fruit."
        )
    elif provenance.get("imagenet") is False:
        lines.append(
            f"The weights are not the ImageNet ones ({provenance.get('source')}): fine-tuning on another task "
            "shifts what the features capture; rerun with model.weights=imagenet before drawing conclusions."
        )
    return lines


# --- rendering -----------------------------------------------------------------------------------------


def right_share(index_m: dict) -> str:
    """The index stage's accuracy, with its 95 % interval when the metrics have one."""
    if index_m["knn_accuracy"] is None:
        return "- (no Test image)"
    interval = index_m.get("knn_accuracy_interval_95")
    return f"{index_m['knn_accuracy']:.1%}" + (f" (95 % interval {interval[0]:.1%} to {interval[1]:.1%})"
                                               if interval else "")


def answered_test_images(index_m: dict) -> str:
    """Which Test images the index stage's accuracy is measured on: all of them, or its fixed sample."""
    answered, rows = index_m.get("test_rows_answered", index_m["test_rows"]), index_m["test_rows"]
    if answered == rows:
        return f"{rows} Test images"
    error = index_m.get("knn_accuracy_standard_error")
    return (f"{answered} Test images of {rows} (a fixed sample by path hash, identify.accuracy_queries"
            + (f"; standard error {error:.1%})" if error is not None else ")"))


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    """Markdown; figures linked relative to folder (where the Markdown file is)."""
    sections = [Section(s.title, [("img", os.path.relpath(b[1], folder), b[2]) if b[0] == "img" else b
                                  for b in s.blocks]) for s in sections]
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if block[0] == "p":
                out += [block[1], ""]
            elif block[0] == "banner":
                out += [f"> **{block[1]}**", ""]
            elif block[0] == "img":
                out += [f"![{block[2]}]({block[1]})", ""]
            elif block[0] == "table":
                out += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
                out += ["| " + " | ".join(str(c) for c in row) + " |" for row in block[2]] + [""]
    return "\n".join(out)


def render_html(title: str, sections: list[Section]) -> str:
    """Self-contained: the figures are embedded."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{esc(section.title)}</h2>")
        for block in section.blocks:
            if block[0] == "p":
                body.append(f"<p>{esc(block[1])}</p>")
            elif block[0] == "banner":
                body.append(f'<p class="banner">{esc(block[1])}</p>')
            elif block[0] == "img":
                data = base64.b64encode(block[1].read_bytes()).decode()
                body.append(f'<img alt="{esc(block[2])}" src="data:image/png;base64,{data}">')
            elif block[0] == "table":
                head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
                body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
             ".banner{background:#b00020;color:white;padding:.8em;font-weight:bold}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


# --- figures (matplotlib) ----------------------------------------------------------------------------------


def plot_variance(curve_csv: Path, k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curve_csv) as stream:
        rows = list(csv.DictReader(stream))
    components = [int(r["component"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(components, [float(r["explained_variance"]) for r in rows], color="#9ab", label="per component")
    ax.plot(components, [float(r["cumulative_explained_variance"]) for r in rows], color="#c30", label="cumulative")
    ax.axvline(k, color="black", linestyle="--", label=f"k = {k}")
    ax.set_xlabel("component")
    ax.set_ylabel("explained variance share")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scatter(points: list[tuple[float, float, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({p[2] for p in points})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, label in enumerate(labels):
        xs = [p[0] for p in points if p[2] == label]
        ys = [p[1] for p in points if p[2] == label]
        ax.scatter(xs, ys, s=12, color=colours(i % 20), label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- the stage -----------------------------------------------------------------------------------------


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
        "featurize": read_json(paths.featurize_metrics),
        "pca": read_json(paths.pca_metrics),
        "index": read_json(paths.index_metrics),
        "provenance": read_json(paths.provenance),
        "manifest": read_json(paths.ingest_metrics),
        "scale": scale_fits(cfg),
        "counts": [(r["label"], r["split"], r["count"]) for r in counts],
        "rejects": [(r["reject_reason"], r["count"]) for r in rejects],
        "points": [(float(p[0]), float(p[1]), p[2]) for p in points],
        "spark_version": spark.version,
        "master": spark.sparkContext.master,
        "cores": spark.sparkContext.defaultParallelism,
    }


def transform(facts: dict, cfg: DictConfig) -> list[Section]:
    featurize_m, pca_m, provenance = facts["featurize"], facts["pca"], facts["provenance"]
    sections = []
    header = Section("Summary")
    if provenance.get("warning"):
        header.blocks.append(("banner", f"{provenance['warning']} (source: {provenance.get('source')})"))
    header.blocks.append(("p", f"Data: {cfg.data.name} - {facts['manifest'].get('origin', 'origin unknown')}."))
    header.blocks.append(("table", ["images", "featurized", "rejected", "img/s", "k", "variance kept"],
                          [[featurize_m["images"], featurize_m["featurized"], featurize_m["rejected"],
                            featurize_m["images_per_second"], pca_m["k"], f"{pca_m['explained_variance_at_k']:.1%}"]]))
    sections.append(header)

    per_label: dict[str, dict[str, int]] = {}
    for label, split, count in facts["counts"]:
        per_label.setdefault(label, {})[split] = count
    sections.append(Section("Images per label and split", [("table", ["label", "Training", "Test"],
                            [[label, c.get("Training", 0), c.get("Test", 0)] for label, c in sorted(per_label.items())])]))
    sections.append(Section("Rejects", [("table", ["reason", "files"], sorted(facts["rejects"]))] if facts["rejects"]
                            else [("p", "No file was rejected.")]))
    sections.append(Section("Model and weights", [("table", ["key", "value"],
                            [[k, provenance[k]] for k in ("architecture", "input_size", "alpha", "feature_dim",
                                                          "source", "pretrained", "imagenet", "sha256") if k in provenance])]))
    run = featurize_m["run"]
    sections.append(Section("Featurize", [("table", ["measure", "value"], [
        ["images now (featurized + rejected)", featurize_m["images"]],
        ["this run: new / changed / deleted / reused", f"{run['new']} / {run['changed']} / {run['deleted']} / {run['reused']}"],
        ["this run: images through the model", run["computed"]], ["this run: rejected", run["rejected"]],
        ["wall time (s)", featurize_m["seconds"]], ["images per second (through the model)", featurize_m["images_per_second"]],
        ["partitions", featurize_m["partitions"]],
        ["model builds per worker", featurize_m["model_builds_per_worker"] or "none (no image to compute)"]])]))

    variance_png, scatter_png = Path(cfg.env.paths.variance_plot), Path(cfg.env.paths.scatter_plot)
    for figure in (variance_png, scatter_png):
        figure.parent.mkdir(parents=True, exist_ok=True)
    plot_variance(Path(cfg.env.paths.pca_variance), pca_m["k"], variance_png)
    plot_scatter(facts["points"], scatter_png)
    sections.append(Section("PCA", [
        ("p", f"k = {pca_m['k']} ({pca_m['k_rule']}), {pca_m['explained_variance_at_k']:.1%} of the variance; "
              f"fitted on {pca_m['rows_fitted']} Training rows, {pca_m['rows_projected']} rows projected; "
              f"standardised: {pca_m['standardize']}."),
        ("img", variance_png, "explained variance per component and cumulative"),
        ("p", f"First two components of {len(facts['points'])} images, coloured by label:"),
        ("img", scatter_png, "2-D projection coloured by label")]))

    index_m = facts["index"]
    by_components = index_m["knn_accuracy_by_components"]
    sections.append(Section("The app: which fruit is this?", [
        ("p", f"A photo is answered by the vote of its {index_m['neighbours']} nearest Training images in PCA space "
              f"({index_m['training_vectors']} vectors, {index_m['labels']} labels), weighted by 1 / distance. On the "
              f"{answered_test_images(index_m)}, that answer is right for "
              + right_share(index_m)
              + f" at k = {index_m['components']} components. With fewer components (the first j of the same PCA):"),
        ("table", ["components", "right answers on Test"],
         [[j, "-" if share is None else f"{share:.1%}"] for j, share in by_components.items()])]))

    cluster, scale = cfg.cluster, facts["scale"]
    per_core = (featurize_m["images_per_second"] or 0) / max(1, facts["cores"])
    rows = []
    if scale is not None:
        for option in scale_predictions(scale, cluster, cfg.report):
            rows.append([f"{option['images']:,}", option["option"], f"{option['hours']:.2f}", f"${option['usd']:.2f}",
                         "from the fits of make bench-scale; start-up included"])
        per_core = 1 / (scale["fits"]["featurize"]["per_image_s"] * scale["cores"])  # marginal, measured at scale
        counts = list(cfg.report.predict_images)
    else:
        counts = [featurize_m["images"] * factor for factor in (10, 100)] if per_core else []
    for images in counts:
        options = alternatives(images, per_core, cluster)
        for option in options[2:] if scale is not None else options:  # with fits, the EMR rows are above
            rows.append([f"{images:,}", option["option"], f"{option['hours']:.2f}", f"${option['usd']:.2f}", option["note"]])
    sections.append(Section("Critique", [("p", line) for line in critique(featurize_m, pca_m, provenance, cluster,
                                                                          facts["cores"], scale, cfg.report)]
                            + [("table", ["images", "option", "hours", "cost", "note"], rows)]))

    manifest, s3 = facts["manifest"], cfg.cluster.prices.s3
    mean_bytes = manifest["bytes"] / max(1, manifest["images"])
    sections.append(Section("Reading the images from S3: loose files or Parquet shards", [
        ("p", f"Featurize reads every image once. Loose files cost a GET each, whose latency (about "
              f"{s3.first_byte_ms} ms, assumed) is paid inside the tasks; shards of {cfg.data.shard_mb} MB "
              f"(`data.layout=parquet`) are read with a few ranged GETs per {mean_bytes / 1024:.1f} KiB image row group. "
              f"Prices: {s3.source}."),
        ("table", ["images", "layout", "LIST", "GET", "cost (USD)", "GET latency per image (ms)"],
         [[f"{r['images']:,}", r["layout"], f"{r['list_requests']:,}", f"{r['get_requests']:,}", f"{r['usd']:.4f}",
           f"{r['latency_ms_per_image']:.3f}"] for n in (100_000, 10_000_000)
          for r in s3_reads(n, mean_bytes, cfg.data.shard_mb, s3)])]))

    environment = [["env", cfg.env.name], ["Spark master", facts["master"]], ["Spark", facts["spark_version"]],
                   ["cores", facts["cores"]], ["Python", platform.python_version()], ["machine", platform.machine()]]
    if cfg.env.name == "emr" and per_core:
        estimate = emr_estimate(featurize_m["images"], per_core, cluster)
        environment += [["cluster", f"{cluster.release_label}, 1 x {cluster.primary_instance_type} + "
                                    f"{cluster.core_instance_count} x {cluster.core_instance_type}"],
                        ["estimated cost of this run", f"${estimate['usd']:.2f}"]]
    sections.append(Section("Run environment", [("table", ["key", "value"], environment)]))
    sections.append(Section("Configuration", [("p", "The parameters the pipeline's stages ran with (params.yaml):"),
                                              ("table", ["key", "value"], [[k, v] for k, v in params_of(cfg).items()])]))
    return sections


def load(sections: list[Section], cfg: DictConfig) -> tuple[Path, Path]:
    html_path, md_path = Path(cfg.env.paths.report_html), Path(cfg.env.paths.report_md)
    title = f"Fruits! pipeline report ({cfg.env.name}, {cfg.data.name})"
    for path in (html_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(title, sections), encoding="utf-8")
    md_path.write_text(render_markdown(title, sections, md_path.parent), encoding="utf-8")
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
