"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repository on a tiny config.

The main models train 15 short epochs (~8 s each organ). That is long enough for the liver to
segment: its test Dice must clear FLOOR, which the same network untrained, and the all-organ guess,
are shown not to reach on the same volumes. The spleen, a few pixels across at 32 x 32 with one
labelled training scan, does not learn at this size (it needs the default 64 px grid: README).
One ablation (UNet, two steps) runs next to them. The reproduced repository is shared by the tests
of this module (one `dvc repro`); a test that edits it restores it.
"""

import ast
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import tiny_params
from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.data.dataset import SliceDataset
from unet3plus.models import create_model, predict_proba
from unet3plus.tracking import data_hash

LEARNS = {"epochs": 15, "max_steps_per_epoch": None}  # this test's main models: long enough to segment
FLOOR = 0.5  # test Dice a trained model clears and an untrained one cannot reach (both measured below)


def _tiny_params() -> dict:
    params = tiny_params(train=LEARNS)  # min_test_dice 0: the spleen does not learn here, both models are champions
    variant = params["ablations"]["variants"]["unet"]
    variant.update({"train.epochs": 1, "train.max_steps_per_epoch": 2})  # a cheap ablation stage per organ
    params["ablations"]["run"] = ["unet"]
    return params


@pytest.fixture(scope="module")
def reproduced(dvc_project):
    """The tiny project after `dvc repro`, committed (experiments need a baseline commit)."""
    project = dvc_project(_tiny_params())
    project.run("dvc", "repro")
    project.run("git", "add", "-A")
    project.run("git", "commit", "--quiet", "-m", "tiny pipeline")
    return project


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
def test_dvc_repro_runs_the_whole_pipeline_for_both_organs(reproduced):
    project = reproduced
    repo = project.root

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


# -- nothing goes stale (issue 16.5) and tracking settings are not model inputs (16.6), for real ----------

def _stale(project) -> set[str]:
    """The stages `dvc status` reports as changed."""
    return set(json.loads(project.run("dvc", "status", "--json").stdout or "{}"))


def _edit_function(path: Path, name: str) -> None:
    """Insert a statement at the top of function ``name``'s body (after its docstring): an edit of that function."""
    lines = path.read_text().splitlines(keepends=True)
    function = next(node for node in ast.walk(ast.parse("".join(lines)))
                    if isinstance(node, ast.FunctionDef) and node.name == name)
    first = function.body[1] if ast.get_docstring(function) else function.body[0]
    lines.insert(first.lineno - 1, " " * first.col_offset + "edited = True  # noqa\n")
    path.write_text("".join(lines))


@pytest.mark.slow
def test_edits_that_change_results_make_their_stages_stale_and_tracking_settings_do_not(reproduced):
    project = reproduced
    assert _stale(project) == set()
    models = {"train@liver", "train@spleen", "ablate@liver-unet", "ablate@spleen-unet"}

    # Tracking settings: where runs go is not what a model is.
    tracking = yaml.safe_load((project.root / "params.yaml").read_text())
    tracking["mlflow"].update({"experiment": "renamed", "system_metrics": True})
    (project.root / "params.yaml").write_text(yaml.safe_dump(tracking, sort_keys=False))
    stale = _stale(project)
    assert stale == {"register@liver", "register@spleen", "report"}, stale  # they do read the store
    project.run("git", "checkout", "params.yaml")

    _edit_function(project.root / "unet3plus" / "metrics.py", "dice")  # picks best.pt; scores every evaluation
    stale = _stale(project)
    assert models | {"evaluate@liver", "evaluate@spleen"} <= stale, stale
    project.run("git", "checkout", "unet3plus/metrics.py")

    _edit_function(project.root / "unet3plus" / "data" / "geometry.py", "restore_volume")  # predictions -> scan grid
    stale = _stale(project)
    assert {"evaluate@liver", "evaluate@spleen", "ablate@liver-unet", "ablate@spleen-unet"} <= stale, stale
    assert not {"train@liver", "train@spleen"} & stale, stale  # training does not use it
    project.run("git", "checkout", "unet3plus/data/geometry.py")
    assert _stale(project) == set()

    # `dvc exp run --temp` runs in a throw-away copy under .dvc/tmp/exps/; its MLflow runs still land in
    # the project's store (the relative sqlite:///mlflow.db anchored at the DVC root), artifacts included.
    project.run("dvc", "exp", "run", "--temp", "-S", "train.seed=1", "-S", "mlflow.experiment=temp-exp", "train@liver")
    client = mlflow.MlflowClient(f"sqlite:///{project.root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("temp-exp")
    assert experiment is not None, "the experiment's runs went to a store in the temporary copy"
    artifacts = Path(unquote(urlparse(experiment.artifact_location).path))
    assert artifacts == project.root / "mlruns" / "temp-exp"
    [run] = client.search_runs([experiment.experiment_id], "tags.ablation = 'main'")
    assert run.info.status == "FINISHED" and run.data.params["train.seed"] == "1"
    assert run.data.tags["data_source"] == "synthetic"
    assert (artifacts / run.info.run_id / "artifacts" / "history.csv").is_file()
