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
from fruits.core.images import TEST, TRAINING
from fruits.core.measures import percent
from fruits.core.critique import (answered_test_images, critique, input_choice, right_share, scale_predictions,
                                  source_accounting)
from fruits.core.storage import Storage, filesystem
from fruits.core.registry import params_of
from fruits.core.rendering import Section, plot_scatter, plot_variance, render_html, render_markdown
from fruits.core.spark import get_session
from fruits.core.storage import write_text
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

IGNORED_SHOWN = 50  # ignored source files listed in the report (all of them are in the ingest diagnostics)
WRONG_SHOWN = 12  # wrong answers shown with thumbnails, per protocol (the index diagnostics keep more)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the stage that writes it first (dvc repro)")
    return json.loads(path.read_text())


def bench_results(path: str | Path) -> dict | None:
    """A committed benchmark's results, None if that benchmark was never run."""
    return read_json(path) if Path(path).exists() else None


def scale_fits(cfg: DictConfig) -> dict | None:
    """make bench-scale's fits (None if it was not run), with the index stage's query cap of this config,
    as the prices are: the predictions are for the pipeline as configured."""
    scale = bench_results(cfg.report.scale_fits)
    if scale is None:
        return None
    if "per_pair_s" in scale["fits"].get("index", {}):
        scale["fits"]["index"]["accuracy_queries"] = cfg.identify.accuracy_queries
    return scale


def thumbnails(index_m: dict, cfg: DictConfig) -> dict[str, bytes | None]:
    """The bytes of the photos the report shows beside the wrong answers (None: gone since the index stage)."""
    fs, root = filesystem(str(cfg.env.paths.images), Storage.of(cfg))
    wanted = {path for key in ("wrong_answers", "wrong_answers_hard") for wrong in index_m.get(key, [])[:WRONG_SHOWN]
              for path in (wrong["path"], *wrong["neighbours"])}
    found = {}
    for path in sorted(wanted):
        try:
            found[path] = fs.cat_file(f"{root.rstrip('/')}/{path}")
        except FileNotFoundError:
            found[path] = None
    return found


def extract(spark, cfg: DictConfig) -> dict:
    """The small numbers the report needs; the big tables stay in Spark (aggregates and a bounded sample)."""
    from pyspark.sql import functions as F

    paths = cfg.env.paths
    store = Storage.of(cfg)
    features = tables.read(spark, paths.features, store)
    counts = features.groupBy("split", "label").count().orderBy("label", "split").collect()
    rejects = tables.read(spark, paths.rejects, store).groupBy("reject_reason").count().collect()
    vectors = tables.read(spark, paths.pca_vectors, store)
    total = vectors.count()
    fraction = min(1.0, cfg.report.scatter_points / max(1, total))
    sample = vectors.sample(fraction=fraction, seed=0).limit(cfg.report.scatter_points)
    points = sample.select(F.col("pca")[0], F.col("pca")[1], "label").collect()
    index_m = read_json(paths.index_diagnostics)
    return {
        "featurize": read_json(paths.featurize_diagnostics),  # each stage's whole record
        "pca": read_json(paths.pca_diagnostics),
        "index": index_m,
        "thumbnails": thumbnails(index_m, cfg),
        "provenance": read_json(paths.provenance),
        "manifest": read_json(paths.ingest_diagnostics),
        "scale": scale_fits(cfg),
        "sizes": bench_results(cfg.report.size_choice),  # make bench-sizes: its choice of size and precision
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
            Section("Images per label and split", [("table", ["label", TRAINING, TEST], [
                [label, c.get(TRAINING, 0), c.get(TEST, 0)] for label, c in sorted(per_label.items())])]),
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
    pca_m = facts["pca"]
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
    return [pca, *app_sections(facts)]


def interval(values) -> str:
    return f"{values[0]:.1%} to {values[1]:.1%}" if values else "-"


def app_sections(facts: dict) -> list[Section]:
    """The app's accuracy on Test photos and on the hard protocol, per label, the confusion matrices, the
    wrong answers beside their nearest Training images, and "not sure" measured leave-one-label-out."""
    index_m = facts["index"]
    hard_by_components = index_m.get("knn_accuracy_hard_by_components", {})
    hard_by_label = index_m.get("knn_accuracy_hard_by_label", {})
    app = Section("The app: which fruit is this?", [
        ("p", f"A photo is answered by the vote of its {index_m['neighbours']} nearest Training images in PCA space "
              f"({index_m['training_vectors']} vectors, {index_m['labels']} labels), weighted by 1 / distance. On the "
              f"{answered_test_images(index_m)}, that answer is right for "
              + right_share(index_m) + f" at k = {index_m['components']} components."),
        ("p", "Fruits-360 photos are frames of a film of each fruit turning on a motor, so a Test photo is often a near "
              "copy of a Training frame, and that figure is optimistic. The hard protocol asks what a new view is "
              f"answered: {index_m.get('hard_protocol', '-')}. Right there: {percent(index_m.get('knn_accuracy_hard'))} "
              f"of {index_m.get('hard_queries', 0)} photos against {index_m.get('hard_training_vectors', 0)} Training frames "
              f"(95 % interval {interval(index_m.get('knn_accuracy_hard_interval_95'))})."),
        ("table", ["components (first j of the PCA)", "right on Test photos", "right, hard protocol"],
         [[j, percent(share), percent(hard_by_components.get(j))] for j, share in index_m["knn_accuracy_by_components"].items()]),
        ("table", ["label", "right on Test photos", "right, hard protocol"],
         [[label, percent(share), percent(hard_by_label.get(label))]
          for label, share in index_m.get("knn_accuracy_by_label", {}).items()])])
    sections = [app]
    for key, title in (("confusion", "Confusion matrix: Test photos"),
                       ("confusion_hard", "Confusion matrix: the hard protocol")):
        if table := index_m.get(key):
            answers = sorted({answer for row in table.values() for answer in row})
            sections.append(Section(title, [("p", "Rows: the photo's label; columns: the app's answer (photos)."),
                                            ("table", ["label \\ answer", *answers],
                                             [[label, *[row.get(a, "") for a in answers]] for label, row in table.items()])]))
    sections.append(wrong_answers_section(facts))
    sections.append(abstention_section(index_m))
    return sections


def wrong_answers_section(facts: dict) -> Section:
    index_m, thumbnails = facts["index"], facts["thumbnails"]
    section = Section("Wrong answers, beside their nearest Training images")
    for key, name in (("wrong_answers", "Test photos"), ("wrong_answers_hard", "The hard protocol")):
        wrong, total = index_m.get(key, []), index_m.get(f"{key}_total", 0)
        if not total:
            section.blocks.append(("p", f"{name}: no wrong answer."))
            continue
        section.blocks.append(("p", f"{name}: {total} wrong answer(s); the first {min(total, WRONG_SHOWN)} (path order), "
                                    "each photo then its nearest Training images:"))
        section.blocks.append(("thumbs", [(f"{w['path']}: {w['label']}, answered {w['answer']}",
                                           [(path, thumbnails.get(path)) for path in (w["path"], *w["neighbours"])])
                                          for w in wrong[:WRONG_SHOWN]]))
    return section


def abstention_section(index_m: dict) -> Section:
    curve = index_m.get("abstain_curve", [])
    held = index_m.get("abstained_held_back_by_label", {})
    return Section("Not sure: measured leave-one-label-out", [
        ("p", "A photo farther than the abstain distance from every Training image is answered 'not sure'. Held back: "
              "each Test photo's nearest Training image of another label is its nearest were its label held back "
              "from the index (leave-one-label-out over every label at once). The distance for each rate is taken on "
              "half the Test photos (by path hash) and measured on the other half "
              f"({index_m.get('abstain_evaluation_rows', 0)} photos)."),
        ("table", ["identify.abstain_known_rate", "distance", "known: not sure", "known: answered wrongly",
                   "held back: not sure (else wrong)"],
         [[p["abstain_known_rate"], p["distance"], percent(p["abstained_known"]), percent(p["wrong_known"]),
           percent(p["abstained_held_back"])] for p in curve]),
        ("p", f"The app runs at identify.abstain_known_rate = {index_m.get('abstain_known_rate')} (distance "
              f"{index_m.get('abstain_distance')}): not sure of {percent(index_m.get('abstained_known'))} of known photos "
              f"and of {percent(index_m.get('abstained_held_back'))} of held-back ones (goal: at most 5 % and at least "
              f"90 %). On the hard protocol's photos (a side of the fruit the index lacks) the same distance leaves "
              f"{percent(index_m.get('abstained_known_hard'))} of known photos not sure and "
              f"{percent(index_m.get('abstained_held_back_hard'))} of held-back ones: with few Training views, a new view "
              "of a known fruit looks unknown."),
        ("table", ["held-back label", "not sure"], [[label, percent(share)] for label, share in held.items()])])


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
    lines = [input_choice(facts.get("sizes"), cfg.model.input_size, str(cfg.model.precision)),
             *critique(featurize_m, facts["pca"], facts["provenance"], cluster, facts["cores"], scale, cfg.report,
                       facts["index"])]
    return Section("Critique", [("p", line) for line in lines]
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
    run_command(main)
