"""The report's critique, computed from measured numbers only: what k keeps, where the time went, what
the run would cost on EMR (and the alternatives) at larger scales, and the app's accuracy in words.
Pure functions: the report stage calls them with the metrics the other stages wrote."""

from __future__ import annotations

from omegaconf import DictConfig

from fruits.core.costs import describe_fit, emr_estimate, predict_emr, predict_serverless

SMALL_RUN_IMAGES = 5000


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
             scale: dict | None = None, report_cfg: DictConfig | None = None, index_m: dict | None = None) -> list[str]:
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
    if index_m is not None:
        lines.append(choice_of_k(index_m, pca_m))
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
    lines += scale_paragraphs(featurize_m, cluster, local_cores, scale, report_cfg)
    return lines + rejects_and_weights(featurize_m, provenance)


def scale_paragraphs(featurize_m: dict, cluster: DictConfig, local_cores: int, scale: dict | None,
                     report_cfg: DictConfig | None) -> list[str]:
    """What larger runs would take: from make bench-scale's fits when they exist, else a crude scaling
    of this run's rate."""
    lines = []
    if scale is None:
        per_core = featurize_m["images_per_second"] / max(1, local_cores)
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
    return lines


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


def choice_of_k(index_m: dict, pca_m: dict) -> str:
    """What the accuracy curves say of k: the hard protocol's (not saturated) first, the Test one's beside it."""
    k = index_m["components"]
    hard, test = index_m.get("knn_accuracy_hard_by_components") or {}, index_m["knn_accuracy_by_components"]
    measured = {int(j): share for j, share in hard.items() if share is not None}
    if not measured:
        return (f"k = {k}: the hard protocol measured nothing (the images are not Fruits-360 frames of several films), "
                "so only the Test accuracy speaks for k: " + ", ".join(f"{j}: {v:.1%}" for j, v in test.items()
                                                                     if v is not None) + ".")
    best = max(measured, key=lambda j: (measured[j], -j))
    margin = 1.96 * (index_m.get("knn_accuracy_hard_standard_error") or 0.0)  # the 95 % interval's half-width
    gap = measured[best] - measured.get(k, 0.0)
    verdict = (f"k = {k} is {gap:.1%} below it, within the 95 % margin ({margin:.1%}): no measurable loss, and k = {k} "
               "keeps more of the variance for the labels the sample lacks"
               if gap <= margin else
               f"k = {k} is {gap:.1%} below it, more than the 95 % margin ({margin:.1%}): consider k = {best}")
    return (f"Choice of k, from the hard protocol ({index_m.get('hard_queries', 0)} photos of the fruits' other films "
            f"against {index_m.get('hard_training_vectors', 0)} Training frames): right answers by components "
            + ", ".join(f"{j}: {v:.1%}" for j, v in sorted(measured.items()))
            + "; on Test photos " + ", ".join(f"{j}: {'-' if v is None else f'{v:.1%}'}" for j, v in test.items())
            + f". The best is {best} components ({measured[best]:.1%}); {verdict}. k = {k} keeps "
              f"{pca_m['explained_variance_at_k']:.1%} of the variance.")


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


def source_accounting(manifest: dict, featurize_m: dict) -> str | None:
    """Whether every file of the source is accounted for, from the source to the tables: source files =
    featurized + rejected + ignored + left out of the subset. None when the images had no sample manifest."""
    if "source_files" not in manifest:
        return None
    featurized, rejected, ignored, left = (featurize_m["featurized"], featurize_m["rejected"], manifest["ignored"],
                                           manifest["not_selected"])
    accounted = featurized + rejected + ignored + left
    terms = (f"{featurized} featurized + {rejected} rejected + {ignored} ignored + {left} left out of the subset "
             "(data.labels, data.train_per_label, data.test_per_label)")
    if accounted == manifest["source_files"]:
        return f"Every file of the source is accounted for: {manifest['source_files']} source files = {terms}."
    return (f"FILES UNACCOUNTED FOR: the source held {manifest['source_files']} files, but {terms} = {accounted}: "
            "the features were made from other images than the source's (re-run dvc repro).")


def input_choice(bench: dict | None, input_size: int, precision: str) -> str:
    """Which input size and precision the model runs at, and why: make bench-sizes' rule and its numbers
    (bench: reports/bench_sizes.json, None when it was never run)."""
    running = f"The model runs at {input_size} px {precision} (model.input_size, model.precision)."
    choice = (bench or {}).get("choice")
    if not choice:
        return f"{running} make bench-sizes, which measures the sizes and precisions on real photos, has not been run."
    picked = (choice["input_size"], choice["precision"])
    measured = (f"make bench-sizes' rule ({choice['rule']}) picked {picked[0]} px {picked[1]}: {choice['speedup']}x "
                f"the featurize rate, hard accuracy {choice['knn_accuracy_hard']:.1%} against "
                f"{choice['reference_knn_accuracy_hard']:.1%}.")
    if picked == (input_size, precision):
        return f"{running} {measured}"
    return f"{running} Not the measured choice: {measured}"
