"""The stage registry: for each stage, the config keys it reads (params) and the config keys naming the
files it reads and writes. Values come from the config; names of files live only there.

From it come both DVC pipelines (fruits.tooling.dvc_pipelines writes dvc.yaml and emr/dvc.yaml; a
test fails if either drifts), the small files the EMR runner ships to and from a step, and the
parameters the report shows. It names no module above core: a stage's module is `fruits.stages.<name>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from fruits.core.config import leaves
from fruits.core.storage import is_s3

# Outputs that exist only with one setting: {key: (setting, value)}.
ONLY_WITH = {"env.paths.shards": ("data.layout", "parquet")}
# Folders of many files (datasets, Spark tables): on EMR they live in S3; they never travel as small files.
TABLES = ("data.root", "env.paths.images", "env.paths.shards", "env.paths.features", "env.paths.rejects",
          "env.paths.pca_vectors")
EMR_PARAMS = "emr/params.yaml"
SAMPLE_MANIFEST = "MANIFEST.json"  # the sample stage's account of its source, in data.root (ingest reads it)
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
            "data.image_size", "data.seed", "data.extensions", "env.paths.approved"),
    # data.source is always a path (a folder, a .zip or a recipe): DVC watches it however it was set;
    # env.paths.approved holds the app's reviewed contributions (a folder kept in git, empty but for .gitkeep).
    inputs=("data.source", "env.paths.approved"),
    outputs=("data.root",),
    in_emr_pipeline=False,
)
INGEST = Stage(
    "ingest",
    params=("data.root", "data.extensions", "data.layout", "data.shard_mb", "storage", "env.paths.images",
            "env.paths.shards", "env.paths.shard_index", "env.paths.ingest_metrics", "env.paths.ingest_diagnostics"),
    inputs=("data.root",),
    outputs=("env.paths.shards",),
    incremental=("env.paths.shards",),
    small_outputs=("env.paths.ingest_diagnostics",),
    metrics=("env.paths.ingest_metrics",),
    watches_s3=True,  # images put straight into the raw prefix must reach featurize too
)
WEIGHTS = Stage(
    "weights",
    params=("model", "env.name", "env.allow_offline_weights", "data.name", "data.allow_offline_weights",
            "data.extensions", "env.paths.models", "env.paths.weights", "env.paths.onnx", "env.paths.provenance"),
    inputs=("model.calibration_source",),
    # No DVC dependency on the sample's images: new images must not make new weights (every feature would
    # change). The seeded fallback calibrates its batch-norm on photos of their own (model.calibration_source).
    # The provenance is cached with the weights: models/ is git-ignored, so an uncached file would be missing
    # from a fresh clone and from a queued experiment's workspace, and the weights stage would run again.
    outputs=("env.paths.weights", "env.paths.onnx", "env.paths.provenance"),
)
FEATURIZE = Stage(
    "featurize",
    params=("model.input_size", "model.alpha", "model.engine", "model.precision", "featurize", "data.extensions", "data.layout",
            "env.spark", "env.paths.images", "env.paths.shards", "env.paths.shard_index", "env.paths.onnx",
            "env.paths.weights", "env.paths.provenance", "env.paths.features", "env.paths.rejects",
            "env.paths.featurize_metrics", "env.paths.featurize_diagnostics"),
    inputs=("env.paths.ingest_metrics", "env.paths.weights", "env.paths.onnx", "env.paths.provenance"),
    outputs=("env.paths.features", "env.paths.rejects"),
    incremental=("env.paths.features", "env.paths.rejects"),
    small_outputs=("env.paths.featurize_diagnostics",),
    metrics=("env.paths.featurize_metrics",),
    on_cluster=True,
)
PCA = Stage(
    "pca",
    params=("pca", "env.spark", "env.paths.features", "env.paths.pca_vectors", "env.paths.pca_projection",
            "env.paths.pca_metrics", "env.paths.pca_diagnostics", "env.paths.pca_variance"),
    inputs=("env.paths.features",),
    outputs=("env.paths.pca_vectors", "env.paths.pca_projection"),
    small_outputs=("env.paths.pca_diagnostics",),
    metrics=("env.paths.pca_metrics",),
    plots=("env.paths.pca_variance",),
    on_cluster=True,
    plot_specs={"env.paths.pca_variance": {
        "x": "component", "y": ["explained_variance", "cumulative_explained_variance"],
        "title": "PCA explained variance (scree and cumulative)"}},
)
INDEX = Stage(
    "index",
    params=("identify.neighbours", "identify.curve_components", "identify.accuracy_queries", "identify.abstain_known_rate",
            "identify.abstain_rates", "identify.hard_protocol", "identify.wrong_answers_kept", "env.spark",
            "env.paths.pca_vectors", "env.paths.pca_projection", "env.paths.knn_index", "env.paths.index_metrics",
            "env.paths.index_diagnostics", "env.paths.knn_curve", "env.paths.abstain_curve"),
    inputs=("env.paths.pca_vectors", "env.paths.pca_projection"),  # the projection: checked to be the vectors' own
    outputs=("env.paths.knn_index",),
    small_outputs=("env.paths.index_diagnostics",),
    metrics=("env.paths.index_metrics",),
    plots=("env.paths.knn_curve", "env.paths.abstain_curve"),
    on_cluster=True,
    plot_specs={"env.paths.knn_curve": {
        "x": "components", "y": ["knn_accuracy", "knn_accuracy_hard"],
        "title": "The app's accuracy (Test images; hard protocol) against PCA components"},
        "env.paths.abstain_curve": {
        "x": "abstain_known_rate", "y": ["abstained_known", "abstained_held_back", "wrong_known"],
        "title": "Not sure: known photos and held-back labels (leave-one-label-out), by identify.abstain_known_rate"}},
)
REPORT_INPUTS = ("env.paths.features", "env.paths.rejects", "env.paths.pca_vectors", "env.paths.provenance",
                 "env.paths.ingest_diagnostics", "env.paths.featurize_diagnostics", "env.paths.pca_diagnostics",
                 "env.paths.pca_variance", "env.paths.index_diagnostics", "env.paths.knn_curve", "env.paths.abstain_curve",
                 "report.scale_fits", "report.size_choice")
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
    flat: dict[str, object] = {}
    for key in merged_params(stages or STAGES.values()):
        node = value(cfg, key)
        tree = OmegaConf.to_container(node) if OmegaConf.is_config(node) else node
        for parts, leaf in leaves(tree, (key,)):
            flat[".".join(parts)] = leaf
    return flat


def enabled(cfg: DictConfig, key: str) -> bool:
    setting, wanted = ONLY_WITH.get(key, (None, None))
    return setting is None or value(cfg, setting) == wanted


def producers(stages) -> dict[str, Stage]:
    return {key: stage for stage in stages for key in stage.written()}
