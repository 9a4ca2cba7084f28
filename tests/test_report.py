"""`unet3plus report`: the paper-style results table rebuilt from real (SQLite-backed) MLflow runs."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from unet3plus.cli import main
from unet3plus.config import Config, MlflowConfig
from unet3plus.errors import UserError
from unet3plus.report import results_table


def log_run(arch: str, dataset: str, dice: float | None, cgm: bool = True) -> None:
    """A run as training + evaluation leave it: the flat config as params, the dataset tag, test metrics."""
    config = Config()
    config.model.arch, config.model.cgm = arch, cgm
    with mlflow.start_run(run_name=f"{arch}-{dataset}"):
        mlflow.log_params(config.flat())
        mlflow.set_tag("dataset", dataset)
        mlflow.log_metric("val_dice", 0.5, step=1)
        if dice is not None:
            mlflow.log_metric("test_dice", dice, step=0)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> MlflowConfig:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("unet3plus")
    log_run("unet3plus", "liver", 0.90)
    log_run("unet3plus", "liver", 0.94)  # a second seed: averaged
    log_run("unet3plus", "spleen", 0.80)
    log_run("unet3plus", "spleen", 0.70, cgm=False)  # an ablation: its own row
    log_run("unet", "liver", 0.85)
    log_run("unetpp", "liver", None)  # trained, never evaluated: not in the table
    return MlflowConfig(tracking_uri="sqlite:///ignored-because-the-environment-wins.db")


def test_one_row_per_configuration_with_mean_test_dice_and_run_count_per_organ(tracking):
    table = results_table(tracking)
    assert list(table.columns[:4]) == ["model", "encoder", "deep supervision", "CGM"]
    assert list(table.columns[-4:]) == ["dice liver", "runs liver", "dice spleen", "runs spleen"]
    rows = {(row.model, row.CGM): row for row in table.itertuples(index=False)}
    assert sorted(rows) == [("unet", "True"), ("unet3plus", "False"), ("unet3plus", "True")]
    full = table[(table.model == "unet3plus") & (table.CGM == "True")].iloc[0]
    assert full["dice liver"] == pytest.approx(0.92) and full["runs liver"] == 2
    assert full["dice spleen"] == pytest.approx(0.80) and full["runs spleen"] == 1
    ablation = table[(table.model == "unet3plus") & (table.CGM == "False")].iloc[0]
    assert pd.isna(ablation["dice liver"]) and ablation["dice spleen"] == pytest.approx(0.70)


def test_cli_prints_markdown_and_writes_csv(tracking, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| model | encoder |") and markdown[1].startswith("|---|")
    assert any("| unet3plus |" in line and "| 0.9200 | 2 | 0.8000 | 1 |" in line for line in markdown)
    assert main(["report", "--out", str(tmp_path / "table.csv")]) == 0
    written = pd.read_csv(tmp_path / "table.csv")
    assert len(written) == 3 and written["dice liver"].max() == pytest.approx(0.92)


def test_no_experiment_or_no_evaluated_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UserError, match="no MLflow tracking store"):  # and a read creates none
        results_table(MlflowConfig(experiment="nothing-here"))
    assert not (tmp_path / "empty.db").exists()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("trained-only")
    with mlflow.start_run():
        mlflow.log_metric("val_dice", 0.3)
    with pytest.raises(UserError, match="no such experiment"):
        results_table(MlflowConfig(experiment="nothing-here"))
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--set", "mlflow.experiment=trained-only", "--out", "table.md"]) == 2
    assert "no evaluated run" in capsys.readouterr().err
    assert not (tmp_path / "table.md").exists()
