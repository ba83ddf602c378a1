"""data.source named each way a user can (dvc exp run -S, params.yaml, conf/ + make params, a queued
experiment), from a fresh clone: DVC sees the folder grow, and only new or changed images go through the
model (issue 23's scenario)."""

import os
import re
import sys
import time

import pytest

from helpers.clones import featurize_run, fresh_clone, run, run_queue
from fruits.stages.sample import draw_fruit, generate


# The runs stop at featurize: what follows it is the fresh-clone pipeline test's (tests/test_pipeline.py)
# and would only add minutes here. The weights stage reads nothing of the sample (offline weights
# calibrate on samples/calibration, its declared input), so targets may run it in any order.
UP_TO_FEATURIZE = ["sample", "featurize"]


@pytest.mark.slow
def test_a_source_folder_named_each_way_grows_incrementally_from_a_fresh_clone(tmp_path):
    """A Fruits-360 folder named each way: with `dvc exp run -S` (the route DVC once missed), its images go
    through, and images added there later are seen by DVC and featurized alone; with params.yaml naming
    it, a replaced image is recomputed alone by `dvc repro`; named in conf/ and run as a queued
    experiment, images added and deleted there are seen, and only the new ones computed. New images
    never make new weights."""
    clone, env = fresh_clone(tmp_path)
    source = tmp_path / "fruits-360"
    generate(source, ["Apple Red", "Banana", "Kiwi"], {"Training": 5, "Test": 2}, 100, 7)
    settings = ["-S", f"data.source={source}", "-S", "data.labels=null", "-S", "data.train_per_label=null",
                "-S", "data.test_per_label=null"]
    named = ["dvc", "exp", "run", *UP_TO_FEATURIZE, *settings]
    assert "Running stage 'sample'" in run(named, clone, env)
    assert featurize_run(clone) == (21, 0, 21)

    for number in range(5):  # added to the folder: the same settings see them
        draw_fruit("Kiwi", 100 + number).save(source / "Training" / "Kiwi" / f"added_{number}.jpg")
    grown = run(named, clone, env)
    assert "Running stage 'sample'" in grown and "Running stage 'weights'" not in grown
    assert featurize_run(clone) == (26, 21, 5)  # only the five new images went through the model
    assert "Running stage" not in run(named, clone, env)  # nothing changed: nothing runs

    # params.yaml now names the folder (as if edited by hand): `dvc repro` sees an image replaced there
    # and computes it alone; a file touched with the same bytes is no change (DVC compares contents).
    replaced = source / "Test" / "Banana" / sorted(p.name for p in (source / "Test" / "Banana").iterdir())[0]
    draw_fruit("Banana", 200).save(replaced)
    status = run(["dvc", "status", "sample"], clone, env)
    assert "changed deps" in status and str(source) in status, status
    assert "Running stage 'sample'" in run(["dvc", "repro", *UP_TO_FEATURIZE], clone, env)
    assert featurize_run(clone) == (26, 25, 1)
    os.utime(replaced, (time.time() + 60, time.time() + 60))

    # conf/ names the folder, then `make params` (its commands): committed, since a queued experiment
    # starts from the last commit and composes params.yaml from conf/ again. Three images added and one
    # deleted, then queued: only the 3 new ones go through the model (rows are keyed by the path inside
    # the images folder, and DVC runs a queued experiment in a folder of its own), and `make exp-apply`
    # brings the run back although the EMR pipeline never ran in this clone.
    sample_yaml = clone / "conf/data/sample.yaml"
    text = re.sub(r"(?m)^source: .*$", f"source: {source}", sample_yaml.read_text())
    sample_yaml.write_text(re.sub(r"(?m)^(labels|train_per_label|test_per_label): .*$", r"\1: null", text))
    (clone / "params.yaml").write_text(run([sys.executable, "-m", "fruits.core.config"], clone, env))
    run([sys.executable, "-m", "fruits.tooling.dvc_pipelines"], clone, env)
    assert "Running stage" not in run(["dvc", "repro", *UP_TO_FEATURIZE], clone, env)  # the same values, the touched file
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "conf/ names the source folder"], clone, env)
    for number in range(3):
        draw_fruit("Banana", 300 + number).save(source / "Training" / "Banana" / f"queued_{number}.jpg")
    sorted((source / "Test" / "Kiwi").iterdir())[0].unlink()
    run(["dvc", "exp", "run", *UP_TO_FEATURIZE, "--queue", "-n", "queued-growth"], clone, env)
    run_queue(clone, env, jobs=1)
    run([sys.executable, "-m", "fruits.tooling.experiments", "queued-growth"], clone, env)
    assert featurize_run(clone) == (28, 25, 3)
