"""The DVC pipeline: wiring (fast) and a full run from a fresh clone (slow)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from contextlib import contextmanager

import pytest
import yaml
from omegaconf import OmegaConf

from fruits.core import registry
from fruits.tooling import dvc_pipelines
from fruits.core.config import PROJECT_ROOT, compose

from conftest import make_cfg


def dvc_stages(pipeline: str = "dvc.yaml"):
    return yaml.safe_load((PROJECT_ROOT / pipeline).read_text())["stages"]


@pytest.mark.parametrize("emr", [False, True], ids=["dvc.yaml", "emr/dvc.yaml"])
def test_both_pipelines_are_generated_from_the_registry(emr):
    """The EMR pipeline cannot drift from the local one: both are written by `make params`."""
    path = registry.EMR_PIPELINE if emr else "dvc.yaml"
    cfg = compose(["env=emr", "storage=s3"] if emr else [])
    assert (PROJECT_ROOT / path).read_text() == dvc_pipelines.render(cfg, emr), f"{path} drifted: run `make params`"


def test_the_sample_stage_watches_data_source_whatever_it_named_when_dvc_yaml_was_generated(tmp_path):
    """The route that once failed: conf/ named the recipe at `make params` time, then `-S data.source=<folder>`
    (or a queued experiment, or params.yaml by hand) named a folder. dvc.yaml is the same either way and
    depends on ${data.source}, so DVC hashes whatever folder, .zip or recipe it names at run time."""
    folder = tmp_path / "fruits-360"
    folder.mkdir()
    by_recipe = dvc_pipelines.render(compose(), emr=False)
    assert by_recipe == dvc_pipelines.render(compose([f"data.source={folder}"]), emr=False)
    assert "${data.source}" in yaml.safe_load(by_recipe)["stages"]["sample"]["deps"]
    assert not any("data.root" in dep for dep in yaml.safe_load(by_recipe)["stages"]["weights"]["deps"])


@pytest.mark.parametrize("path", ["dvc.yaml", registry.EMR_PIPELINE])
def test_each_stage_depends_on_every_package_module_it_imports(path):
    """deps cover the import closure (import-linter's own graph of the package, function-level imports included)."""
    import grimp

    graph = grimp.build_graph("fruits")
    for name, entry in dvc_stages(path).items():
        entry_module = re.fullmatch(r"python -m ([\w.]+).*", entry["cmd"]).group(1)
        modules = {registry.stage(name).module, entry_module}
        needed = set(modules).union(*(graph.find_upstream_modules(m) for m in modules))
        files = {dvc_pipelines.module_file(m).relative_to(PROJECT_ROOT).as_posix() for m in needed}
        missing = {f for f in files if f not in entry["deps"] and dvc_pipelines.module_file_has_code(f)}
        assert not missing, f"{path}: stage {name} imports {sorted(missing)} without depending on them"


@pytest.mark.parametrize("path", ["dvc.yaml", registry.EMR_PIPELINE])
def test_every_listed_param_and_path_exists(path):
    params = yaml.safe_load((PROJECT_ROOT / path).parent.joinpath("params.yaml").read_text())
    for name, entry in dvc_stages(path).items():
        keys = [k for item in entry["params"] for k in (next(iter(item.values())) if isinstance(item, dict) else [item])]
        for key in keys:
            node = params
            for part in key.split("."):
                assert part in node, f"stage {name} lists param {key}, absent from its params file"
                node = node[part]
        for dep in entry["deps"]:
            if not dep.startswith("$"):
                assert (PROJECT_ROOT / dep).exists(), f"stage {name} depends on missing {dep}"


def test_pca_parameters_reach_only_pca_then_index_and_report():
    readers = {name for name, stage in dvc_stages().items()
               if any(registry.covers(p, "pca.k") for p in stage["params"])}
    assert readers == {"pca", "report"}
    downstream = {name for name, stage in dvc_stages().items() if any("pca" in dep for dep in stage["deps"]
                                                                       if not dep.startswith("src/"))}
    assert downstream == {"index", "report"}  # `dvc exp run -S pca.k=...` re-measures the app's accuracy


@contextmanager
def recorded_reads():
    """Every config key read through attribute or item access (DictConfig), as dotted full keys."""
    from omegaconf import DictConfig

    original = DictConfig._get_impl
    keys: set[str] = set()

    def recording(self, key, default_value, validate_key=True):
        found = original(self, key, default_value, validate_key)
        if not isinstance(found, DictConfig):
            keys.add(self._get_full_key(key))
        return found

    DictConfig._get_impl = recording
    try:
        yield keys
    finally:
        DictConfig._get_impl = original


@pytest.mark.slow
def test_a_real_run_reads_only_listed_params_and_writes_exactly_its_registered_outputs(spark, tmp_path):
    """The whole tiny pipeline, stage by stage, in registry order: each stage's reads are covered by
    its params; what it writes is what the registry says (nothing else appears under the root)."""
    from fruits.stages import featurize, index, ingest, pca, report, sample, weights

    cfg = make_cfg(tmp_path)
    runs = {"sample": sample.run, "ingest": ingest.run, "weights": weights.run,
            "featurize": lambda c: featurize.run(c, spark), "pca": lambda c: pca.run(c, spark),
            "index": lambda c: index.run(c, spark), "report": lambda c: report.run(c, spark)}
    assert list(runs) == list(registry.STAGES)
    before: set[Path] = set()
    for name, run_stage in runs.items():
        stage = registry.stage(name)
        with recorded_reads() as keys:
            run_stage(cfg)
        unlisted = {key for key in keys if not any(registry.covers(p, key) for p in stage.params)}
        assert not unlisted, f"stage {name} reads {sorted(unlisted)} without listing them in its params"
        assert keys, name
        after = {p for p in tmp_path.rglob("*") if p.is_file()}
        registered = [Path(OmegaConf.select(cfg, key)) for key in stage.written() if registry.enabled(cfg, key)]
        assert all(path.exists() for path in registered), name
        stray = {p for p in after - before if not any(p == r or r in p.parents for r in registered)
                 and "downloads" not in p.parts}
        assert not stray, f"stage {name} wrote {sorted(map(str, stray))}, not in its registered outputs"
        before = after


def run(cmd: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def stop_queue_workers(clone: Path) -> None:
    """SIGTERM the clone's DVC queue workers still up (their pid files, checked against the command line
    so that a reused pid is left alone)."""
    for pid_file in (clone / ".dvc/tmp/exps/celery").glob("*.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass


def run_queue(clone: Path, env: dict, jobs: int) -> None:
    """`dvc exp run --run-all --jobs N`, and every queued experiment succeeded. DVC's celery workers
    sometimes stay up after their last task succeeded (treeverse/dvc#10398, seen here with --jobs 2: the
    worker's monitor fired while its task ran): a worker still up 60 s after every task ended is
    stopped, which lets --run-all return. The output goes to a file, not a pipe: a worker that outlives
    --run-all holds what it inherited open, and reading a pipe to its end would wait for that worker.
    What this tests is the experiments, not DVC's workers."""
    log = clone.parent / "queue.log"
    with log.open("w") as output:
        process = subprocess.Popen(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=clone, env=env,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        try:  # the usual case: it ends by itself, and nothing polls DVC beside the experiments
            process.wait(timeout=240)
        except subprocess.TimeoutExpired:
            pass
        deadline, ended = time.monotonic() + 660, None
        while process.poll() is None:
            assert time.monotonic() < deadline, f"dvc exp run --run-all did not end within 900 s:\n{log.read_text()[-3000:]}"
            time.sleep(10)
            if process.poll() is None and not re.search(r"\b(Queued|Running)\b", run(["dvc", "queue", "status"], clone, env)):
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 60:
                    stop_queue_workers(clone)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stop_queue_workers(clone)  # none outlives the test
    status = run(["dvc", "queue", "status"], clone, env)
    assert "Failed" not in status and "Success" in status, f"{log.read_text()[-3000:]}\n{status}"


def shrink(clone: Path, env: dict) -> None:
    """Make the clone's own conf/ tiny (3 labels, 96 px, offline weights) and commit it."""
    sample_yaml = clone / "conf/data/sample.yaml"
    text = sample_yaml.read_text()
    text = re.sub(r"labels: \[.*\]", "labels: [Apple Red, Banana, Kiwi]", text)
    text = re.sub(r"train_per_label: \d+", "train_per_label: 8", text)
    text = re.sub(r"test_per_label: \d+", "test_per_label: 3", text)
    sample_yaml.write_text(text)
    model_yaml = clone / "conf/model/mobilenetv2.yaml"
    text = model_yaml.read_text().replace("weights: imagenet", "weights: random")
    text = re.sub(r"input_size: \d+", "input_size: 96", text)
    model_yaml.write_text(re.sub(r"calibration_images: \d+", "calibration_images: 16", text))
    params = run([sys.executable, "-m", "fruits.core.config"], clone, env)
    (clone / "params.yaml").write_text(params)
    run(["git", "commit", "-qam", "tiny pipeline"], clone, env)


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of a nested mapping's leaves, as dvc exp show names its columns."""
    keys: set[str] = set()
    for key, value in tree.items():
        keys |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return keys


def exp_show_columns(clone: Path, env: dict) -> list[str]:
    """The param, metric and dep columns of `dvc exp show --only-changed --csv` (a file prefix, which
    DVC adds to a name that two files share, dropped)."""
    import csv

    text = subprocess.run(["dvc", "exp", "show", "--only-changed", "--csv"], cwd=clone, env=env,
                          capture_output=True, text=True, check=True).stdout
    header = next(csv.reader(text.splitlines()))
    fixed = {"Experiment", "rev", "typ", "Created", "parent", "State", "Executor"}
    return [column.rsplit(":", 1)[-1] for column in header if column not in fixed]


def featurize_run(clone: Path) -> tuple[int, int, int]:
    """(rows in the features, images reused, images through the model) of the last featurize run."""
    metrics = json.loads((clone / "metrics/featurize.json").read_text())
    return metrics["featurized"], metrics["run"]["reused"], metrics["run"]["computed"]


def source_folder_grows(clone: Path, env: dict, source: Path) -> None:
    """A Fruits-360 folder named each way: with `dvc exp run -S` (the route DVC once missed), its images go
    through, and images added there later are seen by DVC and featurized alone; with params.yaml naming
    it, a replaced image is recomputed alone by `dvc repro`; named in conf/ and run as a queued
    experiment, images added and deleted there are seen, and only the new ones computed. New images
    never make new weights."""
    from fruits.stages.sample import draw_fruit, generate

    generate(source, ["Apple Red", "Banana", "Kiwi"], {"Training": 5, "Test": 2}, 100, 7)
    named = ["dvc", "exp", "run", "-S", f"data.source={source}", "-S", "data.labels=null",
             "-S", "data.train_per_label=null", "-S", "data.test_per_label=null"]
    first = run(named, clone, env)
    assert "Running stage 'sample'" in first and "Running stage 'weights'" not in first
    assert featurize_run(clone)[0] == 21

    for number in range(5):  # added to the folder: the same command sees them
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
    assert "Running stage 'sample'" in run(["dvc", "repro"], clone, env)
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
    assert "Running stage" not in run(["dvc", "repro"], clone, env)  # the same values, the touched file
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "conf/ names the source folder"], clone, env)
    for number in range(3):
        draw_fruit("Banana", 300 + number).save(source / "Training" / "Banana" / f"queued_{number}.jpg")
    sorted((source / "Test" / "Kiwi").iterdir())[0].unlink()
    run(["dvc", "exp", "run", "--queue", "-n", "queued-growth"], clone, env)
    run_queue(clone, env, jobs=1)
    run([sys.executable, "-m", "fruits.tooling.experiments", "queued-growth"], clone, env)
    assert featurize_run(clone) == (28, 25, 3)


@pytest.mark.slow
def test_fresh_clone_repro_noop_experiments_and_sweep(tmp_path):
    clone = tmp_path / "clone"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PYSPARK_PYTHON": sys.executable}
    run(["git", "clone", "-q", str(PROJECT_ROOT), str(clone)], tmp_path, env)
    shrink(clone, env)

    first = run(["dvc", "repro"], clone, env)
    for stage in dvc_stages():
        assert f"Running stage '{stage}'" in first
    report = (clone / "reports/report.md").read_text()
    assert "| Apple Red | 8 | 3 |" in report and "NOT PRETRAINED" in report
    featurized = json.loads((clone / "metrics/featurize.json").read_text())
    assert featurized["images"] == featurized["featurized"] == 33
    assert (clone / "models/pca_projection.npz").stat().st_size > 0  # the engine-free PCA

    # The workspace becomes the baseline commit, so that experiments are compared with it alone.
    run(["git", "add", "-A"], clone, env)
    run(["git", "commit", "-qm", "first repro"], clone, env)

    # Two experiments that differ only in pca.k, queued and run at once: each re-runs pca, index, report.
    run(["dvc", "exp", "run", "-S", "pca.k=3,4", "--queue"], clone, env)
    run_queue(clone, env, jobs=2)
    changed = exp_show_columns(clone, env)
    params = flat_keys(yaml.safe_load((clone / "params.yaml").read_text()))
    assert [column for column in changed if column in params] == ["pca.k"], changed
    compared = flat_keys(json.loads((clone / "metrics/pca.json").read_text())) | flat_keys(
        json.loads((clone / "metrics/index.json").read_text()))
    composed = OmegaConf.load(clone / "params.yaml")
    written = {os.path.normpath(str(OmegaConf.select(composed, key)))
               for name in ("pca", "index") for key in registry.stage(name).written()}
    stray = [column for column in changed if column not in params | compared | written]  # outputs: as deps
    assert not stray, f"dvc exp show --only-changed names what does not differ between k=3 and k=4: {stray}"

    shown = json.loads(subprocess.run(["dvc", "exp", "show", "--json"], cwd=clone, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    ks, accuracies = set(), {}
    for commit in shown:
        for exp in commit.get("experiments") or []:
            for revision in exp.get("revs", []):
                metrics = (revision.get("data") or {}).get("metrics", {})
                found = {key: value for source in metrics.values() for key, value in source.get("data", {}).items()}
                if "k" in found:
                    ks.add(found["k"])
                    accuracies[found["k"]] = found.get("knn_accuracy")  # what each experiment keeps for the app
    assert {3, 4} <= ks, ks
    assert all(isinstance(accuracies[k], float) for k in (3, 4)), accuracies

    source_folder_grows(clone, env, tmp_path / "fruits-360")
    assert "Data and pipelines are up to date" in run(["dvc", "repro"], clone, env)

    metrics = run(["dvc", "metrics", "show", "--json"], clone, env)
    assert "explained_variance_at_k" in metrics
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    assert (tmp_path / "plots" / "index.html").exists()
