"""evaluate(): per-volume scores in the original voxel grid, its files, MLflow logging and bad input."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from unet3plus.checkpoint import save_checkpoint
from unet3plus.config import Config, DataConfig, config_from_dict
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.device import cpu_name
from unet3plus.errors import CheckpointError, DataError
from unet3plus.evaluate import (
    OVERLAY_ALPHA,
    OVERLAY_COLOURS,
    cgm_roc_curve,
    digest_test_set,
    evaluate,
    largest_organ_slice,
    overlay_rgb,
)
from unet3plus.models import create_model
from unet3plus.tracking import data_hash
from unet3plus.utils import OUTPUTS_RECORD

SUMMARY_KEYS = {"dice", "iou", "precision", "recall", "hd95", "assd", "dice_no_gate", "cases", "dataset"}
PER_CASE_KEYS = {"case_id", "dice", "iou", "precision", "recall", "hd95", "assd", "dice_no_gate"}


def tiny_config(tmp_path: Path) -> Config:
    return config_from_dict({
        "data": {"size": 32, "workers": 1},
        "model": {"width": 4, "deep_supervision": False},
        "evaluate": {"batch_size": 5, "device": "cpu", "overlays": 1},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False},
    })  # fmt: skip


def write_tiny_checkpoint(path: Path, config: Config, organ_verdict: str, run_id: str | None = None,
                          trained_on: Path | None = None) -> Path:
    """An untrained width-4 network whose CGM always answers ``organ_verdict`` ("present"/"absent"), "trained" on
    the preprocessed dataset ``trained_on`` (its data hash)."""
    torch.manual_seed(0)
    model = create_model(**dataclasses.asdict(config.model))
    with torch.no_grad():
        model.cgm.conv.weight.zero_()
        model.cgm.conv.bias.copy_(torch.tensor([-5.0, 5.0] if organ_verdict == "present" else [5.0, -5.0]))
    payload = {"model": model.state_dict(), "config": config.to_dict(), "dataset": "liver", "epoch": 0, "mlflow_run_id": run_id}
    if trained_on is not None:
        payload["data_hash"] = data_hash(trained_on)
    return save_checkpoint(path, payload)


def numpy_dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(2 * (a * b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Six synthetic LiTS cases (two in the paper's test range 0-27), preprocessed at 32 x 32."""
    root = tmp_path_factory.mktemp("evaluate_data")
    write_dataset("lits", root / "raw", cases=6, seed=3, size=48, slices=12)
    preprocess_dataset("lits", root / "raw", root / "processed", DataConfig(size=32, workers=1))
    return root / "raw", root / "processed"


@pytest.fixture(scope="module")
def evaluated(dataset, tmp_path_factory) -> dict:
    """One evaluation with a CGM that always says "organ present", logged to a real training run."""
    raw, processed = dataset
    root = tmp_path_factory.mktemp("evaluated")
    config = tiny_config(root)
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    # An explicit artifact location keeps MLflow's default ./mlruns out of the working directory.
    experiment_id = client.create_experiment(config.mlflow.experiment, artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment_id, tags={"role": "training"}).info.run_id
    client.set_terminated(run_id)
    checkpoint = write_tiny_checkpoint(root / "best.pt", config, "present", run_id=run_id, trained_on=processed)
    summary = evaluate(config, checkpoint, processed, raw, root / "out")
    return {"summary": summary, "out": root / "out", "config": config, "run_id": run_id, "raw": raw,
            "processed": processed, "checkpoint": checkpoint}


def test_evaluate_writes_metrics_per_case_predictions_and_overlays(evaluated):
    out, summary = evaluated["out"], evaluated["summary"]
    cases = json.loads((evaluated["processed"] / "cases.json").read_text())["cases"]
    test_ids = sorted(case_id for case_id, entry in cases.items() if entry["split"] == "test")
    assert len(test_ids) == 2
    assert SUMMARY_KEYS <= set(summary)
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert summary["cases"] == 2 and summary["dataset"] == "liver"
    assert summary["device"] == f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"  # where it ran, also a run tag
    # The CGM's ROC for the KFP ClassificationMetrics artifact: its area is the AUC in metrics.json.
    roc = pd.read_csv(out / "cgm_roc.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold"] and roc["threshold"].le(1.0).all()
    assert np.trapezoid(roc["tpr"], roc["fpr"]) == pytest.approx(summary["cgm_roc_auc"], abs=1e-12)
    per_case = pd.read_csv(out / "per_case.csv", dtype={"case_id": str})
    assert PER_CASE_KEYS <= set(per_case.columns)
    assert sorted(per_case["case_id"]) == test_ids
    assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"{c}.nii.gz" for c in test_ids]
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 2 and overlays[0].startswith("best_1_") and overlays[1].startswith("worst_1_")
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [OUTPUTS_RECORD], "temporary files left behind"
    assert sorted(json.loads((out / OUTPUTS_RECORD).read_text())) == sorted(  # what a rerun may replace
        ["metrics.json", "per_case.csv", "cgm_roc.csv", *(f"predictions/{c}.nii.gz" for c in test_ids),
         *(f"overlays/{o}" for o in overlays)]
    )


def test_per_case_numbers_equal_an_independent_dice_of_the_written_predictions(evaluated):
    out, raw = evaluated["out"], evaluated["raw"]
    cases = json.loads((evaluated["processed"] / "cases.json").read_text())["cases"]
    per_case = pd.read_csv(out / "per_case.csv", dtype={"case_id": str}).set_index("case_id")
    for case_id, row in per_case.iterrows():
        original = nib.load(raw / cases[case_id]["image"])
        label = np.isin(np.asanyarray(nib.load(raw / cases[case_id]["label"]).dataobj), (1, 2))
        written = nib.load(out / "predictions" / f"{case_id}.nii.gz")
        prediction = np.asanyarray(written.dataobj)
        assert written.shape == original.shape
        np.testing.assert_array_equal(written.affine, original.affine)
        assert prediction.dtype == np.uint8 and set(np.unique(prediction)) <= {0, 1}
        assert 0 < prediction.mean() < 1, "an untrained network should give a non-trivial mask"
        assert row["dice"] == pytest.approx(numpy_dice(prediction, label), rel=1e-12)
        # The CGM always says "present", so the gate changes nothing.
        assert row["dice_no_gate"] == pytest.approx(row["dice"], rel=1e-12)
    assert evaluated["summary"]["dice"] == pytest.approx(per_case["dice"].mean(), rel=1e-12)


def test_metrics_are_logged_to_the_training_run(evaluated):
    client = mlflow.MlflowClient(evaluated["config"].mlflow.tracking_uri)
    run = client.get_run(evaluated["run_id"])
    assert run.data.tags["role"] == "training"
    assert run.data.metrics["test_dice"] == pytest.approx(evaluated["summary"]["dice"])
    logged = {item.path for item in client.list_artifacts(evaluated["run_id"], "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/per_case.csv", "evaluation/overlays"} <= logged


def test_evaluating_on_other_data_is_a_separate_run_and_leaves_the_training_run_alone(dataset, evaluated, tmp_path):
    """Issue 20: evaluating a checkpoint on other data overwrote its training run's test_dice."""
    raw, _ = dataset
    other = tmp_path / "other"  # the same scans split otherwise: another dataset (another data hash)
    preprocess_dataset("lits", raw, other, DataConfig(size=32, workers=1, val_fraction=0.4))
    config, run_id = evaluated["config"], evaluated["run_id"]
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    summary = evaluate(config, evaluated["checkpoint"], other, raw, tmp_path / "out")
    assert summary["data_hash"] == data_hash(other) != data_hash(evaluated["processed"])
    assert len(client.get_metric_history(run_id, "test_dice")) == 1  # only the evaluation on its own test split
    assert client.get_run(run_id).data.tags["processed_dir"] == str(evaluated["processed"].resolve())
    [separate] = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.evaluates = '{run_id}'")
    assert separate.data.tags["data_hash"] == data_hash(other) and "ablation" not in separate.data.tags
    assert separate.data.metrics["test_dice"] == pytest.approx(summary["dice"])
    assert separate.data.tags["processed_dir"] == str(other.resolve())


def test_the_cgm_roc_curve_matches_the_hand_computed_one():
    """scikit-learn's documented example: scores 0.1, 0.4, 0.35, 0.8 for classes 0, 0, 1, 1."""
    roc = cgm_roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert roc["fpr"].tolist() == [0.0, 0.0, 0.5, 0.5, 1.0]
    assert roc["tpr"].tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert roc["threshold"].tolist() == [1.0, 0.8, 0.4, 0.35, 0.1]  # the first, infinity, written as 1.0


def test_a_cgm_that_sees_no_organ_empties_the_gated_masks_only(dataset, evaluated, tmp_path):
    raw, processed = dataset
    config = evaluated["config"]
    checkpoint = write_tiny_checkpoint(tmp_path / "absent.pt", config, "absent")
    summary = evaluate(config, checkpoint, processed, raw, tmp_path / "out")
    per_case = pd.read_csv(tmp_path / "out" / "per_case.csv", dtype={"case_id": str})
    # Every test case has liver, so empty predictions score 0 and have no surface distance (NaN, empty cell).
    assert (per_case["dice"] == 0).all() and (per_case["predicted_voxels"] == 0).all()
    assert per_case["hd95"].isna().all() and per_case["assd"].isna().all()
    assert summary["hd95"] is None and summary["hd95_cases"] == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["assd"] is None
    # Without the gate the same network gives the same masks as the "present" run.
    assert summary["dice_no_gate"] == pytest.approx(evaluated["summary"]["dice_no_gate"], rel=1e-12)


def test_tracking_failure_and_a_preprocessing_mismatch_are_warnings(dataset, evaluated, tmp_path, caplog):
    raw, processed = dataset
    (tmp_path / "not_a_folder").write_text("a file where the tracking store's folder should be")
    unusable = f"sqlite:///{tmp_path / 'not_a_folder' / 'm.db'}"
    config = dataclasses.replace(evaluated["config"], mlflow=dataclasses.replace(evaluated["config"].mlflow, tracking_uri=unusable))
    # The checkpoint also claims another slice size than the data have: a warning, the samples are used as they are.
    claims_64 = dataclasses.replace(config, data=dataclasses.replace(config.data, size=64))
    checkpoint = write_tiny_checkpoint(tmp_path / "best.pt", claims_64, "present", run_id="0123456789abcdef")
    with caplog.at_level(logging.WARNING):
        summary = evaluate(config, checkpoint, processed, raw, tmp_path / "out")
    assert summary["dice"] == pytest.approx(evaluated["summary"]["dice"], rel=1e-12)
    assert "MLflow tracking failed" in caplog.text
    assert "records data.size = [64]" in caplog.text and "preprocessed with [32]" in caplog.text


def test_missing_or_corrupt_checkpoint_is_a_checkpoint_error_naming_it(dataset, tmp_path):
    raw, processed = dataset
    config = tiny_config(tmp_path)
    missing = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="nope.pt"):
        evaluate(config, missing, processed, raw, tmp_path / "out")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        evaluate(config, corrupt, processed, raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_wrong_raw_folder_is_a_data_error_before_anything_is_written(dataset, tmp_path):
    _, processed = dataset
    config = tiny_config(tmp_path)
    checkpoint = write_tiny_checkpoint(tmp_path / "best.pt", config, "present")
    (tmp_path / "empty_raw").mkdir()
    with pytest.raises(DataError, match="segmentation-"):
        evaluate(config, checkpoint, processed, tmp_path / "empty_raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_overlay_colours_follow_the_paper():
    grey = np.full((2, 2), 0.5)
    prediction = np.array([[True, False], [True, False]])
    target = np.array([[True, True], [False, False]])
    rgb = overlay_rgb(grey, prediction, target)
    expected = {(0, 0): "true positive", (0, 1): "false negative", (1, 0): "false positive"}
    for (row, col), name in expected.items():
        np.testing.assert_allclose(rgb[row, col], (1 - OVERLAY_ALPHA) * 0.5 + OVERLAY_ALPHA * np.array(OVERLAY_COLOURS[name]))
    np.testing.assert_allclose(rgb[1, 1], [0.5, 0.5, 0.5])
    assert OVERLAY_COLOURS["true positive"][0] > OVERLAY_COLOURS["true positive"][1]  # pink: red-heavy
    assert min(OVERLAY_COLOURS["false negative"][:2]) > 0.9  # yellow: red + green
    assert OVERLAY_COLOURS["false positive"][1] > max(OVERLAY_COLOURS["false positive"][0::2])  # green


def test_overlay_slice_is_the_largest_organ_area():
    target = np.zeros((4, 4, 5), dtype=bool)
    target[:2, :2, 1] = True
    target[:3, :3, 3] = True
    prediction = np.zeros_like(target)
    prediction[:, :, 4] = True
    assert largest_organ_slice(target, prediction) == 3
    assert largest_organ_slice(np.zeros_like(target), prediction) == 4
    assert largest_organ_slice(np.zeros_like(target), np.zeros_like(target)) == 2



def test_the_digest_test_set_names_the_test_cases_and_their_label_contents(tmp_path):
    """register compares versions only on the same test set: same cases, byte-identical labels."""
    for case in ("3", "7", "9"):
        (tmp_path / f"segmentation-{case}.nii").write_bytes(case.encode() * 100)
    metadata = {"cases": {case: {"label": f"segmentation-{case}.nii"} for case in ("3", "7", "9")}}
    rows = pd.DataFrame({"case_id": ["7", "3", "3", "7"]})  # one row per slice, any order
    digest = digest_test_set(rows, metadata, tmp_path)
    assert len(digest) == 64 and digest == digest_test_set(rows.iloc[::-1], metadata, tmp_path)
    assert digest_test_set(pd.DataFrame({"case_id": ["3", "7", "9"]}), metadata, tmp_path) != digest  # another case
    (tmp_path / "segmentation-7.nii").write_bytes(b"7" * 99 + b"8")  # a corrected label
    assert digest_test_set(rows, metadata, tmp_path) != digest
