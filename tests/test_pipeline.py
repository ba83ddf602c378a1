"""The DVC pipeline: wiring (fast) and a full run from a fresh clone (slow)."""

import json
import os
import re
import subprocess
from pathlib import Path

from contextlib import contextmanager

import pytest
import yaml
from omegaconf import OmegaConf

from fruits.core import registry
from fruits.tooling import dvc_pipelines
from fruits.core.config import PROJECT_ROOT, compose

from helpers.clones import exp_show_columns, flat_keys, fresh_clone, run, run_queue
from helpers.project import make_cfg


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
    weights_deps = yaml.safe_load(by_recipe)["stages"]["weights"]["deps"]
    assert not any("data.root" in dep or "data.source" in dep for dep in weights_deps)
    assert "${model.calibration_source}" in weights_deps  # what offline weights calibrate on: declared


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
def test_touching_the_backbone_invalidates_only_weights_and_what_follows_it(path):
    """config knows no model: the stages before weights (sample, ingest) do not depend on the backbone's
    code, so editing the ONNX export re-runs weights and its descendants only."""
    written_by = registry.producers(registry.STAGES.values())
    after_weights, frontier = {"weights"}, ["weights"]
    while frontier:  # the stages that read, directly or not, what weights writes
        done = frontier.pop()
        for stage in registry.STAGES.values():
            reads = set(stage.inputs) | set(stage.params)
            if stage.name not in after_weights and any(written_by.get(key) is registry.stage(done) for key in reads):
                after_weights.add(stage.name)
                frontier.append(stage.name)
    touched = {name for name, entry in dvc_stages(path).items() if "src/fruits/core/backbone.py" in entry["deps"]}
    assert "weights" in touched and touched <= after_weights, (touched, after_weights)
    assert not touched & {"sample", "ingest"}


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


@pytest.mark.slow
def test_fresh_clone_repro_noop_experiments_and_sweep(tmp_path):
    clone, env = fresh_clone(tmp_path)

    # featurize alone first: DVC runs what it needs (sample, ingest, weights) in a true order, nothing after it
    upstream = run(["dvc", "repro", "featurize"], clone, env)
    assert {"sample", "ingest", "weights", "featurize"} == {s for s in dvc_stages() if f"Running stage '{s}'" in upstream}
    first = run(["dvc", "repro"], clone, env)
    for stage in dvc_stages():
        assert f"Running stage '{stage}'" in first + upstream
    report = (clone / "reports/report.md").read_text()
    assert "| Apple Golden 1 | 8 | 3 |" in report and "NOT PRETRAINED" in report  # real photos, labels as Fruits-360 names them
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

    assert "Data and pipelines are up to date" in run(["dvc", "repro"], clone, env)

    metrics = run(["dvc", "metrics", "show", "--json"], clone, env)
    assert "explained_variance_at_k" in metrics
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], clone, env)
    assert (tmp_path / "plots" / "index.html").exists()
