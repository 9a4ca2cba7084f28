"""The registered volume model: pyfunc contract, per-row errors, device choice, `mlflow models serve`, export."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow.exceptions import MlflowException

from unet3plus.checkpoint import save_checkpoint
from unet3plus.cli import main
from unet3plus.config import Config, config_from_dict
from unet3plus.device import select_device
from unet3plus.errors import UserError
from unet3plus.models import create_model
from unet3plus.models.inference import randomize_batch_norms
from unet3plus.register import register
from unet3plus.serving import decode_mask, device_preference, encode_scan, export_model
from unet3plus.utils import file_digest

SIZE = 32
NAME = "unet3plus-liver"
CHAMPION = f"models:/{NAME}@champion"
THRESHOLD = 0.45
# Axes permuted and flipped, anisotropic voxels: the mask must come back in this exact grid.
PERMUTED_AFFINE = np.array([[0.0, 0.9, 0.0, -20.0], [-0.8, 0.0, 0.0, 30.0], [0.0, 0.0, 3.0, -50.0], [0, 0, 0, 1.0]])


@pytest.fixture(autouse=True)
def _no_exported_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", raising=False)


def tiny_config(tracking_uri: str) -> Config:
    return config_from_dict({
        "data": {"size": SIZE, "workers": 1},
        "model": {"width": 4, "cgm": False},  # a random CGM would gate every slice off: an empty mask
        "evaluate": {"batch_size": 4, "device": "cpu", "threshold": THRESHOLD},
        "mlflow": {"tracking_uri": tracking_uri, "system_metrics": False},
    })  # fmt: skip


def write_checkpoint(path: Path, config: Config) -> Path:
    """Random weights with non-trivial batch-norm statistics, so folding them is not the identity."""
    torch.manual_seed(0)
    model = randomize_batch_norms(create_model(**dataclasses.asdict(config.model)), seed=1)
    payload = {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 3, "mlflow_run_id": None}
    return save_checkpoint(path, payload)


def write_scan(path: Path, shape: tuple[int, int, int], affine: np.ndarray, seed: int) -> Path:
    """A CT-like volume: an ellipsoid body of soft tissue (with noise) in air."""
    grid = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    body = sum(((g - c) / (0.4 * n)) ** 2 for g, c, n in zip(grid[:2], centre[:2], shape[:2])) <= 1
    hu = np.where(body, 50.0, -1000.0) + np.random.default_rng(seed).normal(0, 30, shape)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), path)
    return path


@pytest.fixture(scope="module")
def champion(tmp_path_factory) -> dict:
    """One tiny model registered as champion in a SQLite store, and two scans of different geometry."""
    root = tmp_path_factory.mktemp("serving")
    config = tiny_config(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    client.create_experiment(config.mlflow.experiment, artifact_location=(root / "artifacts").as_uri())
    checkpoint = write_checkpoint(root / "best.pt", config)
    metrics = root / "metrics.json"
    metrics.write_text(json.dumps({"dice": 0.9, "cases": 2, "dataset": "liver", "checkpoint_sha256": file_digest(checkpoint),
                                   "data_source": "lits", "test_set": "t" * 64}))  # as if trained on LiTS: NAME
    register(config, checkpoint, metrics)
    scans = [write_scan(root / "permuted.nii.gz", (40, 36, 10), PERMUTED_AFFINE, seed=0),
             write_scan(root / "plain.nii", (30, 34, 7), np.diag([0.7, 0.7, 2.5, 1.0]), seed=1)]  # fmt: skip
    return {"root": root, "config": config, "checkpoint": checkpoint, "scans": scans}


def tracking(champion: dict) -> list[str]:
    return ["--set", f"mlflow.tracking_uri={champion['config'].mlflow.tracking_uri}", "--set", "evaluate.device=cpu"]


def cli_masks(champion: dict, model: str, folder: Path, monkeypatch) -> list[np.ndarray]:
    """`unet3plus predict` of each scan with ``model``: the reference the pyfunc must equal voxel for voxel."""
    monkeypatch.chdir(folder)
    masks = []
    for index, scan in enumerate(champion["scans"]):
        output = folder / f"mask{index}.nii.gz"
        assert main(["predict", "--model", model, "--input", str(scan), "--output", str(output), *tracking(champion)]) == 0
        masks.append(np.asanyarray(nib.load(output).dataobj))
    return masks


def frame(values: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"nifti_base64": values})


@pytest.mark.slow
def test_pyfunc_masks_equal_unet3plus_predict_on_the_scans_own_grid(champion, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["config"].mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cpu"})
    result = model.predict(frame([encode_scan(scan) for scan in champion["scans"]]))
    assert list(result.columns) == ["mask_base64", "organ_voxels", "organ_volume_ml", "error"]
    from_checkpoint = cli_masks(champion, str(champion["checkpoint"]), tmp_path, monkeypatch)
    from_registry = cli_masks(champion, CHAMPION, tmp_path, monkeypatch)
    for row, scan_path in enumerate(champion["scans"]):
        scan, mask = nib.load(scan_path), decode_mask(result["mask_base64"][row])
        assert mask.shape == scan.shape and mask.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(mask.affine, scan.affine)
        voxels = np.asanyarray(mask.dataobj)
        assert 0 < voxels.mean() < 1, "a constant mask would make the comparison meaningless"
        np.testing.assert_array_equal(voxels, from_registry[row])
        np.testing.assert_array_equal(voxels, from_checkpoint[row])
        assert result["organ_voxels"][row] == int(voxels.sum()) and result["error"][row] == ""
        voxel_ml = float(np.prod(scan.header.get_zooms())) / 1000
        assert result["organ_volume_ml"][row] == pytest.approx(voxels.sum() * voxel_ml, rel=1e-6)


@pytest.mark.slow
def test_the_threshold_is_the_models_own_not_the_callers(champion, tmp_path, monkeypatch):
    """Registered with threshold 0.45: a caller's evaluate.threshold changes nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["config"].mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cpu"})
    assert model.unwrap_python_model().predictor.threshold == THRESHOLD
    assert model.metadata.metadata["unet3plus"]["threshold"] == THRESHOLD
    monkeypatch.chdir(tmp_path)
    scan = str(champion["scans"][0])
    for threshold in ("0.05", "0.95"):
        assert main(["predict", "--model", CHAMPION, "--input", scan, "--output", f"t{threshold}.nii.gz",
                     *tracking(champion), "--set", f"evaluate.threshold={threshold}"]) == 0  # fmt: skip
    np.testing.assert_array_equal(nib.load("t0.05.nii.gz").get_fdata(), nib.load("t0.95.nii.gz").get_fdata())


@pytest.mark.slow
def test_bad_rows_are_named_and_never_take_the_good_rows_down(champion, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["config"].mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cpu"})
    four_d = tmp_path / "series.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.int16), np.eye(4)), four_d)
    rows = [encode_scan(champion["scans"][0]), base64.b64encode(b"not a NIfTI file").decode(), encode_scan(four_d), "%%%"]
    with pytest.raises(MlflowException, match=r"3 of 4 row\(s\).*row 1: cannot read.*row 2: image is 4-D.*row 3:.*base64"):
        model.predict(frame(rows))
    result = model.predict(frame(rows), params={"on_error": "column"})
    good = model.predict(frame(rows[:1]))
    assert result["mask_base64"][0] == good["mask_base64"][0] and result["error"][0] == ""
    for row, problem in ((1, "cannot read"), (2, "4-D"), (3, "base64")):
        assert result["error"][row].startswith(f"row {row}: ") and problem in result["error"][row]
        assert result["mask_base64"][row] == "" and result["organ_voxels"][row] == 0
        assert str(tmp_path) not in result["error"][row] and "/tmp" not in result["error"][row]


def test_device_is_chosen_at_load_time(monkeypatch):
    assert device_preference({"device": "cuda:1"}) == "cuda:1"
    monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cuda")
    assert device_preference({}) == "cuda" and device_preference({"device": "cpu"}) == "cpu"
    monkeypatch.delenv("MLFLOW_DEFAULT_PREDICTION_DEVICE")
    assert device_preference(None) == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")


@pytest.mark.slow
def test_pyfunc_loads_on_the_device_it_is_given(champion, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["config"].mlflow.tracking_uri)
    predictor = mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cpu"}).unwrap_python_model().predictor
    assert predictor.device == torch.device("cpu")
    assert {p.device.type for p in predictor.network.parameters()} == {"cpu"}
    if not torch.cuda.is_available():
        with pytest.raises(Exception, match="CUDA is not available"):
            mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cuda"})
        monkeypatch.setenv("MLFLOW_DEFAULT_PREDICTION_DEVICE", "cuda")  # what MLflow sets on GPU hosts
        with pytest.raises(Exception, match="CUDA is not available"):
            mlflow.pyfunc.load_model(CHAMPION)


@pytest.mark.slow
def test_export_writes_a_model_folder_that_loads_and_predicts_the_same(champion, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "--model", CHAMPION, "--out", "served", *tracking(champion)]) == 0
    assert (tmp_path / "served" / "MLmodel").is_file() and (tmp_path / "served" / "code" / "unet3plus").is_dir()
    rows = frame([encode_scan(champion["scans"][1])])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", champion["config"].mlflow.tracking_uri)
    exported = mlflow.pyfunc.load_model(str(tmp_path / "served"), model_config={"device": "cpu"}).predict(rows)
    registered = mlflow.pyfunc.load_model(CHAMPION, model_config={"device": "cpu"}).predict(rows)
    assert exported["mask_base64"][0] == registered["mask_base64"][0]
    with pytest.raises(UserError, match="not an empty folder"):
        export_model(CHAMPION, tmp_path / "served")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_answers_masks_and_4xx_for_bad_rows(champion, tmp_path):
    port = free_port()
    # mlflow models serve starts `uvicorn` from PATH: the environment's bin folder first, as an activated venv has it.
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["config"].mlflow.tracking_uri, "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", CHAMPION, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    # Its own process group: the server runs its workers as child processes, stopped together below.
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if requests.get(f"{url}/ping", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(1)

        def invoke(rows: list[str]) -> requests.Response:
            return requests.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["nifti_base64"], "data": [[r] for r in rows]}},
                                 timeout=120)  # fmt: skip

        scans = [encode_scan(scan) for scan in champion["scans"]]
        answer = invoke(scans)
        assert answer.status_code == 200, answer.text
        predictions = answer.json()["predictions"]
        for scan_path, prediction in zip(champion["scans"], predictions):
            mask = decode_mask(prediction["mask_base64"])
            assert mask.shape == nib.load(scan_path).shape and prediction["organ_voxels"] == int(np.asanyarray(mask.dataobj).sum())
        malformed = invoke([scans[0], "!!not base64!!"])
        assert malformed.status_code == 400 and "row 1" in malformed.json()["message"], malformed.text
        not_nifti = invoke([base64.b64encode(b"%PDF-1.7 a report, not a scan").decode()])
        assert not_nifti.status_code == 400 and "row 0: cannot read the NIfTI file" in not_nifti.json()["message"]
        raw = requests.post(f"{url}/invocations", data=Path(champion["scans"][1]).read_bytes(),
                            headers={"Content-Type": "application/octet-stream"}, timeout=60)  # fmt: skip
        assert 400 <= raw.status_code < 500, raw.text
        again = invoke(scans[1:])
        assert again.status_code == 200 and again.json()["predictions"][0]["mask_base64"] == predictions[1]["mask_base64"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone if the server failed to start
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
