"""The stage registry: for each stage, the config keys it reads (params) and the config keys naming the
files it reads and writes. Values come from the config; names of files live only there.

From it come both DVC pipelines (`make params` writes dvc.yaml and emr/dvc.yaml; a test fails if
either drifts), the small files the EMR runner ships to and from a step, and the parameters the
report shows. A stage's code deps are its import closure inside the package, read from the source.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from fruits.core.storage import is_s3

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/fruits
SOURCE_ROOT = PACKAGE_ROOT.parent  # src
RUNNER_MODULE = "fruits.cloud.steps"
# Values of data.source that are not a folder: nothing on disk for DVC to watch.
SOURCE_KEYWORDS = ("generate", "download")
# Outputs that exist only with one setting: {key: (setting, value)}.
ONLY_WITH = {"env.paths.shards": ("data.layout", "parquet")}
# Folders of many files (datasets, Spark tables): on EMR they live in S3; they never travel as small files.
TABLES = ("data.root", "env.paths.images", "env.paths.shards", "env.paths.features", "env.paths.rejects",
          "env.paths.pca_vectors")
EMR_PARAMS = "emr/params.yaml"
EMR_PIPELINE = "emr/dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # config keys (or whole sections) the stage reads
    inputs: tuple[str, ...] = ()  # config keys naming the files or folders it reads
    outputs: tuple[str, ...] = ()  # ... the data it writes (DVC-cached)
    incremental: tuple[str, ...] = ()  # outputs the stage updates from their previous version (persist)
    small_outputs: tuple[str, ...] = ()  # ... small files it writes, kept in git (provenance, reports)
    metrics: tuple[str, ...] = ()
    plots: tuple[str, ...] = ()
    on_cluster: bool = False  # with env=emr it runs as an EMR step (a Spark stage)
    in_emr_pipeline: bool = True  # false: its output is the same local path in both pipelines
    watches_s3: bool = False  # on EMR it re-lists S3 on every run (always_changed): its metrics say if anything did
    plot_specs: dict = field(default_factory=dict)

    @property
    def module(self) -> str:
        return f"fruits.stages.{self.name}"

    def written(self) -> tuple[str, ...]:
        return self.outputs + self.small_outputs + self.metrics + self.plots


SAMPLE = Stage(
    "sample",
    params=("data.source", "data.root", "data.url", "data.labels", "data.train_per_label", "data.test_per_label",
            "data.image_size", "data.seed"),
    inputs=("data.source",),  # a real Fruits-360 folder or .zip: images added there re-run the pipeline
    outputs=("data.root",),
    in_emr_pipeline=False,
)
INGEST = Stage(
    "ingest",
    params=("data.root", "data.extensions", "data.layout", "data.shard_mb", "storage", "env.paths.images",
            "env.paths.shards", "env.paths.shard_index", "env.paths.ingest_metrics"),
    inputs=("data.root",),
    outputs=("env.paths.shards",),
    incremental=("env.paths.shards",),
    metrics=("env.paths.ingest_metrics",),
    watches_s3=True,  # images put straight into the raw prefix must reach featurize too
)
WEIGHTS = Stage(
    "weights",
    params=("model", "env.name", "env.allow_offline_weights", "data.name", "data.allow_offline_weights",
            "data.root", "env.paths.models", "env.paths.weights", "env.paths.onnx", "env.paths.provenance"),
    inputs=("data.root",),  # the random fallback recalibrates on the sample's images
    outputs=("env.paths.weights", "env.paths.onnx"),
    small_outputs=("env.paths.provenance",),
)
FEATURIZE = Stage(
    "featurize",
    params=("model.input_size", "model.alpha", "model.engine", "featurize", "data.extensions", "data.layout",
            "env.spark", "env.paths.images", "env.paths.shards", "env.paths.shard_index", "env.paths.onnx",
            "env.paths.weights", "env.paths.provenance", "env.paths.features", "env.paths.rejects",
            "env.paths.featurize_metrics"),
    inputs=("env.paths.ingest_metrics", "env.paths.weights", "env.paths.onnx", "env.paths.provenance"),
    outputs=("env.paths.features", "env.paths.rejects"),
    incremental=("env.paths.features", "env.paths.rejects"),
    metrics=("env.paths.featurize_metrics",),
    on_cluster=True,
)
PCA = Stage(
    "pca",
    params=("pca", "env.spark", "env.paths.features", "env.paths.pca_vectors", "env.paths.pca_projection",
            "env.paths.pca_metrics", "env.paths.pca_variance"),
    inputs=("env.paths.features",),
    outputs=("env.paths.pca_vectors", "env.paths.pca_projection"),
    metrics=("env.paths.pca_metrics",),
    plots=("env.paths.pca_variance",),
    on_cluster=True,
    plot_specs={"env.paths.pca_variance": {
        "x": "component", "y": ["explained_variance", "cumulative_explained_variance"],
        "title": "PCA explained variance (scree and cumulative)"}},
)
INDEX = Stage(
    "index",
    params=("identify.neighbours", "identify.curve_components", "identify.accuracy_queries", "env.spark",
            "env.paths.pca_vectors", "env.paths.pca_projection", "env.paths.knn_index", "env.paths.index_metrics",
            "env.paths.knn_curve"),
    inputs=("env.paths.pca_vectors", "env.paths.pca_projection"),  # the projection: checked to be the vectors' own
    outputs=("env.paths.knn_index",),
    metrics=("env.paths.index_metrics",),
    plots=("env.paths.knn_curve",),
    on_cluster=True,
    plot_specs={"env.paths.knn_curve": {
        "x": "components", "y": "knn_accuracy", "title": "The app's accuracy on Test images against PCA components"}},
)
REPORT_INPUTS = ("env.paths.features", "env.paths.rejects", "env.paths.pca_vectors", "env.paths.provenance",
                 "env.paths.ingest_metrics", "env.paths.featurize_metrics", "env.paths.pca_metrics",
                 "env.paths.pca_variance", "env.paths.index_metrics", "env.paths.knn_curve", "report.scale_fits")
REPORT_OUTPUTS = ("env.paths.report_html", "env.paths.report_md", "env.paths.variance_plot",
                  "env.paths.scatter_plot")


def covers(listed: str, key: str) -> bool:
    """True when the listed param (a key or a whole section) covers key."""
    return key == listed or key.startswith(listed + ".")


def merged_params(stages) -> tuple[str, ...]:
    """The union of the stages' params, without keys that a listed section already covers."""
    keys = sorted({key for stage in stages for key in stage.params})
    return tuple(key for key in keys if not any(other != key and covers(other, key) for other in keys))


# The report shows the parameters every stage ran with, so it reads them all.
REPORT = Stage(
    "report",
    params=merged_params([SAMPLE, INGEST, WEIGHTS, FEATURIZE, PCA, INDEX, Stage("report", (
        "report", "cluster", "env.name", "data.name", "env.spark", *REPORT_INPUTS, *REPORT_OUTPUTS))]),
    inputs=REPORT_INPUTS,
    small_outputs=REPORT_OUTPUTS,
    on_cluster=True,
)
STAGES = {stage.name: stage for stage in (SAMPLE, INGEST, WEIGHTS, FEATURIZE, PCA, INDEX, REPORT)}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}: one of {', '.join(STAGES)}")
    return STAGES[name]


def value(cfg: DictConfig, key: str):
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def small_files(cfg: DictConfig, keys) -> list[str]:
    """The values of keys naming single local files: what travels to and from an EMR step (tables and
    anything in S3 stay where they are)."""
    return [str(value(cfg, key)) for key in keys if key not in TABLES and not is_s3(str(value(cfg, key)))]


def params_of(cfg: DictConfig, stages=None) -> dict[str, object]:
    """{param: value} of the params the stages list (all stages by default), flattened."""
    from fruits.core.config import leaves

    flat: dict[str, object] = {}
    for key in merged_params(stages or STAGES.values()):
        node = value(cfg, key)
        tree = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        for parts, leaf in leaves(tree, (key,)):
            flat[".".join(parts)] = leaf
    return flat


# --- code deps: the import closure of a module inside the package ----------------------------------


def module_file(module: str) -> Path:
    path = SOURCE_ROOT / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(module: str) -> set[str]:
    """The package modules a module imports anywhere in its source (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(module).read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from fruits.core import backbone` imports a module; `from fruits.core.x import y`, a name.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        found.update(name for name in names if name.startswith("fruits.") and module_file(name).exists())
    return found


def import_closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_modules(current) - seen)
    return seen


def code_deps(modules) -> list[str]:
    """Source files (relative to the project) of the modules and everything they import in the package."""
    closure = set().union(*(import_closure(module) for module in modules))
    files = {module_file(module).relative_to(SOURCE_ROOT.parent).as_posix() for module in closure}
    return sorted(f for f in files if not (f.endswith("__init__.py") and not module_file_has_code(f)))


def module_file_has_code(relative: str) -> bool:
    """False for a package __init__ that holds only its docstring."""
    body = ast.parse((SOURCE_ROOT.parent / relative).read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


# --- the two DVC pipelines --------------------------------------------------------------------------


def enabled(cfg: DictConfig, key: str) -> bool:
    setting, wanted = ONLY_WITH.get(key, (None, None))
    return setting is None or value(cfg, setting) == wanted


def producers(stages) -> dict[str, Stage]:
    return {key: stage for stage in stages for key in stage.written()}


def dvc_stage(stage: Stage, cfg: DictConfig, emr: bool, made_by: dict[str, Stage]) -> dict:
    """One stage of dvc.yaml (emr=False) or emr/dvc.yaml (emr=True)."""
    if emr and stage.on_cluster:
        cmd = f"python -m {RUNNER_MODULE} {stage.name} --params {EMR_PARAMS}"
        modules = [stage.module, RUNNER_MODULE]
        extra = ["bootstrap/run_stage.py"]
    else:
        cmd = f"python -m {stage.module}" + (f" --params {EMR_PARAMS}" if emr else "")
        modules, extra = [stage.module], []
    data_deps = []
    for key in stage.inputs:
        if str(value(cfg, key)) in SOURCE_KEYWORDS:
            continue
        if not is_s3(str(value(cfg, key))):
            data_deps.append(f"${{{key}}}")
        else:  # in S3 (not versioned by DVC): depend on the metrics of the stage that wrote it
            data_deps.extend(f"${{{m}}}" for m in made_by[key].metrics if f"${{{m}}}" not in data_deps)
    entry: dict = {}
    if emr:
        entry["wdir"] = ".."
    entry["cmd"] = cmd
    if emr and stage.watches_s3:
        entry["always_changed"] = True
    entry["deps"] = code_deps(modules) + extra + data_deps
    entry["params"] = [{EMR_PARAMS: list(stage.params)}] if emr else list(stage.params)
    outs = [{f"${{{key}}}": {"persist": True}} if key in stage.incremental else f"${{{key}}}"
            for key in stage.outputs if not is_s3(str(value(cfg, key))) and enabled(cfg, key)]
    outs += [{f"${{{key}}}": {"cache": False}} for key in stage.small_outputs]
    if outs:
        entry["outs"] = outs
    if stage.metrics:
        entry["metrics"] = [{f"${{{key}}}": {"cache": False}} for key in stage.metrics]
    if stage.plots:
        entry["plots"] = [{f"${{{key}}}": {"cache": False}} for key in stage.plots]
    return entry


def dvc_pipeline(cfg: DictConfig, emr: bool) -> dict:
    stages = [s for s in STAGES.values() if s.in_emr_pipeline or not emr]
    made_by = producers(stages)
    pipeline = {"stages": {s.name: dvc_stage(s, cfg, emr, made_by) for s in stages}}
    specs = {f"${{{key}}}": spec for s in stages for key, spec in s.plot_specs.items()}
    if specs:
        pipeline["plots"] = [{path: spec} for path, spec in specs.items()]
    return pipeline


HEADER = """\
# GENERATED by `make params` from the stage registry (src/fruits/core/pipeline.py): do not edit.
# {what}
# Every path is a config key ({params}); every stage lists the params it reads and the package
# modules it imports, so `dvc exp run -S pca.k=50` re-runs pca and report only. A test fails if this
# file differs from what the registry generates.
"""


def render(cfg: DictConfig, emr: bool) -> str:
    what = ("The same stages on AWS EMR: `make cluster && make emr-repro`. Spark stages run as EMR steps;\n"
            "# images, features and PCA vectors stay in S3; DVC tracks the small outputs each step brings back."
            if emr else "The local pipeline: `dvc repro` (or `make demo`).")
    text = yaml.safe_dump(dvc_pipeline(cfg, emr), sort_keys=False, width=120, allow_unicode=True)
    return HEADER.format(what=what, params=EMR_PARAMS if emr else "params.yaml") + text


def main(argv: list[str] | None = None) -> None:
    """Write dvc.yaml and emr/dvc.yaml from the registry (`make params`)."""
    from fruits.core.config import PROJECT_ROOT, compose

    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]) if args else PROJECT_ROOT
    (root / "dvc.yaml").write_text(render(compose(), emr=False))
    (root / EMR_PIPELINE).write_text(render(compose(["env=emr", "storage=s3"]), emr=True))


if __name__ == "__main__":
    main()
