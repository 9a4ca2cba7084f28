"""register() against real MLflow registries (SQLite and a live server) and predict_file() / `unet3plus predict`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import requests
import torch

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from unet3plus.cli import main
from unet3plus.config import Config, config_from_dict
from unet3plus.data.geometry import restore_volume
from unet3plus.data.transforms import prepare_volume
from unet3plus.errors import CheckpointError, DataError, UserError
from unet3plus.models import create_model, predict_proba
from unet3plus.register import register
from unet3plus.utils import file_digest

SIZE = 32
NAME = "unet3plus-liver"
CHAMPION = f"models:/{NAME}@champion"
# Axes permuted and flipped, anisotropic voxels: the mask must come back in this exact grid.
SCAN_AFFINE = np.array([[0.0, 0.9, 0.0, -20.0], [-0.8, 0.0, 0.0, 30.0], [0.0, 0.0, 3.0, -50.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(autouse=True)
def _no_exported_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny_config(tracking_uri: str) -> Config:
    return config_from_dict({
        "data": {"size": SIZE, "workers": 1},
        "model": {"width": 4, "deep_supervision": False},
        "evaluate": {"batch_size": 4, "device": "cpu"},
        "mlflow": {"tracking_uri": tracking_uri, "system_metrics": False},
    })  # fmt: skip


def write_checkpoint(path: Path, config: Config, run_id: str | None = None) -> Path:
    torch.manual_seed(0)
    model = create_model(**dataclasses.asdict(config.model))
    payload = {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 3, "mlflow_run_id": run_id}
    return save_checkpoint(path, payload)


def write_metrics(path: Path, dice: float, checkpoint: Path) -> Path:
    """evaluate's metrics.json for ``checkpoint`` (which it records by content hash)."""
    metrics = {"dice": dice, "iou": dice / 2, "hd95": None, "cases": 2, "dataset": "liver", "data_source": "lits",
               "test_set": "5" * 64}
    path.write_text(json.dumps({**metrics, "checkpoint_sha256": file_digest(checkpoint) if checkpoint.is_file() else None}))
    return path


def write_scan(path: Path, shape: tuple[int, int, int] = (40, 36, 10)) -> Path:
    """A CT-like volume: an ellipsoid body of soft tissue (with noise) in air."""
    grid = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    body = sum(((g - c) / (0.4 * n)) ** 2 for g, c, n in zip(grid[:2], centre[:2], shape[:2])) <= 1
    hu = np.where(body, 50.0, -1000.0) + np.random.default_rng(0).normal(0, 30, shape)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), SCAN_AFFINE), path)
    return path


def main_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """Three registrations of one checkpoint into a SQLite store: test Dice 0.85, then 0.82 (worse), then 0.9."""
    root = tmp_path_factory.mktemp("registry")
    config = tiny_config(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    training_tags = {"git_commit": "c0ffee" * 6 + "beef", "data_hash": "d" * 32}
    # An explicit artifact location keeps MLflow's default ./mlruns out of the working directory.
    experiment_id = client.create_experiment(config.mlflow.experiment, artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment_id, tags=training_tags).info.run_id
    client.set_terminated(run_id)
    checkpoint = write_checkpoint(root / "best.pt", config, run_id)
    results, champions = [], []
    for index, dice in enumerate((0.85, 0.82, 0.9)):
        results.append(register(config, checkpoint, write_metrics(root / f"metrics{index}.json", dice, checkpoint)))
        champions.append(str(client.get_model_version_by_alias(NAME, "champion").version))
    return {"root": root, "config": config, "client": client, "checkpoint": checkpoint, "run_id": run_id,
            "results": results, "champions": champions, "training_tags": training_tags}  # fmt: skip


@pytest.mark.slow
def test_champion_moves_only_when_the_test_metric_improves(registry):
    assert [(r["name"], r["version"], r["alias"], r["champion"]) for r in registry["results"]] == [
        (NAME, 1, "champion", True), (NAME, 2, "challenger", False), (NAME, 3, "champion", True)]
    assert "does not beat champion version 1's 0.8500 on the same test set" in registry["results"][1]["reason"]
    assert registry["champions"] == ["1", "1", "3"]
    assert registry["client"].get_registered_model(NAME).aliases == {"champion": 3, "challenger": 2}


@pytest.mark.slow
def test_versions_are_logged_in_the_training_run_and_tagged(registry):
    client = registry["client"]
    for version, dice in (("1", 0.85), ("2", 0.82), ("3", 0.9)):
        model_version = client.get_model_version(NAME, version)
        assert model_version.run_id == registry["run_id"]
        assert float(model_version.tags["test_dice"]) == dice
        assert model_version.tags["dataset"] == "liver" and model_version.tags["data_source"] == "lits"
        for key, value in registry["training_tags"].items():
            assert model_version.tags[key] == value


@pytest.mark.slow
def test_predict_cli_with_the_champion_and_with_the_checkpoint(registry, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scan = write_scan(tmp_path / "scan.nii.gz")
    options = ["--set", f"mlflow.tracking_uri={registry['config'].mlflow.tracking_uri}", "--set", "evaluate.device=cpu"]
    assert main(["predict", "--model", CHAMPION, "--input", str(scan), "--output", "from_registry.nii.gz", *options]) == 0
    assert main(["predict", "--model", str(registry["checkpoint"]), "--input", str(scan),
                 "--output", "from_checkpoint.nii.gz", *options]) == 0
    original = nib.load(scan)
    masks = []
    for name in ("from_registry.nii.gz", "from_checkpoint.nii.gz"):
        written = nib.load(tmp_path / name)
        assert written.shape == original.shape
        np.testing.assert_array_equal(written.affine, original.affine)
        assert written.get_data_dtype() == np.uint8
        masks.append(np.asanyarray(written.dataobj))
    np.testing.assert_array_equal(masks[0], masks[1])
    # The same steps by hand: preprocess with the training data config, probabilities, back to the grid, threshold.
    # Predict folds batch norms into the convolutions (equal up to float rounding): a voxel may flip only at the threshold.
    config = registry["config"]
    stacks, geometry = prepare_volume(original.get_fdata(), original.affine, config.data)
    network = model_from_checkpoint(load_checkpoint(registry["checkpoint"]))
    probabilities = predict_proba(network, torch.from_numpy(stacks)).numpy()[:, 0]
    restored = restore_volume(probabilities, geometry)
    expected = restored > config.evaluate.threshold
    assert 0 < expected.mean() < 1
    differ = masks[0] != expected
    assert np.all(np.abs(restored[differ] - config.evaluate.threshold) < 1e-5)


def test_predict_refuses_an_input_that_is_not_a_3d_nifti(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checkpoint = write_checkpoint(tmp_path / "best.pt", tiny_config(f"sqlite:///{tmp_path / 'm.db'}"))
    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), four_d)
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(four_d.read_bytes()[:40])
    for bad, problem in ((four_d, "3-D"), (corrupt, "cannot read"), (tmp_path / "missing.nii.gz", "not found")):
        output = tmp_path / f"mask_{bad.name}"
        error = main_error(["predict", "--model", str(checkpoint), "--input", str(bad), "--output", str(output)], capsys)
        assert str(bad) in error and problem in error
        assert not output.exists()


def test_missing_or_corrupt_checkpoint_is_a_checkpoint_error_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scan = write_scan(tmp_path / "scan.nii.gz")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x80\x02 truncated")
    for checkpoint in (tmp_path / "missing.pt", corrupt):
        error = main_error(["predict", "--model", str(checkpoint), "--input", str(scan), "--output", "mask.nii.gz"], capsys)
        assert str(checkpoint) in error
        assert not (tmp_path / "mask.nii.gz").exists()
        with pytest.raises(CheckpointError, match=checkpoint.name):
            register(tiny_config(f"sqlite:///{tmp_path / 'm.db'}"), checkpoint, write_metrics(tmp_path / "metrics.json", 0.5, checkpoint))


@pytest.mark.slow
def test_unknown_registered_model_is_a_clear_error(registry, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scan = write_scan(tmp_path / "scan.nii.gz")
    argv = ["predict", "--model", "models:/unet3plus-nothing@champion", "--input", str(scan), "--output", "mask.nii.gz",
            "--set", f"mlflow.tracking_uri={registry['config'].mlflow.tracking_uri}"]  # fmt: skip
    assert "cannot load MLflow model models:/unet3plus-nothing@champion" in main_error(argv, capsys)
    assert not (tmp_path / "mask.nii.gz").exists()


def test_register_refuses_missing_or_incomplete_metrics(tmp_path):
    config = tiny_config(f"sqlite:///{tmp_path / 'm.db'}")
    checkpoint = write_checkpoint(tmp_path / "best.pt", config)
    with pytest.raises(DataError, match="nope.json"):
        register(config, checkpoint, tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps({"iou": 0.3}))
    with pytest.raises(DataError, match="'dice'"):
        register(config, checkpoint, tmp_path / "other.json")
    (tmp_path / "spleen.json").write_text(json.dumps({"dice": 0.3, "dataset": "spleen"}))
    with pytest.raises(DataError, match="spleen"):
        register(config, checkpoint, tmp_path / "spleen.json")


def test_registry_failure_is_a_user_error_naming_the_store(tmp_path):
    (tmp_path / "not_a_folder").write_text("a file where the store's folder should be")
    config = tiny_config(f"sqlite:///{tmp_path / 'not_a_folder' / 'm.db'}")
    checkpoint = write_checkpoint(tmp_path / "best.pt", config)
    with pytest.raises(UserError, match="MLflow model registry at sqlite:///.*not_a_folder"):
        register(config, checkpoint, write_metrics(tmp_path / "metrics.json", 0.5, checkpoint))


@pytest.mark.slow
def test_register_against_a_live_mlflow_server(mlflow_server, tmp_path):
    config = tiny_config(mlflow_server.url)
    checkpoint = write_checkpoint(tmp_path / "best.pt", config, run_id="f" * 32)  # unknown run: a new run is used
    result = register(config, checkpoint, write_metrics(tmp_path / "metrics.json", 0.9, checkpoint))
    assert (result["name"], result["version"], result["alias"]) == (NAME, 1, "champion")
    api = f"{mlflow_server.url}/api/2.0/mlflow"
    alias = requests.get(f"{api}/registered-models/alias", params={"name": NAME, "alias": "champion"}, timeout=30)
    assert alias.ok, alias.text
    assert alias.json()["model_version"]["version"] == "1"
    version = requests.get(f"{api}/model-versions/get", params={"name": NAME, "version": "1"}, timeout=30).json()["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version["tags"]}
    assert float(tags["test_dice"]) == 0.9 and tags["dataset"] == "liver"
