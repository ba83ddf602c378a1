
import pytest
import yaml
from omegaconf import OmegaConf

from fruits.core.config import (
    conf_dir,
    PROJECT_ROOT,
    ConfigError,
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
    # The chosen file is what landed in the group (keys, and values that are not interpolations); the
    # root config may add keys (the output file names, the S3 layout), never drop one.
    chosen = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text())
    chosen.pop("defaults", None)  # Hydra's defaults list (an option built on another), not a key
    assert set(chosen) <= set(cfg[group])
    assert cfg[group].name == option  # how a composed params file says which option it came from
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


def test_overrides_use_hydra_grammar_and_refuse_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(composed_yaml())
    with pytest.raises(ConfigError, match=r"Could not override 'pca.kk'. To append to your config use \+pca.kk=3"):
        load_config(["pca.kk=3"], params)
    with pytest.raises(ConfigError, match=r"Could not append to config. An item is already at 'pca.k'"):
        load_config(["+pca.k=3"], params)
    assert load_config(["+pca.note=hello"], params).pca.note == "hello"
    assert load_config(["pca.k=50"], params).pca.k == 50  # typed, not the string "50"
    labels = load_config(["data.labels=[Apple Red,'Pêche plate']"], params).data.labels
    assert list(labels) == ["Apple Red", "Pêche plate"]
    assert "note" not in load_config(["+pca.note=hello", "~pca.note"], params).pca  # in order, as Hydra applies them
    with pytest.raises(ConfigError, match="cannot parse overrides.*pca.k"):
        load_config(["pca.k"], params)
    with pytest.raises(ConfigError, match="is a sweep"):
        load_config(["pca.k=3,4"], params)


def test_a_group_choice_keeps_the_values_of_the_params_file(tmp_path):
    """`dvc exp run -S` edits params.yaml; a later group choice must not drop those edits."""
    params = tmp_path / "params.yaml"
    params.write_text(composed_yaml(["pca.k=7", "data.train_per_label=3", "storage.region=eu-central-1",
                                     "+report.note=kept"]))
    cfg = load_config(["storage=s3"], params)
    assert cfg.storage.name == "s3" and cfg.storage.bucket == "fruits-p8-data"  # the chosen group, from conf/
    assert cfg.pca.k == 7 and cfg.data.train_per_label == 3 and cfg.report.note == "kept"  # params.yaml kept
    assert cfg.cluster.region == "eu-west-3"  # derived from the newly chosen storage group
    emr = load_config(["env=emr"], params)
    assert emr.env.paths.features.startswith("s3://") and emr.pca.k == 7


def test_keys_with_dots_survive_a_rebuild(tmp_path):
    """Spark settings are keys with dots inside env.spark.conf: kept as keys, never nested."""
    params = tmp_path / "params.yaml"
    params.write_text(composed_yaml().replace("spark.driver.memory: 4g", "spark.driver.memory: 3g"))
    conf = load_config(["pca.k=4"], params).env.spark.conf
    assert conf["spark.driver.memory"] == "3g" and "spark" not in conf
    assert set(conf) == set(compose().env.spark.conf)


def test_derived_settings_follow_an_override(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(composed_yaml())
    cfg = load_config([f"data.root={tmp_path / 'photos'}", f"env.paths.root={tmp_path}"], params)
    assert cfg.env.paths.images == str(tmp_path / "photos")
    assert cfg.env.paths.pca_metrics == f"{tmp_path}/metrics/pca.json"  # one root moves every output
    assert load_config([], params).env.paths.images == "data/sample"


def test_bad_values_are_refused_with_the_setting_named():
    for size in (63, 225):
        with pytest.raises(ConfigError, match=f"model.input_size={size} is not supported: use a size from 64 to 224"):
            validate(compose([f"model.input_size={size}"]))
    assert validate(compose(["model.input_size=100"])).model.input_size == 100  # Fruits-360's own size
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
    from fruits.core.config import offline_weights_allowed

    assert offline_weights_allowed(compose())
    assert not offline_weights_allowed(compose(["data=fruits360"]))
    assert not offline_weights_allowed(compose(["env=emr", "storage=s3"]))


def test_a_group_choice_without_params_file_composes_conf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: conf/ of this checkout is composed
    cfg = load_config(["storage=s3", "pca.k=3"])
    assert cfg.storage.name == "s3" and cfg.storage.bucket and cfg.pca.k == 3
    with pytest.raises(ConfigError, match="outside the EU"):
        load_config(["storage=s3", "storage.region=us-west-2"])


def test_featurize_s_jvm_options_join_the_driver_s_after_the_config_s_own():
    from fruits.core.spark import session_conf

    local = compose().env.spark
    assert local.featurize_java_options == "-XX:TieredStopAtLevel=1"  # C1 JIT for featurize, locally only
    assert compose(["env=emr", "storage=s3"]).env.spark.featurize_java_options is None
    assert session_conf(local) == {key: str(value) for key, value in local.conf.items()}  # other stages: as configured
    own = OmegaConf.create({"conf": {"spark.driver.extraJavaOptions": "-Dsome.flag=1"}})
    assert session_conf(own, local.featurize_java_options)["spark.driver.extraJavaOptions"] == (
        "-Dsome.flag=1 -XX:TieredStopAtLevel=1")
