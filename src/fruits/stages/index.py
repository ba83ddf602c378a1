"""index: the app's nearest-neighbour index, and the metric that matters for the app.

From the pca stage's vectors: the Training rows (PCA vector, label, image path) become the index file
the app searches (`env.paths.knn_index`). Then the accuracy the app would have: every Test row is
answered as the app answers a photo (its identify.neighbours nearest Training vectors vote, weighted
by distance), in Spark with the index broadcast (the Test rows are never collected), for the PCA's k
and for fewer components (the first j of the same projection), so that `dvc exp show` compares
experiments by what they keep for the app, not only by explained variance.

Three more measures, each from the same answers:
- a harder protocol (identify.hard_protocol): Fruits-360 photos are frames of a film of each fruit turning,
  so a Test photo is often a near copy of a Training one. The index then holds only the Training photos
  of a narrow arc of each label's first film, and answers the photos of its other films (the fruit turning
  on another axis): knn_accuracy_hard, the figure that is not saturated;
- per-label accuracy, the confusion matrix, and the wrong answers with their nearest Training images;
- "not sure", leave-one-label-out: a Test photo's distance to its nearest Training image of another label
  is its nearest distance were its label held back from the index. The distance beyond which the app is
  not sure is the quantile of the known photos' nearest distances that leaves identify.abstain_known_rate
  of them unanswered, taken on half the Test photos (by path hash); the other half measures it, for that
  rate and every rate of identify.abstain_rates (the curve, a DVC plot).

Each answer is an exact search over every Training vector, so answering every Test row would grow
with Test x Training rows. Above identify.accuracy_queries Test rows, a fixed sample of about that many
is answered: the rows whose path hash falls below a threshold, the same rows on every run over the
same data (experiments compare the same images). The cost then grows with the Training rows only.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import PurePosixPath

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from fruits.core import tables
from fruits.core.config import stage_config
from fruits.core.images import CONTRIBUTED_PREFIX, TEST, TRAINING
from fruits.core.measures import (
    abstain_thresholds,
    abstention,
    accuracy_table,
    confusion,
    halves,
    hard_split,
    held_back_by_label,
    per_label_accuracy,
    percent,
    rounded,
    sample,
    sample_threshold,
    share_with_interval,
    wrong_answers,
    wrong_total,
)
from fruits.core.neighbours import ExactIndex, NeighbourIndex, nearest_outside, vote
from fruits.core.projection import checked_projection_sha256
from fruits.core.spark import get_session
from fruits.core.storage import Storage, atomic_output, write_record
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

# What compares experiments (the DVC metrics file); the curve is a DVC plot, timings are diagnostics.
COMPARED = ("training_vectors", "contributed_vectors", "components", "test_rows", "test_rows_answered", "knn_accuracy",
            "knn_accuracy_standard_error", "knn_accuracy_interval_95", "knn_accuracy_hard", "knn_accuracy_hard_interval_95",
            "hard_queries", "abstained_known", "abstained_held_back")
NEIGHBOURS_SHOWN = 3  # nearest Training images kept beside each wrong answer (the report's thumbnails)


def extract(spark, cfg: DictConfig):
    """The PCA vectors: path, label, split, pca."""
    return tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg))


def build_index(training, projection_sha256: str = "") -> NeighbourIndex:
    """These Training rows, collected (k values each: the small part of the table), in path order; the
    distance beyond which the app is not sure is set once the Test photos have measured it."""
    rows = training.select("path", "label", "pca").orderBy("path").collect()
    if not rows:
        raise ValueError("the PCA vectors hold no Training row: nothing to identify against")
    return NeighbourIndex(np.array([r["pca"] for r in rows], np.float32), np.array([r["label"] for r in rows]),
                          np.array([r["path"] for r in rows]), projection_sha256)


def components_curve(k: int, wanted) -> list[int]:
    """The component counts of the accuracy curve: the configured ones up to k, and k itself."""
    return sorted({j for j in wanted if j < k} | {k})


def answers(index: NeighbourIndex, search: ExactIndex, queries: np.ndarray, neighbours: int) -> list[str]:
    """The app's first answer for each query, searched with `search` (the index on its first j components)."""
    found = search.search(queries[:, : search.vectors.shape[1]], neighbours)
    return [vote(index.labels, index.paths, d, i).labels[0] for d, i in zip(found.distances, found.indices, strict=True)]


def contributed(paths) -> int:
    """How many of the index's images are app users' approved photos (their file name says so)."""
    return sum(PurePosixPath(str(path)).name.startswith(CONTRIBUTED_PREFIX) for path in paths)


def transform(test, broadcast_index, neighbours: int, curve: list[int]):
    """Test rows -> path, label, the app's answer at the PCA's k, for each component count j of the curve
    whether the answer is right; the distance to the nearest Training image (nearest) and to the nearest of
    another label (as if the photo's label were not in the index: nearest_other_label), both at k; for a
    wrong answer, the paths of its nearest Training images."""
    from pyspark.sql.functions import pandas_udf

    k = curve[-1]  # the PCA's k: the curve ends with it
    schema = (", ".join(f"right_{j} boolean" for j in curve)
              + ", answer string, nearest double, nearest_other_label double, neighbour_paths array<string>")

    @pandas_udf(f"struct<{schema}>")
    def right_answers(batches: Iterator[tuple[pd.Series, pd.Series]]) -> Iterator[pd.DataFrame]:
        index = broadcast_index.value
        searches = {j: ExactIndex(index.vectors[:, :j]) for j in curve}  # once per task, not per batch
        for labels, pcas in batches:
            queries = np.stack(pcas.to_numpy()) if len(pcas) else np.zeros((0, index.vectors.shape[1]))
            labels = labels.reset_index(drop=True)
            # at k: one search gives the answer, the nearest distance and the neighbours shown beside a wrong answer
            found = searches[k].search(queries, max(neighbours, NEIGHBOURS_SHOWN))
            answer = pd.Series([vote(index.labels, index.paths, d[:neighbours], i[:neighbours]).labels[0]
                                for d, i in zip(found.distances, found.indices, strict=True)], dtype=object)
            frame = pd.DataFrame({f"right_{j}": (answer if j == k else pd.Series(
                answers(index, searches[j], queries, neighbours), dtype=object)).eq(labels).astype(bool) for j in curve})
            frame["answer"] = answer
            frame["nearest"] = found.distances[:, 0] if len(queries) else []
            frame["nearest_other_label"] = nearest_outside(index.vectors, index.labels, queries, labels.to_numpy())
            frame["neighbour_paths"] = [None if right else index.paths[i[:NEIGHBOURS_SHOWN]].tolist()
                                        for right, i in zip(frame[f"right_{k}"], found.indices, strict=True)]
            yield frame

    return test.select("path", "label", right_answers("label", "pca").alias("right")).select("path", "label", "right.*")


@contextmanager
def answered_by(spark, queries, index: NeighbourIndex, neighbours: int, curve: list[int]):
    """The queries answered by the index (broadcast once), cached while several aggregates read them; the
    broadcast lives as long as the cache (a lost block is recomputed from it)."""
    broadcast_index = spark.sparkContext.broadcast(index)
    right = transform(queries, broadcast_index, min(neighbours, len(index.vectors)), curve).cache()
    try:
        yield right
    finally:
        right.unpersist()
        broadcast_index.unpersist()


def load(index: NeighbourIndex, metrics: dict, cfg: DictConfig) -> None:
    index.save(cfg.env.paths.knn_index)
    write_record(cfg.env.paths.index_metrics, cfg.env.paths.index_diagnostics, metrics, COMPARED)

    def cell(share):
        return "" if share is None else f"{share:.6g}"

    hard = metrics["knn_accuracy_hard_by_components"]
    write_csv(cfg.env.paths.knn_curve, ["components", "knn_accuracy", "knn_accuracy_hard"],
              [[j, cell(share), cell(hard.get(j))] for j, share in metrics["knn_accuracy_by_components"].items()])
    write_csv(cfg.env.paths.abstain_curve, ["abstain_known_rate", "abstained_known", "abstained_held_back", "wrong_known"],
              [[p["abstain_known_rate"], cell(p["abstained_known"]), cell(p["abstained_held_back"]), cell(p["wrong_known"])]
               for p in metrics["abstain_curve"]])


def write_csv(path: str, header: list[str], rows: list[list]) -> None:
    with atomic_output(path) as partial, open(partial, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        writer.writerows(rows)


def run(cfg: DictConfig, spark=None) -> dict:
    tables.require("env.paths.pca_vectors", cfg, "pca")
    # The app projects photos with it: the same run as the vectors.
    projection_sha256 = checked_projection_sha256(cfg.env.paths.pca_vectors, cfg.env.paths.pca_projection,
                                                  Storage.of(cfg))
    spark = spark or get_session(cfg)
    started, settings = time.perf_counter(), cfg.identify
    vectors = extract(spark, cfg)
    index = build_index(vectors.where(vectors.split == TRAINING), projection_sha256)
    k = index.vectors.shape[1]
    curve = components_curve(k, settings.curve_components)
    test_run = answers_on_test_photos(spark, vectors.where(vectors.split == TEST), index, settings, curve)
    index = replace(index, abstain_distance=test_run["abstain_distance"])
    hard_run = hard_protocol(spark, vectors, settings, curve, index.abstain_distance)
    metrics = {
        "training_vectors": len(index.vectors),
        "contributed_vectors": contributed(index.paths),  # the app users' approved photos among them
        "components": k,
        "labels": len(set(index.labels.tolist())),
        "neighbours": min(settings.neighbours, len(index.vectors)),
        **accuracy_record(test_run, k, ""),
        "test_rows": test_run["rows"],
        "test_rows_answered": test_run["answered"],  # all of them, or the fixed sample (identify.accuracy_queries)
        # the hard protocol: few Training frames of one film's arc in the index, the fruit's other films asked
        "hard_protocol": f"index: the Training frames of each label's first film in the first "
                         f"{settings.hard_protocol.training_arc:.0%} of its turn; queries: every frame of its other films",
        "hard_training_vectors": hard_run["index_rows"],
        "hard_queries": hard_run["answered"],
        **accuracy_record(hard_run, k, "_hard"),
        # the app's abstain distance on the hard protocol's queries: a fruit seen from a side the index lacks
        "abstained_known_hard": hard_run["abstention"].get("abstained_known"),
        "abstained_held_back_hard": hard_run["abstention"].get("abstained_held_back"),
        **abstain_record(test_run, settings.abstain_known_rate),
        "seconds": round(time.perf_counter() - started, 3),
    }
    load(index, metrics, cfg)
    if test_run["answered"]:
        log.info("index: %d Training vectors (k=%d); the app's answer is right for %s of %d Test images (of %d; %d "
                 "neighbours vote), %s of %d photos in the hard protocol; not sure of %s of known photos and of %s of "
                 "held-back ones", len(index.vectors), k, percent(metrics["knn_accuracy"]), test_run["answered"],
                 test_run["rows"], metrics["neighbours"], percent(metrics["knn_accuracy_hard"]), hard_run["answered"],
                 percent(metrics["abstained_known"]), percent(metrics["abstained_held_back"]))
    else:
        log.warning("index: no Test row answered (%d Test rows): the accuracy is not measured", test_run["rows"])
    return metrics


def answers_on_test_photos(spark, test, index: NeighbourIndex, settings: DictConfig, curve: list[int]) -> dict:
    """The Test rows (or their fixed sample) answered by the index: accuracy, confusion, wrong answers, and
    the abstain distance calibrated on one half with its curve measured on the other."""
    rows = test.count()
    rates = sorted({*settings.abstain_rates, settings.abstain_known_rate})
    with answered_by(spark, sample(test, sample_threshold(rows, settings.accuracy_queries)), index,
                     settings.neighbours, curve) as right:
        answered, accuracy = accuracy_table(right, curve)
        calibration, evaluation = halves(right)
        thresholds = abstain_thresholds(calibration, rates)
        distance = thresholds[settings.abstain_known_rate]
        return {"rows": rows, "answered": answered, "accuracy": accuracy, "confusion": confusion(right),
                "wrong": wrong_answers(right, settings.wrong_answers_kept), "abstain_distance": distance,
                "abstain_curve": abstention(evaluation, thresholds),
                "held_back_by_label": held_back_by_label(evaluation, distance)}


def accuracy_record(measured: dict, k: int, suffix: str) -> dict:
    """The accuracy metrics of one protocol ("" Test photos, "_hard" the hard one), named with its suffix."""
    share = measured["accuracy"][k]
    spread = share_with_interval(share, measured["answered"])
    return {f"knn_accuracy{suffix}": share,  # what the app answers right, at the PCA's k
            f"knn_accuracy{suffix}_standard_error": spread["standard_error"],
            f"knn_accuracy{suffix}_interval_95": spread["interval_95"],
            f"knn_accuracy{suffix}_by_components": {str(j): value for j, value in measured["accuracy"].items()},
            f"knn_accuracy{suffix}_by_label": per_label_accuracy(measured["confusion"]),
            f"confusion{suffix}": measured["confusion"],  # {label: {answer: photos}}
            f"wrong_answers{suffix}": measured["wrong"],  # the first identify.wrong_answers_kept, with their neighbours
            f"wrong_answers{suffix}_total": wrong_total(measured["confusion"])}


def abstain_record(test_run: dict, rate: float) -> dict:
    """ "Not sure" beyond the abstain distance: identify.abstain_known_rate of the known photos of the
    calibration half are farther; measured on the other half (leave-one-label-out for held back)."""
    chosen = next((p for p in test_run["abstain_curve"] if p["abstain_known_rate"] == rate), {})
    return {"abstain_known_rate": rate, "abstain_distance": rounded(test_run["abstain_distance"]),
            "abstain_evaluation_rows": chosen.get("rows", 0), "abstained_known": chosen.get("abstained_known"),
            "abstained_held_back": chosen.get("abstained_held_back"), "wrong_known": chosen.get("wrong_known"),
            "abstained_held_back_by_label": test_run["held_back_by_label"], "abstain_curve": test_run["abstain_curve"]}


def hard_protocol(spark, vectors, settings: DictConfig, curve: list[int], abstain_at: float) -> dict:
    """The hard protocol's answers: queries answered, {components: share right}, the confusion, its wrong
    answers, and at the app's abstain distance the share of its queries not sure (known) and not sure
    were their label held back. Nothing answered where the images are not Fruits-360 frames of several films."""
    index_rows, queries = hard_split(vectors, settings.hard_protocol.training_arc)
    if not index_rows.take(1) or not queries.take(1):
        return {"answered": 0, "accuracy": dict.fromkeys(curve), "confusion": {}, "wrong": [], "index_rows": 0,
                "abstention": {}}
    index = build_index(index_rows)
    with answered_by(spark, sample(queries, sample_threshold(queries.count(), settings.accuracy_queries)), index,
                     settings.neighbours, curve) as right:
        answered, accuracy = accuracy_table(right, curve)
        return {"answered": answered, "accuracy": accuracy, "confusion": confusion(right), "index_rows": len(index.vectors),
                "wrong": wrong_answers(right, settings.wrong_answers_kept),
                "abstention": abstention(right, {settings.abstain_known_rate: abstain_at})[0]}


def main(argv: list[str] | None = None) -> None:
    run(stage_config("Build the app's nearest-neighbour index and measure its accuracy on Test images.", argv))


if __name__ == "__main__":
    run_command(main)
