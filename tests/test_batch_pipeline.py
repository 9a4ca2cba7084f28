"""Batch inference on Kubeflow: the component over a folder, and the compiled pipeline's cluster settings."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components.batch_predict import batch_predict
from pipeline.batch import main as batch_main
from unet3plus.checkpoint import save_checkpoint
from unet3plus.config import config_from_dict
from unet3plus.errors import DataError
from unet3plus.models import create_model


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
