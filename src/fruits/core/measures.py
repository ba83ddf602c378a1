"""The measures of an index's answers, over Spark DataFrames (the index stage's rows): the fixed sample
of Test rows by path hash, the share right with its Wilson interval, the confusion matrix and the wrong
answers, the hard protocol's split along each fruit's turn, and "not sure" calibrated on one half of the
photos and measured on the other, leave-one-label-out. Aggregates run in Spark; only small results
(labels x answers, a few dozen rows) reach the driver."""

from __future__ import annotations

import hashlib
import math

from fruits.core.images import FRAME_PATTERN, TRAINING

HASH_DIGITS = 8  # a Test row's place in the accuracy sample: the first 8 hex digits of sha256(path)
HASH_RANGE = 16**HASH_DIGITS


def path_hash(path: str) -> int:
    """The number the accuracy sample compares with its threshold (what `sample` computes in Spark)."""
    return int(hashlib.sha256(path.encode()).hexdigest()[:HASH_DIGITS], 16)


def sample_threshold(test_rows: int, queries: int) -> int:
    """Test rows whose path hash is below this are answered: about `queries` of test_rows, or all of
    them (HASH_RANGE) when there are no more than that."""
    return HASH_RANGE if test_rows <= queries else math.ceil(HASH_RANGE * queries / test_rows)


def hashed_path(path):
    """path_hash as a Spark column."""
    from pyspark.sql import functions as F

    return F.conv(F.substring(F.sha2(path, 256), 1, HASH_DIGITS), 16, 10).cast("long")


def sample(test, threshold: int):
    """The Test rows whose path hash is below threshold (sha256 in Spark as in path_hash)."""
    from pyspark.sql import functions as F

    if threshold >= HASH_RANGE:
        return test
    return test.where(hashed_path(F.col("path")) < threshold)


def on_the_turn(vectors):
    """The rows that are Fruits-360 frames (images.FRAME_PATTERN), with their film ("" for the first, "r",
    "r2" for the others) and their place in the film's turn, from 0 to 1 (frame / the label's frames in
    that film); the other rows (app users' photos, files named by hand) are left out."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    name = F.regexp_extract(F.col("path"), r"([^/]+)$", 1)
    framed = vectors.select("*", F.regexp_extract(name, FRAME_PATTERN, 1).alias("film"),
                            F.regexp_extract(name, FRAME_PATTERN, 2).alias("frame")).where(F.col("frame") != "")
    frames = F.max(F.col("frame").cast("int")).over(Window.partitionBy("label", "film")) + 1
    return framed.withColumn("turn", F.col("frame").cast("int") / frames)


def hard_split(vectors, arc: float):
    """(index rows, query rows) of the hard protocol: the Training frames of each label's first film within
    the first `arc` of its turn; every frame (either split) of the label's other films."""
    from pyspark.sql import functions as F

    framed = on_the_turn(vectors)
    training = framed.where((F.col("split") == TRAINING) & (F.col("film") == "") & (F.col("turn") < arc))
    return training, framed.where(F.col("film") != "")


def wilson_interval(share: float, rows: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a share measured on rows rows: unlike share
    +- z x standard error it stays within [0, 1] and does not shrink to a point at 0 % or 100 %
    (30 right of 30: 0.886 to 1)."""
    spread = z * z / rows
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / rows + spread / (4 * rows)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def rounded(value):
    return round(value, 6) if value is not None else None


def percent(share: float | None) -> str:
    """A share as the report and the logs print it ("94.3%"; "-": not measured)."""
    return "-" if share is None else f"{share:.1%}"


def share_with_interval(share: float | None, rows: int) -> dict:
    """A measured share's binomial standard error and its 95 % Wilson interval (the error reads 0 at
    100 %; the interval still says how sure 30 of 30 is)."""
    if not rows or share is None:
        return {"standard_error": None, "interval_95": None}
    return {"standard_error": round(math.sqrt(share * (1 - share) / rows), 6),
            "interval_95": [round(end, 6) for end in wilson_interval(share, rows)]}


def confusion(right) -> dict[str, dict[str, int]]:
    """{true label: {answer: Test photos}}: labels x answers counts, aggregated in Spark."""
    table: dict[str, dict[str, int]] = {}
    for row in right.groupBy("label", "answer").count().collect():
        table.setdefault(row["label"], {})[row["answer"]] = row["count"]
    return {label: dict(sorted(answers.items())) for label, answers in sorted(table.items())}


def wrong_total(table: dict[str, dict[str, int]]) -> int:
    return sum(n for label, answers in table.items() for answer, n in answers.items() if answer != label)


def per_label_accuracy(table: dict[str, dict[str, int]]) -> dict[str, float]:
    return {label: round(answers.get(label, 0) / sum(answers.values()), 6) for label, answers in table.items()}


def wrong_answers(right, kept: int) -> list[dict]:
    """The first `kept` wrong answers (path order): the photo, its label, the answer, its nearest Training images."""
    rows = right.where(right.answer != right.label).orderBy("path").limit(kept).collect()
    return [{"path": r["path"], "label": r["label"], "answer": r["answer"], "neighbours": list(r["neighbour_paths"])}
            for r in rows]


def halves(right):
    """(calibration, evaluation): the answered rows split in two by the parity of their path hash."""
    from pyspark.sql import functions as F

    parity = hashed_path(F.col("path")) % 2
    return right.where(parity == 0), right.where(parity == 1)


def abstain_thresholds(calibration, rates: list[float]) -> dict[float, float]:
    """{rate: the distance that leaves that share of the calibration half's known photos farther from
    every Training image}: exact quantiles of their nearest distances (inf: no calibration row)."""
    found = calibration.approxQuantile("nearest", [1 - rate for rate in rates], 0.0)
    return {rate: (found[i] if found else float("inf")) for i, rate in enumerate(rates)}


def abstention(evaluation, thresholds: dict[float, float]) -> list[dict]:
    """For each rate's distance, measured on the evaluation half: the share of known photos not sure, of
    known photos answered wrongly, and of photos not sure when their label is held back (the rest of those
    are answered wrongly: the index lacks their label)."""
    from pyspark.sql import functions as F

    k_right = [c for c in evaluation.columns if c.startswith("right_")][-1]
    aggregates = [F.count(F.lit(1)).alias("rows")]
    for i, distance in enumerate(thresholds.values()):
        sure = F.col("nearest") <= F.lit(distance)
        aggregates += [F.avg((~sure).cast("double")).alias(f"known_{i}"),
                       F.avg((sure & ~F.col(k_right)).cast("double")).alias(f"wrong_{i}"),
                       F.avg((F.col("nearest_other_label") > F.lit(distance)).cast("double")).alias(f"held_{i}")]
    row = evaluation.agg(*aggregates).first()
    return [{"abstain_known_rate": rate, "distance": rounded(distance), "rows": row["rows"],
             "abstained_known": rounded(row[f"known_{i}"]), "wrong_known": rounded(row[f"wrong_{i}"]),
             "abstained_held_back": rounded(row[f"held_{i}"])} for i, (rate, distance) in enumerate(thresholds.items())]


def held_back_by_label(evaluation, distance: float) -> dict[str, float]:
    """Each label's share of evaluation photos not sure when that label is held back from the index."""
    from pyspark.sql import functions as F

    rows = evaluation.groupBy("label").agg(F.avg((F.col("nearest_other_label") > F.lit(distance)).cast("double"))
                                           .alias("held")).orderBy("label").collect()
    return {r["label"]: rounded(r["held"]) for r in rows}


def accuracy_table(right, curve: list[int]) -> tuple[int, dict[int, float]]:
    """(rows answered, {components: share answered right}), aggregated in Spark."""
    from pyspark.sql import functions as F

    row = right.agg(F.count(F.lit(1)).alias("rows"),
                    *[F.avg(F.col(f"right_{j}").cast("double")).alias(f"right_{j}") for j in curve]).first()
    return row["rows"], {j: rounded(row[f"right_{j}"]) for j in curve}
