"""The report reflects the data: counts, rejects, provenance banner, k, costs."""

import json
import re

import pytest

from fruits.core import costs, critique
from fruits.stages import featurize, index, ingest, pca, report
from fruits.core.config import compose


def test_emr_estimate_from_a_measured_rate_and_list_prices():
    cluster = compose().cluster  # 1 + 2 m5.xlarge at 0.224 + 0.048 $/h each, 4 vCPUs per core node
    estimate = costs.emr_estimate(images=80_000, per_core_rate=10.0, cluster=cluster)
    assert estimate["cores"] == 8
    assert estimate["usd_per_hour"] == pytest.approx(3 * 0.272)
    assert estimate["hours"] == pytest.approx(80_000 / 80 / 3600 + cluster.prices.startup_hours)
    assert estimate["usd"] == pytest.approx(estimate["hours"] * 3 * 0.272)
    options = {o["option"].split(" (")[0]: o for o in costs.alternatives(80_000, 10.0, cluster)}
    assert set(options) == {"EMR on EC2", "EMR Serverless", "Databricks jobs compute", "one GPU node"}
    assert options["EMR Serverless"]["usd"] == pytest.approx(80_000 / 10 / 3600 * (0.06318 + 4 * 0.00689))


def test_an_unknown_instance_type_names_the_price_table():
    cluster = compose(["cluster.core_instance_type=x9.huge"]).cluster
    with pytest.raises(KeyError, match="cluster.prices.instances has no entry for x9.huge"):
        costs.cluster_hourly_price(cluster)


def test_report_from_a_real_run(spark, tiny_cfg):
    ingest.run(tiny_cfg)
    featurize.run(tiny_cfg, spark)
    pca_metrics = pca.run(tiny_cfg, spark)
    index_metrics = index.run(tiny_cfg, spark)
    html_path, md_path = report.run(tiny_cfg, spark)
    markdown, html = md_path.read_text(), html_path.read_text()
    for label in ("Apple Red", "Banana", "Kiwi", "Lemon"):
        assert f"| {label} | 6 | 2 |" in markdown
    assert "RANDOM WEIGHTS - NOT PRETRAINED" in markdown and 'class="banner"' in html
    assert f"k = {pca_metrics['k']} (pca.k) keeps {pca_metrics['explained_variance_at_k']:.1%}" in markdown
    assert "No file was rejected." in markdown
    assert "32 source files = 32 featurized + 0 rejected + 0 ignored + 0 left out of the subset" in markdown
    assert "## The app: which fruit is this?" in markdown
    assert f"On the {index_metrics['test_rows']} Test images, that answer is right for {index_metrics['knn_accuracy']:.1%}" in markdown
    assert "fewer than the 1280 dimensions" in markdown  # 24 Training rows: the critique says so
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 2  # self-contained
    assert (md_path.parent / "pca_variance.png").stat().st_size > 1000
    assert "| env | local |" in markdown and "| model.input_size | 96 |" in markdown
    for section in ("## Confusion matrix: Test photos", "## Wrong answers, beside their nearest Training images",
                    "## Not sure: measured leave-one-label-out"):
        assert section in markdown
    shown = index_metrics["wrong_answers"][:report.WRONG_SHOWN]
    assert len(re.findall(r'src="data:image/jpeg;base64,', html)) == sum(1 + len(w["neighbours"]) for w in shown)
    for wrong in shown:
        assert f"{wrong['path']}: {wrong['label']}, answered {wrong['answer']}" in markdown
    assert f"The app runs at identify.abstain_known_rate = {tiny_cfg.identify.abstain_known_rate}" in markdown
    assert "the hard protocol measured nothing" in markdown  # drawn images: no film of another axis


def test_the_report_says_when_the_accuracy_is_measured_on_a_sample():
    every = {"test_rows": 30, "test_rows_answered": 30, "knn_accuracy_standard_error": 0.05}
    assert critique.answered_test_images(every) == "30 Test images"
    sampled = {"test_rows": 90_000, "test_rows_answered": 19_950, "knn_accuracy_standard_error": 0.0021}
    assert critique.answered_test_images(sampled) == ("19950 Test images of 90000 (a fixed sample by path hash, "
                                                    "identify.accuracy_queries; standard error 0.2%)")



def test_the_report_gives_the_accuracy_with_its_interval_when_the_metrics_have_one():
    assert critique.right_share({"knn_accuracy": 1.0, "knn_accuracy_interval_95": [0.8865, 1.0]}) == \
        "100.0% (95 % interval 88.6% to 100.0%)"
    assert critique.right_share({"knn_accuracy": 0.5}) == "50.0%"  # metrics written before the interval
    assert critique.right_share({"knn_accuracy": None}) == "- (no Test image)"


def test_the_model_builds_read_as_a_count_or_as_not_built():
    assert critique.model_builds({"101": 1, "102": 1}) == "built 2 time(s) over 2 worker(s)"
    assert critique.model_builds({}) == "not built (no image to compute)"


def test_critique_follows_the_numbers():
    cluster = compose().cluster
    featurize_m = {"images": 90_000, "featurized": 89_990, "rejected": 10, "reject_reasons": {"empty file": 10},
                   "seconds": 600.0, "images_per_second": 150.0, "partitions": 180, "model_builds_per_worker": {"1": 1},
                   "run": {"computed": 90_000, "reused": 0}}
    pca_m = {"k": 50, "k_rule": "pca.k", "explained_variance_at_k": 0.58, "components_for_90pct": 210,
             "components_for_95pct": 330, "dimension": 1280, "rows_fitted": 67_000, "seconds": 60.0}
    lines = critique.critique(featurize_m, pca_m, {"pretrained": True}, cluster, local_cores=2)
    text = " ".join(lines)
    assert "keeps 58.0% of the variance and drops 42.0%" in text and "90% would need 210" in text
    assert "featurize took 600.0 s (91%)" in text
    assert "10 file(s) were rejected" in text
    assert "fewer than the 1280 dimensions" not in text and "NOT pretrained" not in text
    assert "fixed costs" not in text  # 90k images: not a small run
    assert "At 10x the data (900000 images)" in text

    # An incremental run where every image was reused measured no throughput: no cost is extrapolated.
    featurize_m.update(images_per_second=None, run={"computed": 0, "reused": 90_000})
    text = " ".join(critique.critique(featurize_m, pca_m, {"pretrained": True}, cluster, local_cores=2))
    assert "0 image(s) through the model out of 90000 (90000 reused" in text
    assert "no throughput to extrapolate" in text and "At 10x" not in text and "10 file(s) were rejected" in text


def test_the_choice_of_k_reads_the_hard_protocol_s_curve_with_its_error():
    pca_m = {"k": 20, "explained_variance_at_k": 0.78}
    index_m = {"components": 20, "hard_queries": 460, "hard_training_vectors": 58, "knn_accuracy_hard_standard_error": 0.0108,
               "knn_accuracy_by_components": {"2": 0.69, "5": 0.996, "10": 1.0, "20": 1.0},
               "knn_accuracy_hard_by_components": {"2": 0.639, "5": 0.957, "10": 0.946, "20": 0.943}}
    text = critique.choice_of_k(index_m, pca_m)
    assert "The best is 5 components (95.7%); k = 20 is 1.4% below it, within the 95 % margin (2.1%)" in text
    index_m["knn_accuracy_hard_by_components"]["20"] = 0.90
    assert "k = 20 is 5.7% below it, more than the 95 % margin (2.1%): consider k = 5" in critique.choice_of_k(
        index_m, pca_m)


def test_a_line_fitted_through_stage_times_gives_fixed_and_per_image_cost():
    fixed, per_image = costs.fit_line([1_000, 5_000, 20_000], [12.0 + 0.004 * n for n in (1_000, 5_000, 20_000)])
    assert fixed == pytest.approx(12.0) and per_image == pytest.approx(0.004)
    # A stage that does not grow (its times only jitter) is flat at its mean, never shrinking with the data.
    fixed, per_image = costs.fit_line([1_000, 5_000, 20_000, 50_000], [12.69, 14.24, 14.14, 13.15])
    assert per_image == 0 and fixed == pytest.approx((12.69 + 14.24 + 14.14 + 13.15) / 4)


def test_predictions_spread_the_per_image_cost_over_the_vcpus_and_keep_fixed_costs():
    cluster = compose().cluster  # m5.xlarge core nodes: 4 vCPUs, 0.224 + 0.048 $/h; startup 0.2 h
    fits = {"featurize": {"fixed_s": 10.0, "per_image_s": 0.01}, "pca": {"fixed_s": 20.0, "per_image_s": 0.0}}
    emr = costs.predict_emr(fits, local_cores=2, images=1_000_000, core_nodes=2, cluster=cluster)
    assert emr["vcpus"] == 8 and emr["stages_s"] == {"featurize": pytest.approx(10 + 0.01 * 1_000_000 * 2 / 8), "pca": 20.0}
    assert emr["hours"] == pytest.approx((0.2 * 3600 + 2510 + 20) / 3600)
    assert emr["usd"] == pytest.approx(emr["hours"] * 3 * 0.272)
    bigger = costs.predict_emr(fits, local_cores=2, images=1_000_000, core_nodes=8, cluster=cluster)
    assert bigger["hours"] < emr["hours"] and bigger["stages_s"]["featurize"] == pytest.approx(10 + 10_000 * 2 / 32)
    serverless = costs.predict_serverless(fits, local_cores=2, images=1_000_000, vcpus=8, cluster=cluster)
    assert serverless["hours"] == pytest.approx((2 * 60 + 2510 + 20) / 3600)
    assert serverless["usd"] == pytest.approx(serverless["hours"] * (8 + 4) * (0.06318 + 4 * 0.00689))


def test_the_index_stage_is_predicted_from_its_search_pairs_capped_at_the_accuracy_sample():
    cluster = compose().cluster
    fits = {"index": {"fixed_s": 14.0, "per_pair_s": 5e-8, "test_share": 0.2, "accuracy_queries": 20_000}}
    # 50k images: 10,000 Test rows, all answered, against 40,000 Training rows.
    assert costs.search_pairs(50_000, 0.2, 20_000) == pytest.approx(10_000 * 40_000)
    # 10M: 2M Test rows, a sample of 20,000 answered, against 8M Training rows: linear in the images.
    assert costs.search_pairs(10_000_000, 0.2, 20_000) == pytest.approx(20_000 * 8_000_000)
    emr = costs.predict_emr(fits, local_cores=2, images=10_000_000, core_nodes=2, cluster=cluster)
    assert emr["stages_s"]["index"] == pytest.approx(14 + 5e-8 * 20_000 * 8_000_000 * 2 / 8)
    assert costs.describe_fit("index", fits["index"]) == (
        "index 14 s fixed + 50 ns per Test query x Training row (queries capped at 20,000)")


def test_the_predictions_take_the_accuracy_sample_of_the_config(tmp_path):
    cfg = compose()
    fits = {"fixed_s": 14.0, "per_pair_s": 5e-8, "test_share": 0.2, "accuracy_queries": 20_000}
    (tmp_path / "scale.json").write_text(json.dumps({"cores": 2, "fits": {"index": fits}}))
    cfg.report.scale_fits, cfg.identify.accuracy_queries = str(tmp_path / "scale.json"), 5_000
    assert report.scale_fits(cfg)["fits"]["index"] == {**fits, "accuracy_queries": 5_000}
    cfg.report.scale_fits = str(tmp_path / "none.json")
    assert report.scale_fits(cfg) is None


def test_critique_predicts_from_the_scale_fits_when_there_are_some():
    cfg = compose()
    scale = {"cores": 2, "fits": {"featurize": {"fixed_s": 15.0, "per_image_s": 0.008},
                                  "pca": {"fixed_s": 20.0, "per_image_s": 0.0002},
                                  "report": {"fixed_s": 12.0, "per_image_s": 0.00005}}}
    featurize_m = {"images": 320, "featurized": 320, "rejected": 0, "reject_reasons": {}, "seconds": 12.0,
                   "images_per_second": 30.0, "partitions": 2, "model_builds_per_worker": {"1": 1},
                   "run": {"computed": 320, "reused": 0}}
    pca_m = {"k": 20, "k_rule": "pca.k", "explained_variance_at_k": 0.9, "components_for_90pct": 20,
             "components_for_95pct": 30, "dimension": 1280, "rows_fitted": 240, "seconds": 8.0}
    text = " ".join(critique.critique(featurize_m, pca_m, {"pretrained": True}, cfg.cluster, 2, scale, cfg.report))
    assert "featurize 15 s fixed + 8 ms per image, pca 20 s fixed + 0.2 ms per image" in text and "At 10x" not in text
    rows = critique.scale_predictions(scale, cfg.cluster, cfg.report)
    assert len(rows) == 2 * 3 * 2  # 2 image counts x 3 cluster sizes x (EMR, Serverless)
    big = [r for r in rows if r["images"] == 10_000_000 and r["option"].startswith("EMR on EC2")]
    fastest = min(big, key=lambda r: r["hours"])
    assert fastest["vcpus"] == 32 and f"fastest on {fastest['option']} (about {fastest['hours']:.2f} h" in text


def test_s3_read_arithmetic_for_both_layouts():
    s3 = compose().cluster.prices.s3
    files, shards = costs.s3_reads(100_000, 3000.0, 128, s3)
    assert (files["list_requests"], files["get_requests"]) == (100, 100_000)
    assert files["usd"] == pytest.approx(0.1 * s3.list_per_1000 + 100 * s3.get_per_1000)
    assert files["latency_ms_per_image"] == s3.first_byte_ms  # a GET per image
    # 3e8 bytes in 128 MiB shards: 3 shards, a footer each, 3 columns of 391 row groups of 256 images.
    assert (shards["list_requests"], shards["get_requests"]) == (1, 3 + 3 * 391)
    assert shards["latency_ms_per_image"] == pytest.approx(s3.first_byte_ms * 1176 / 100_000)


@pytest.mark.slow  # the whole pipeline, sample to report
def test_every_file_of_a_messy_source_is_accounted_for_from_the_source_to_the_report(spark, tiny_cfg, tmp_path):
    """A Fruits-360 folder with a stray image at its root, a .DS_Store and a text file: the stray image is
    a reject with its reason, the other two are listed as ignored, and the counts agree from the source
    to the tables: source files = featurized + rejected + ignored."""
    from fruits.stages import sample

    source = tmp_path / "fruits-360"
    sample.generate(source, ["Kiwi", "Banana"], {"Training": 4, "Test": 2}, 100, 3)
    sample.draw_fruit("Kiwi", 50).save(source / "stray.jpg")
    (source / "Training" / "Kiwi" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (source / "README.txt").write_text("where these photos come from")
    tiny_cfg.data.source, tiny_cfg.data.root = str(source), str(tmp_path / "images")
    tiny_cfg.env.paths.images = tiny_cfg.data.root
    tiny_cfg.data.labels = tiny_cfg.data.train_per_label = tiny_cfg.data.test_per_label = None

    manifest = sample.run(tiny_cfg)
    assert (manifest["source_files"], manifest["images"], manifest["not_selected"]) == (15, 13, 0)
    assert manifest["ignored"] == {"Training/Kiwi/.DS_Store": "system file",
                                   "README.txt": "not an image file (data.extensions: jpg, jpeg, png)"}
    assert ingest.run(tiny_cfg)["outside_layout"] == ["stray.jpg"]
    featurized = featurize.run(tiny_cfg, spark)
    assert (featurized["featurized"], featurized["rejected"]) == (12, 1)
    [(reason, count)] = featurized["reject_reasons"].items()
    assert count == 1 and "stray.jpg" in reason and "is not <Training|Test>/<label>/<file>" in reason
    pca.run(tiny_cfg, spark)
    index.run(tiny_cfg, spark)
    markdown = report.run(tiny_cfg, spark)[1].read_text()
    assert "15 source files = 12 featurized + 1 rejected + 2 ignored + 0 left out of the subset" in markdown
    assert "| Training/Kiwi/.DS_Store | system file |" in markdown


def test_the_critique_names_the_input_size_and_precision_and_whether_the_bench_chose_them():
    from fruits.core.critique import input_choice

    bench = {"choice": {"input_size": 100, "precision": "int8", "speedup": 4.79, "knn_accuracy_hard": 0.954348,
                        "reference_knn_accuracy_hard": 0.943478, "rule": "the fastest within 1 point of 224 px fp32"}}
    chosen = input_choice(bench, 100, "int8")
    assert chosen.startswith("The model runs at 100 px int8 (model.input_size, model.precision).")
    assert "picked 100 px int8: 4.79x the featurize rate, hard accuracy 95.4% against 94.3%" in chosen
    assert "Not the measured choice" not in chosen
    other = input_choice(bench, 224, "fp32")
    assert other.startswith("The model runs at 224 px fp32") and "Not the measured choice: make bench-sizes' rule" in other
    assert "has not been run" in input_choice(None, 224, "fp32")
