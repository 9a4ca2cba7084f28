"""Kubeflow components called as plain Python (``component.python_func``) with real artifacts on tiny data."""

import json
import os
import stat
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml
from kfp import dsl

from components import evaluate_model, preprocess_data, raw_data, register_model, train_model, validate_data
from components.ablations import ablation_names
from components.common import input_dir, layout_of
from components.data_params import data_params
from components.report import report_ablations
from tests.conftest import sqlite_uri, tiny_params
from unet3plus.config import parse_config
from unet3plus.data.phantom import write_dataset
from unet3plus.errors import ConfigError, DataError, UserError


def _params() -> str:
    return yaml.safe_dump(tiny_params())


def _artifact(kind: type, path: Path) -> dsl.Artifact:
    return kind(name=path.name, uri=str(path), metadata={})


@pytest.fixture(scope="module")
def raw_liver(tmp_path_factory):
    """A tiny synthetic LiTS dataset written by the raw_data component."""
    raw = _artifact(dsl.Dataset, tmp_path_factory.mktemp("liver") / "raw")
    cases = raw_data.python_func(raw=raw, dataset="liver", params=_params())
    return raw, cases


def test_parse_config_reads_params_text_overrides_and_an_ablation_by_name():
    config = parse_config(_params(), ["train.epochs=3"], "unet")
    assert (config.data.size, config.train.epochs, config.model.arch, config.model.cgm) == (32, 3, "unet", False)
    assert parse_config(_params(), ablation="").model.arch == "unet3plus"  # "" is the main model


def test_ablation_names_are_the_params_run_list_in_order_and_checked():
    assert ablation_names.python_func(params=_params()) == ["unet", "unet2plus", "unet3plus_no_ds"]
    reordered = yaml.safe_dump(tiny_params(ablations={"run": ["unet3plus_no_ds", "unet"]}))
    assert ablation_names.python_func(params=reordered) == ["unet3plus_no_ds", "unet"]
    assert ablation_names.python_func(params=yaml.safe_dump(tiny_params(ablations={"run": []}))) == []
    with pytest.raises(ConfigError, match="unet4plus"):
        ablation_names.python_func(params=yaml.safe_dump(tiny_params(ablations={"run": ["unet4plus"]})))


def test_data_params_keep_the_data_section_alone_so_only_data_changes_change_them():
    text = data_params.python_func(params=_params())
    assert list(yaml.safe_load(text)) == ["data"]
    assert parse_config(text).data == parse_config(_params()).data
    other_training = yaml.safe_dump(tiny_params(train={"epochs": 7}, model={"width": 16}))
    assert data_params.python_func(params=other_training) == text  # the data steps' cache key is unchanged
    assert data_params.python_func(params=yaml.safe_dump(tiny_params(data={"size": 48}))) != text
    with pytest.raises(ConfigError, match="data.size"):
        data_params.python_func(params=yaml.safe_dump(tiny_params(data={"size": "big"})))


def test_the_report_refuses_a_missing_tracking_store_naming_it_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    monkeypatch.chdir(tmp_path)
    report = _artifact(dsl.Markdown, tmp_path / "report.md")
    with pytest.raises(UserError, match=f"no MLflow tracking store at {tmp_path}"):
        report_ablations.python_func(report=report, params=_params(), dataset="liver")
    assert not Path(report.path).exists()


@pytest.mark.parametrize(
    ("params", "overrides", "ablation", "message"),
    [
        ("train: [1, 2", None, None, "params: not valid YAML"),
        ("- data\n- model\n", None, None, "params: expected a mapping of sections"),
        ("train:\n  epochz: 3\n", None, None, "params: unknown key train.epochz"),
        ("train:\n  epochs: 3\n", ["train.epochz=4"], None, "unknown key train.epochz"),
        ("train:\n  epochs: 3\n", ["epochs=4"], None, "must look like section.key=value"),
        ("train:\n  epochs: 3\n", None, "unet", "ablations.variants has no variant 'unet'"),
    ],
)
def test_parse_config_refuses_bad_params_saying_what_to_fix(params, overrides, ablation, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(params, overrides, ablation)


def test_layout_of_maps_organs_and_lists_the_known_ones():
    assert (layout_of("liver"), layout_of("spleen")) == ("lits", "msd-spleen")
    with pytest.raises(ConfigError, match="'kidney' is unknown; expected one of 'liver', 'spleen'"):
        layout_of("kidney")


def test_input_dir_names_the_producer_of_a_missing_input(tmp_path):
    with pytest.raises(DataError, match="not a directory; connect this input to the output of preprocess_data"):
        input_dir(_artifact(dsl.Dataset, tmp_path / "absent"), "preprocessed dataset", "preprocess_data")
    with pytest.raises(DataError, match="has no manifest.csv"):
        input_dir(_artifact(dsl.Dataset, tmp_path), "preprocessed dataset", "preprocess_data", required="manifest.csv")
    assert input_dir(_artifact(dsl.Dataset, tmp_path), "raw dataset", "raw_data") == tmp_path


def test_raw_data_synthesises_the_configured_cases(raw_liver):
    raw, cases = raw_liver
    volumes = sorted(Path(raw.path).glob("volume-*.nii"))
    assert cases == len(volumes) == 4
    assert nib.load(volumes[0]).shape == (48, 48, 16)
    assert raw.metadata == {"dataset": "liver", "layout": "lits", "cases": 4, "source": "synthetic"}


def test_raw_data_copies_an_existing_dataset_from_source_dir(raw_liver, tmp_path):
    source, _ = raw_liver
    copy = _artifact(dsl.Dataset, tmp_path / "copy")
    cases = raw_data.python_func(raw=copy, dataset="liver", params=_params(), source_dir=source.path)
    assert cases == 4 and copy.metadata["source"] == source.path
    assert sorted(p.name for p in Path(copy.path).iterdir()) == sorted(p.name for p in Path(source.path).iterdir())
    assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # no staging folder left


@pytest.mark.parametrize(
    ("dataset", "source", "error", "message"),
    [
        ("kidney", "", ConfigError, "dataset 'kidney' is unknown"),
        ("liver", "absent", DataError, "source_dir not found; mount the volume"),
        ("spleen", "empty", DataError, r"problem\(s\) with the msd-spleen dataset"),
    ],
)
def test_raw_data_refuses_bad_inputs_before_writing(tmp_path, dataset, source, error, message):
    (tmp_path / "empty").mkdir()
    raw = _artifact(dsl.Dataset, tmp_path / "raw")
    with pytest.raises(error, match=message):
        raw_data.python_func(raw=raw, dataset=dataset, params=_params(),
                             source_dir=str(tmp_path / source) if source else "")
    assert not Path(raw.path).exists()


def test_validate_then_preprocess_record_what_they_found(raw_liver, tmp_path):
    raw, _ = raw_liver
    report = _artifact(dsl.Artifact, tmp_path / "report.json")
    assert validate_data.python_func(raw=raw, report=report, dataset="liver", params=_params()) == 4
    assert json.loads(Path(report.path).read_text())["errors"] == []
    processed = _artifact(dsl.Dataset, tmp_path / "processed")
    preprocess_data.python_func(raw=raw, processed=processed, dataset="liver", params=_params())
    manifest = pd.read_csv(Path(processed.path) / "manifest.csv", dtype={"case_id": str})
    assert processed.metadata["samples"] == len(manifest) == 4 * 16
    assert processed.metadata["size"] == 32
    for split, rows in manifest.groupby("split"):
        assert processed.metadata[f"{split}_samples"] == len(rows)
        assert processed.metadata[f"{split}_cases"] == rows["case_id"].nunique()


def test_validate_fails_listing_the_broken_file_and_keeps_the_report(raw_liver, tmp_path):
    source, _ = raw_liver
    raw = _artifact(dsl.Dataset, tmp_path / "raw")
    raw_data.python_func(raw=raw, dataset="liver", params=_params(), source_dir=source.path)
    broken = sorted(Path(raw.path).glob("segmentation-*.nii"))[0]
    broken.write_bytes(broken.read_bytes()[:200])
    report = _artifact(dsl.Artifact, tmp_path / "report.json")
    with pytest.raises(DataError, match=broken.name):
        validate_data.python_func(raw=raw, report=report, dataset="liver", params=_params())
    assert any(broken.name in error for error in json.loads(Path(report.path).read_text())["errors"])


def test_steps_refuse_missing_inputs_before_writing(tmp_path):
    absent = _artifact(dsl.Dataset, tmp_path / "absent")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    empty = _artifact(dsl.Model, empty_dir)
    out = tmp_path / "out"
    params = _params()
    calls = [
        (lambda: validate_data.python_func(raw=absent, report=_artifact(dsl.Artifact, out), dataset="liver",
                                           params=params),
         "the raw dataset is not a directory; connect this input to the output of raw_data"),
        (lambda: preprocess_data.python_func(raw=absent, processed=_artifact(dsl.Dataset, out), dataset="liver",
                                             params=params),
         "the raw dataset is not a directory"),
        (lambda: train_model.python_func(processed=empty, model=_artifact(dsl.Model, out),
                                         metrics=_artifact(dsl.Metrics, tmp_path / "m"), params=params),
         "the preprocessed dataset has no manifest.csv; connect this input to the output of preprocess_data"),
        (lambda: evaluate_model.python_func(model=empty, processed=absent, raw=absent,
                                            evaluation=_artifact(dsl.Artifact, out),
                                            metrics=_artifact(dsl.Metrics, tmp_path / "m"),
                                            page=_artifact(dsl.HTML, tmp_path / "page"),
                                            cgm=_artifact(dsl.ClassificationMetrics, tmp_path / "cgm"), params=params),
         "the trained model has no best.pt; connect this input to the output of train_model"),
        (lambda: register_model.python_func(model=empty, evaluation=absent, params=params),
         "the trained model has no best.pt"),
    ]
    for call, message in calls:
        with pytest.raises(DataError, match=message):
            call()
    assert not out.exists()


def test_train_refuses_an_unknown_ablation_before_writing(tmp_path):
    model = _artifact(dsl.Model, tmp_path / "model")
    with pytest.raises(ConfigError, match="no variant 'unet4plus'; defined: unet, unet2plus"):
        train_model.python_func(processed=_artifact(dsl.Dataset, tmp_path), model=model,
                                metrics=_artifact(dsl.Metrics, tmp_path / "metrics"), params=_params(),
                                ablation="unet4plus")
    assert not Path(model.path).exists()


def test_the_raw_data_component_publishes_a_copied_dataset_with_the_umask(tmp_path):
    source = tmp_path / "mounted"
    write_dataset("lits", source, cases=2, seed=0, size=32, slices=8)
    source.chmod(0o700)  # a claim's folder readable by its owner only
    raw = _artifact(dsl.Dataset, tmp_path / "raw")
    previous = os.umask(0o022)
    try:
        cases = raw_data.python_func(raw=raw, dataset="liver", params="", source_dir=str(source))
    finally:
        os.umask(previous)
    assert cases == 2
    assert stat.S_IMODE(Path(raw.path).stat().st_mode) == 0o755
    assert sorted(path.name for path in Path(raw.path).glob("*.nii")) == sorted(
        path.name for path in source.glob("*.nii"))
