"""The status line of long featurize runs: images done, img/s, time left, from Spark's status tracker."""

import time

from fruits.core.spark import Progress, progress_line


def test_progress_line_says_done_rate_and_time_left():
    assert progress_line("featurize", 4096, 20_000, 32.0) == \
        "featurize: ~4,096 of 20,000 images (20%), 128 img/s, about 2 min 4 s left"
    assert progress_line("featurize", 0, 100, 5.0).endswith("rate not known yet")


def test_progress_reports_while_the_stage_runs_and_stays_silent_for_a_short_one(spark):
    def slow(_):
        time.sleep(0.4)

    with Progress(spark, "featurize", images=400, tasks=4, every=0.2) as long_run:
        spark.sparkContext.parallelize(range(4), 4).foreach(slow)
    assert long_run.lines and all(line.startswith("featurize: ~") and "of 400 images" in line for line in long_run.lines)
    done = [float(line.split("~")[1].split(" of")[0].replace(",", "")) for line in long_run.lines]
    assert done == sorted(done) and done[-1] <= 400

    with Progress(spark, "featurize", images=400, tasks=4, every=30) as short_run:
        spark.sparkContext.parallelize(range(4), 4).foreach(lambda _: None)
    assert short_run.lines == []
