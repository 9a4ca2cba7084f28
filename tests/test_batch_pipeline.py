"""Batch inference on Kubeflow: the component over a folder, the compiled pipeline's cluster settings, and the
pipeline run for real through kfp.local with a model registered in a SQLite MLflow store."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.batch_predict import batch_predict
from pipeline.batch import build_batch_pipeline
from pipeline.batch import main as batch_main
from unet3plus.checkpoint import save_checkpoint
from unet3plus.config import config_from_dict
from unet3plus.data.phantom import write_dataset
from unet3plus.errors import DataError
from unet3plus.models import create_model
from unet3plus.models.inference import randomize_batch_norms
from unet3plus.predict import predictor_from_checkpoint, read_scan
from unet3plus.register import register
from unet3plus.utils import file_digest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path):
    """A volume's content: a checkpoint and a folder of two scans and one broken file."""
    config = config_from_dict({"data": {"size": 32}, "model": {"width": 4, "cgm": False}})
    torch.manual_seed(0)
    payload = {"model": create_model(**dataclasses.asdict(config.model)).state_dict(), "config": config.to_dict(),
               "dataset": "liver", "epoch": 1}  # fmt: skip
    save_checkpoint(tmp_path / "best.pt", payload)
    scans = tmp_path / "scans"
    scans.mkdir()
    for index, shape in enumerate(((20, 18, 4), (16, 16, 3))):
        hu = np.where(np.random.default_rng(index).random(shape) < 0.5, 60, -1000).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.0, 1.0])), scans / f"case{index}.nii.gz")
    (scans / "broken.nii").write_bytes(b"not a NIfTI file at all")
    return tmp_path


def params() -> str:
    return yaml.safe_dump({"evaluate": {"device": "cpu", "batch_size": 2}, "mlflow": {"system_metrics": False}})


def test_the_component_segments_the_folder_and_fails_naming_the_bad_scan(workspace):
    common = {"params": params(), "input_dir": str(workspace / "scans"), "model_uri": str(workspace / "best.pt")}
    with pytest.raises(DataError, match=r"1 scan\(s\) failed.*broken.nii"):
        batch_predict.python_func(output_dir=str(workspace / "strict"), **common)
    assert sorted(p.name for p in (workspace / "strict").glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]
    result = batch_predict.python_func(output_dir=str(workspace / "masks"), allow_failures=True, **common)
    assert tuple(result) == (2, 1)
    volumes = pd.read_csv(workspace / "masks" / "volumes.csv")
    assert list(volumes["scan"]) == ["case0.nii.gz", "case1.nii.gz"]
    with pytest.raises(DataError, match="not a folder"):
        batch_predict.python_func(output_dir=str(workspace / "x"), **{**common, "input_dir": str(workspace / "nope")})


def executor(path) -> dict:
    spec = yaml.safe_load_all(path.read_text())
    documents = list(spec)
    platform = next(d for d in documents if "platforms" in d)
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-batch-predict"]


@pytest.mark.parametrize("gpu", [False, True])
def test_the_pipeline_mounts_the_volume_and_asks_for_a_gpu_only_when_told(tmp_path, gpu):
    output = tmp_path / "batch.yaml"
    assert batch_main(["compile", "--output", str(output), "--pvc", "scans-pvc", "--mount", "/mnt/scans",
                       *(["--gpu"] if gpu else [])]) == 0  # fmt: skip
    settings = executor(output)
    assert settings["pvcMount"][0]["mountPath"] == "/mnt/scans"
    assert "scans-pvc" in yaml.safe_dump(settings["pvcMount"])
    assert settings["secretAsVolume"][0]["secretName"] == "mlflow-credentials"
    assert ("nodeSelector" in settings) == gpu
    container = next(d for d in yaml.safe_load_all(output.read_text()) if "deploymentSpec" in d)
    resources = container["deploymentSpec"]["executors"]["exec-batch-predict"]["container"]["resources"]
    assert ("accelerator" in resources) == gpu


@pytest.mark.slow
# kfp.local's expected notes: it runs our image's code in this Python, and ignores the cluster settings.
@pytest.mark.filterwarnings("ignore:You may be attemping to run a task that uses custom:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:Task .* have no effect in the current local runner:UserWarning")
def test_the_pipeline_runs_with_kfp_local_and_segments_a_folder_with_the_registered_champion(
        in_sqlite_store, tmp_path, monkeypatch):
    from kfp import local

    tracking_uri = in_sqlite_store
    config = config_from_dict({"data": {"size": 32}, "model": {"width": 4, "cgm": False},
                               "evaluate": {"device": "cpu", "batch_size": 4, "threshold": 0.5},
                               "mlflow": {"tracking_uri": tracking_uri, "system_metrics": False}})  # fmt: skip
    torch.manual_seed(0)
    model = randomize_batch_norms(create_model(**dataclasses.asdict(config.model)))
    checkpoint = {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 1}
    save_checkpoint(tmp_path / "best.pt", checkpoint)
    (tmp_path / "metrics.json").write_text(json.dumps({
        "dice": 0.9, "cases": 2, "dataset": "liver", "checkpoint_sha256": file_digest(tmp_path / "best.pt"),
        "data_source": "lits", "test_set": "t" * 64}))  # fmt: skip
    assert register(config, tmp_path / "best.pt", tmp_path / "metrics.json")["champion"]
    volume = tmp_path / "volume"  # the PVC: two phantom scans (their labels stay out of the scans folder)
    (volume / "scans").mkdir(parents=True)
    for scan in write_dataset("lits", tmp_path / "phantom", cases=2, seed=0, size=48, slices=8):
        shutil.copy(scan, volume / "scans" / scan.name)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(local.config.LocalExecutionConfig, "instance", None)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    build_batch_pipeline()(params=yaml.safe_dump(config.to_dict()), input_dir=str(volume / "scans"),
                           output_dir=str(volume / "masks"), model_uri="models:/unet3plus-liver@champion")

    scans = sorted((volume / "scans").iterdir())
    assert len(scans) == 2
    volumes = pd.read_csv(volume / "masks" / "volumes.csv")
    assert list(volumes["scan"]) == [p.name for p in scans]
    predictor = predictor_from_checkpoint(checkpoint, "best.pt", "cpu", batch_size=4)
    for scan_path, row in zip(scans, volumes.itertuples()):
        written = nib.load(volume / "masks" / scan_path.name.replace(".nii", ".nii.gz"))
        mask = np.asanyarray(written.dataobj)
        scan = read_scan(scan_path)
        np.testing.assert_array_equal(written.affine, scan.affine)
        assert 0 < mask.mean() < 1, "a constant mask would make the comparison meaningless"
        np.testing.assert_array_equal(mask, predictor.segment(scan))  # the checkpoint's own mask, voxel for voxel
        assert row.organ_voxels == int(mask.sum())
        assert row.organ_volume_ml == pytest.approx(mask.sum() * np.prod(scan.header.get_zooms()) / 1000, rel=1e-5)


def test_the_pipeline_compiles_with_the_default_claim(tmp_path):
    output = tmp_path / "batch.yaml"
    assert batch_main(["compile", "--output", str(output)]) == 0
    assert "unet3plus-workspace" in yaml.safe_dump(executor(output)["pvcMount"])
