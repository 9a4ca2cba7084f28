"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repository on a tiny config.

The main models train 15 short epochs (~8 s each organ). That is long enough for the liver to
segment: its test Dice must clear FLOOR, which the same network untrained, and the all-organ guess,
are shown not to reach on the same volumes. The spleen, a few pixels across at 32 x 32 with one
labelled training scan, does not learn at this size (it needs the default 64 px grid: README).
"""

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.data.dataset import SliceDataset
from unet3plus.models import create_model, predict_proba
from unet3plus.tracking import data_hash

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"size": 32, "synth_cases": 4, "synth_size": 48, "synth_slices": 16, "workers": 1},
    "model": {"width": 4},
    "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "max_steps_per_epoch": 2},
    "evaluate": {"batch_size": 16},
    "register": {"min_test_dice": 0.0},  # the spleen does not learn at this size: let both models be champions
}
LEARNS = {"epochs": 15, "max_steps_per_epoch": None}  # this test's main models: long enough to segment
FLOOR = 0.5  # test Dice a trained model clears and an untrained one cannot reach (both measured below)


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["train"].update(LEARNS)
    params["ablations"]["run"] = []  # no ablation stages: the main pipeline runs alone
    return params


def _mean_volume_dice(predict, data_dir: Path) -> float:
    """Mean per-volume Dice of ``predict(images) -> bool masks`` over the processed test slices (plain numpy)."""
    volumes: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for item in SliceDataset(data_dir, "test"):
        predicted = predict(item["image"][None])[0].numpy()
        volumes.setdefault(item["case_id"], []).append((predicted, item["mask"].numpy() > 0.5))
    scores = []
    for slices in volumes.values():
        predicted, truth = np.stack([s[0] for s in slices]), np.stack([s[1] for s in slices])
        total = predicted.sum() + truth.sum()
        scores.append(1.0 if total == 0 else 2.0 * (predicted & truth).sum() / total)
    return float(np.mean(scores))


def _assert_learned(checkpoint: Path, data_dir: Path, test_dice: float) -> None:
    payload = load_checkpoint(checkpoint)
    trained = model_from_checkpoint(payload)
    torch.manual_seed(0)
    untrained = create_model(**{**payload["config"]["model"], "encoder_weights": None}).eval()
    scores = {
        "trained": _mean_volume_dice(lambda x: predict_proba(trained, x) > 0.5, data_dir),
        "untrained": _mean_volume_dice(lambda x: predict_proba(untrained, x) > 0.5, data_dir),
        "all organ": _mean_volume_dice(lambda x: torch.ones_like(x[:, :1], dtype=torch.bool), data_dir),
    }
    assert scores["untrained"] < FLOOR and scores["all organ"] < FLOOR, scores
    assert scores["trained"] >= FLOOR and test_dice >= FLOOR, (scores, test_dice)


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline_for_both_organs(dvc_project):
    project = dvc_project(_tiny_params())
    repo = project.root
    project.run("dvc", "repro")

    for organ, dataset_name in (("liver", "liver"), ("spleen", "spleen")):
        evaluation = repo / "reports" / organ / "evaluation"
        metrics = json.loads((evaluation / "metrics.json").read_text())
        assert metrics["dataset"] == dataset_name
        assert metrics["cases"] >= 1
        if organ == "liver":
            _assert_learned(repo / "models" / organ / "best.pt", repo / "data" / "processed" / organ, metrics["dice"])
        assert 0.0 <= metrics["dice"] <= 1.0
        per_case = pd.read_csv(evaluation / "per_case.csv")
        assert len(per_case) == metrics["cases"]
        predictions = sorted((evaluation / "predictions").glob("*.nii.gz"))
        assert len(predictions) == metrics["cases"]
        processed = json.loads((repo / "data" / "processed" / organ / "cases.json").read_text())
        for prediction in predictions:
            case = processed["cases"][prediction.name.removesuffix(".nii.gz")]
            original = nib.load(repo / "data" / "raw" / organ / case["image"])
            written = nib.load(prediction)
            assert written.shape == original.shape
            np.testing.assert_allclose(written.affine, original.affine, atol=1e-5)
            assert set(np.unique(np.asanyarray(written.dataobj))) <= {0, 1}
        registered = json.loads((repo / "reports" / organ / "registered.json").read_text())
        assert registered["name"] == f"unet3plus-{dataset_name}-synthetic"  # phantom-trained: its own name

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for organ in ("liver", "spleen"):
        champion = client.get_model_version_by_alias(f"unet3plus-{organ}-synthetic", "champion")
        assert champion.tags["data_source"] == "synthetic"
        assert str(champion.version) == "1"
        digest = data_hash(repo / "data" / "processed" / organ)
        assert champion.description.startswith("unet3plus (unet encoder, width 4, DS, CGM, hybrid loss), 15 epochs")
        assert f"on {organ} data {digest[:12]}" in champion.description and "Test: dice " in champion.description

    # a second `dvc repro` does nothing
    again = project.run("dvc", "repro").stdout
    assert "Running stage" not in again and again.count("didn't change, skipping") >= 13, again
