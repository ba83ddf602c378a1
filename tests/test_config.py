
import pytest
import yaml

from fruits.config import (
    conf_dir,
    PROJECT_ROOT,
    ConfigError,
    apply_overrides,
    compose,
    composed_yaml,
    load_config,
    validate,
)


def group_options():
    for group in sorted(p for p in conf_dir().iterdir() if p.is_dir()):
        for option in sorted(group.glob("*.yaml")):
            yield f"{group.name}={option.stem}"


@pytest.mark.parametrize("override", list(group_options()))
def test_every_config_group_option_composes_and_validates(override):
    cfg = compose([override])
    validate(cfg)
    group, option = override.split("=")
    # The chosen file is what landed in the group (keys, and values that are not interpolations).
    chosen = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text())
    assert set(chosen) == set(cfg[group])
    for key, value in chosen.items():
        if not (isinstance(value, str) and "${" in value) and not isinstance(value, dict):
            assert cfg[group][key] == value, f"{group}.{key}"


def test_committed_params_files_are_the_composition_of_conf():
    committed = (PROJECT_ROOT / "params.yaml").read_text()
    assert committed == composed_yaml(), "params.yaml drifted from conf/: run `make params`"
    emr = (PROJECT_ROOT / "emr" / "params.yaml").read_text()
    assert emr == composed_yaml(["env=emr", "storage=s3"]), "emr/params.yaml drifted from conf/: run `make params`"


def test_region_outside_the_eu_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match=r"storage.region=us-east-1 is outside the EU.*eu-west-3"):
        validate(compose(["storage.region=us-east-1"]))


def test_default_region_is_paris():
    assert compose().storage.region == "eu-west-3"
    assert compose(["storage=s3"]).storage.region == "eu-west-3"


def test_unknown_override_is_refused_and_plus_adds_a_key():
    cfg = compose()
    with pytest.raises(ConfigError, match="unknown setting 'pca.kk'"):
        apply_overrides(cfg, ["pca.kk=3"])
    assert apply_overrides(cfg, ["+pca.note=hello"]).pca.note == "hello"
    assert apply_overrides(cfg, ["pca.k=50"]).pca.k == 50  # typed, not the string "50"


def test_bad_values_are_refused_with_the_setting_named():
    with pytest.raises(ConfigError, match="model.input_size=100"):
        validate(compose(["model.input_size=100"]))
    with pytest.raises(ConfigError, match="pca.variance=1.5"):
        validate(compose(["pca.variance=1.5"]))


def test_load_config_reads_params_file_then_overrides(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(composed_yaml(["pca.k=7"]))
    assert load_config(["featurize.batch_size=4"], params).pca.k == 7
    with pytest.raises(ConfigError, match="not found"):
        load_config([], tmp_path / "missing.yaml")


def test_local_pyspark_is_the_spark_minor_of_the_emr_release():
    import pyspark

    cluster = compose().cluster
    local_minor = pyspark.__version__.split(".")[:2]
    assert str(cluster.spark_version).split(".")[:2] == local_minor
    assert cluster.release_label.startswith("emr-7.")  # EMR 7.x: Spark 3.5, Python 3.11
    lock = (PROJECT_ROOT / "requirements" / "lock.txt").read_text()
    assert f"pyspark=={pyspark.__version__}" in lock


def test_random_weights_are_refused_for_full_data_and_emr():
    from fruits.config import offline_weights_allowed

    assert offline_weights_allowed(compose())
    assert not offline_weights_allowed(compose(["data=fruits360"]))
    assert not offline_weights_allowed(compose(["env=emr", "storage=s3"]))


def test_a_group_choice_on_the_command_line_composes_conf():
    cfg = load_config(["storage=s3", "pca.k=3"])
    assert cfg.storage.kind == "s3" and cfg.storage.bucket and cfg.pca.k == 3
    with pytest.raises(ConfigError, match="outside the EU"):
        load_config(["storage=s3", "storage.region=us-west-2"])
