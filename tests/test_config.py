"""params.yaml loading: defaults, overrides, and clear errors for bad keys, types and values."""

from pathlib import Path

import pytest
import yaml

from unet3plus.config import Config, ConfigError, MlflowConfig, ablation_config, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("params", ["params.yaml", "configs/paper.yaml"])
def test_shipped_params_files_load(params):
    config = load_config(ROOT / params)
    assert isinstance(config, Config)
    raw = yaml.safe_load((ROOT / params).read_text())
    for section, values in raw.items():
        if section == "ablations":
            continue
        for key, value in values.items():
            loaded = getattr(getattr(config, section), key)
            assert loaded == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_paper_config_is_the_papers_setup():
    config = load_config(ROOT / "configs/paper.yaml")
    assert (config.data.size, config.model.width, config.model.encoder) == (320, 64, "resnet101")
    assert config.model.deep_supervision and config.model.cgm
    assert min(config.loss.focal_weight, config.loss.ms_ssim_weight, config.loss.iou_weight) > 0
    assert config.train.optimizer == "sgd"
    assert config.data.resize_mode == "spacing"  # measured better on varied fields of view (RESULTS.md)


def test_overrides_parse_yaml_values_and_coerce_ints_to_floats():
    config = load_config(None, ["train.epochs=3", "train.lr=1", "model.cgm=false", "data.hu_window=[-100, 200]"])
    assert config.train.epochs == 3
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.model.cgm is False
    assert config.data.hu_window == (-100.0, 200.0)


def test_flat_has_one_entry_per_knob():
    flat = Config().flat()
    assert flat["model.arch"] == "unet3plus"
    assert flat["loss.focal_gamma"] == 2.0
    assert not any(key.startswith("ablations") for key in flat)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"epoch": 3}}, "unknown key train.epoch"),
        ({"trainer": {}}, "unknown section 'trainer'"),
        ({"train": {"epochs": "ten"}}, "train.epochs = 'ten' has the wrong type"),
        ({"train": {"epochs": 2.5}}, "train.epochs = 2.5 has the wrong type"),
        ({"model": {"cgm": "yes"}}, "model.cgm = 'yes' has the wrong type"),
        ({"model": {"arch": "segformer"}}, "'unet', 'unet2plus' or 'unet3plus'"),
        ({"data": {"hu_window": [250, -200]}}, "data.hu_window"),
        ({"data": {"hu_window": [1, 2, 3]}}, "list of 2 numbers"),
        ({"train": {"optimizer": "adam"}}, "'sgd' or 'adamw'"),
        ({"loss": {"focal_weight": 0, "ms_ssim_weight": 0, "iou_weight": 0}}, "at least one positive"),
        ({"train": []}, "section 'train' must be a mapping"),
        ({"ablations": {"variants": {"a": {"model.archh": "unet"}}}}, "ablation 'a': override 'model.archh=unet': unknown key"),
        ({"ablations": {"variants": {"a": {}}, "run": ["a", "a"]}},
         "ablations.run = ['a', 'a'] is invalid: expected unique names"),
        ({"ablations": {"variants": {"a": {}}, "run": ["b"]}},
         "ablations.run = ['b'] is invalid: expected names of ablations.variants (a)"),
        ({"ablations": {"variants": {"No DS": {}}}}, "ablations.variants = 'No DS' is invalid"),
        ({"ablations": {"variants": {"a": "model.arch=unet"}}}, "ablations.variants.a = 'model.arch=unet' is invalid"),
        ({"ablations": {"run": "a"}}, "ablations.run = 'a' has the wrong type: expected a list"),
        ({"ablations": {"variants": {"a": {"loss.cgm_weight": 0}}}},
         "ablation 'a': model.cgm = true with loss.cgm_weight = 0 is refused"),
        ({"loss": {"cgm_weight": 0}}, "model.cgm = true with loss.cgm_weight = 0 is refused"),
        # issue 20: a variant that would replace the main model in the report, or whose overrides would be ignored
        ({"ablations": {"variants": {"main": {"model.width": 4}}}},
         "ablations.variants = 'main' is invalid: expected a name other than 'main'"),
        ({"ablations": {"variants": {"a": {"data.size": 32}}}},
         "ablations.variants.a = 'data.size' is invalid: expected keys of model, loss, train, evaluate: "
         "a variant cannot change data.*"),
        ({"ablations": {"variants": {"a": {"mlflow.experiment": "x"}}}}, "ablations.variants.a = 'mlflow.experiment' is invalid"),
        ({"ablations": {"variants": {"a": {"register.alias": "x"}}}}, "ablations.variants.a = 'register.alias' is invalid"),
    ],
)
def test_bad_params_raise_config_error_naming_the_key(raw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        config_from_dict(raw)


@pytest.mark.parametrize("override", ["train.epochs", "epochs=3", "nosuch.key=1", "train.nosuch=1", "train.epochs=[1"])
def test_malformed_overrides_are_refused(override):
    with pytest.raises(ConfigError):
        load_config(None, [override])


def test_params_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: parameters file not found"):
        load_config(missing)
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [\n")
    with pytest.raises(ConfigError, match="params.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml: unknown key train.epochz"):
        load_config(bad)


def test_ablation_config_applies_its_overrides():
    base = config_from_dict({"ablations": {"variants": {"unet_focal": {"model.arch": "unet", "loss.iou_weight": 0},
                                                        "spare": {}}, "run": ["unet_focal"]}})
    assert [a.name for a in base.ablations.selected()] == ["unet_focal"]
    variant = ablation_config(base, base.ablations.get("unet_focal"))
    assert variant.model.arch == "unet" and variant.loss.iou_weight == 0.0
    assert base.model.arch == "unet3plus" and variant.ablations.run == []
    with pytest.raises(ConfigError, match="no variant 'nope'; defined: unet_focal, spare"):
        base.ablations.get("nope")


def test_cgm_without_its_loss_is_refused_but_no_cgm_without_its_loss_is_fine():
    assert config_from_dict({"model": {"cgm": False}, "loss": {"cgm_weight": 0}}).model.cgm is False


@pytest.mark.parametrize("params", ["params.yaml", "configs/paper.yaml"])
def test_shipped_grids(params):
    """Default: the paper's Table 1 rows at CPU size; paper.yaml: Table 1 x 2 encoders, Table 2's loss/CGM rows."""
    config = load_config(ROOT / params)
    variants = {a.name: ablation_config(config, a) for a in config.ablations.selected()}
    rows = {(v.model.arch, v.model.encoder, v.model.deep_supervision, v.model.cgm, v.loss.ms_ssim_weight > 0)
            for v in [config, *variants.values()]}
    assert len(rows) == len(variants) + 1  # every variant differs from the main model and from each other
    encoders = ("unet", "resnet101") if params.startswith("configs") else ("unet",)
    for encoder in encoders:
        for arch, ds in (("unet", False), ("unet2plus", True), ("unet3plus", False)):
            assert any(r[0] == arch and r[1] == encoder and r[2] == ds and not r[3] for r in rows), (arch, encoder)
    if params.startswith("configs"):
        table2 = {(r[3], r[4]) for r in rows if r[:3] == ("unet3plus", "resnet101", True)}
        assert table2 == {(False, False), (False, True), (True, True)}  # focal, hybrid, hybrid + CGM


def test_relative_sqlite_uris_resolve_against_the_dvc_root_inside_dvc_stages(monkeypatch, tmp_path):
    """`dvc exp run --temp/--queue` run in a copy under .dvc/tmp/exps/ but set DVC_ROOT to the project."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    tmp_path = tmp_path.resolve()
    config = MlflowConfig(tracking_uri="sqlite:///mlflow.db")
    assert config.resolved_tracking_uri() == "sqlite:///mlflow.db"  # outside DVC: the working directory
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert config.resolved_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    assert MlflowConfig(tracking_uri="sqlite:///stores/m.db?timeout=9").resolved_tracking_uri() == (
        f"sqlite:///{tmp_path}/stores/m.db?timeout=9")
    for fixed in (f"sqlite:///{tmp_path}/abs.db", "sqlite:///:memory:", "http://127.0.0.1:5000"):
        assert MlflowConfig(tracking_uri=fixed).resolved_tracking_uri() == fixed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///exported.db")  # the environment's URI too
    assert config.resolved_tracking_uri() == f"sqlite:///{tmp_path}/exported.db"
