"""End to end: `dvc repro` of the real dvc.yaml in a temporary git repository on a tiny config."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"size": 32, "synth_cases": 4, "synth_size": 48, "synth_slices": 16, "workers": 1},
    "model": {"width": 4},
    "train": {"epochs": 1, "batch_size": 8, "num_workers": 0, "max_steps_per_epoch": 2},
    "evaluate": {"batch_size": 16},
}


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    params["ablations"]["run"] = []  # no ablation stages: the main pipeline runs alone
    return params


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline_for_both_organs(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copytree(ROOT / "unet3plus", repo / "unet3plus", ignore=shutil.ignore_patterns("__pycache__"))
    # tracked in the project, so a checkout has it: the `report` stage depends on reports/ablations
    (repo / "reports" / "ablations").mkdir(parents=True)
    shutil.copy(ROOT / "reports" / "ablations" / "README.md", repo / "reports" / "ablations" / "README.md")
    (repo / "params.yaml").write_text(yaml.safe_dump(_tiny_params(), sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    env.pop("MLFLOW_TRACKING_URI", None)
    _run(["git", "init", "--quiet"], repo, env)
    _run([f"{bin_dir}/dvc", "init", "--quiet"], repo, env)
    _run([f"{bin_dir}/dvc", "repro"], repo, env)

    for organ, dataset_name in (("liver", "liver"), ("spleen", "spleen")):
        evaluation = repo / "reports" / organ / "evaluation"
        metrics = json.loads((evaluation / "metrics.json").read_text())
        assert metrics["dataset"] == dataset_name
        assert metrics["cases"] >= 1
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
        assert registered["name"] == f"unet3plus-{dataset_name}"

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for dataset_name in ("liver", "spleen"):
        champion = client.get_model_version_by_alias(f"unet3plus-{dataset_name}", "champion")
        assert str(champion.version) == "1"
    status = _run([f"{bin_dir}/dvc", "status"], repo, env)
    assert "changed" not in status.stdout, status.stdout
