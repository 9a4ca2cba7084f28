"""`unet3plus report`: the ablation tables rebuilt from real (SQLite-backed) MLflow runs made by the tracking helpers."""

from __future__ import annotations

import dataclasses
import math

import mlflow
import pandas as pd
import pytest

from unet3plus import tracking
from unet3plus.cli import main
from unet3plus.config import Config, ablation_config, config_from_dict
from unet3plus.errors import UserError
from unet3plus.report import (
    README_BEGIN,
    README_END,
    collect_runs,
    configuration_table,
    parameter_count,
    replace_readme_block,
    write_report,
)

GRID = {"variants": {"unet": {"model.arch": "unet", "model.deep_supervision": False, "model.cgm": False},
                     "broken": {"model.width": 2}, "dropped": {"model.width": 3}},
        "run": ["unet", "broken"]}


def log_training(base: Config, variant: str, dataset: str, digest: str, dice: float | None, seed: int = 0,
                 fail: bool = False) -> None:
    """A training run as `train` + `evaluate` leave it: child of the study parent, tagged, test metrics."""
    config = base if variant == "main" else ablation_config(base, base.ablations.get(variant))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    parent = tracking.study_parent(base.mlflow, dataset, digest, base)
    try:
        with tracking.open_run(base.mlflow, run_name=tracking.run_name(config, dataset), params=config.flat(),
                               tags={"dataset": dataset, "ablation": variant}, parent_run_id=parent) as run:
            if fail:
                raise MemoryError("CUDA out of memory (simulated)")
            if dice is not None:
                run.log_metrics({"test_dice": dice, "test_cases": 2}, step=0)
    except MemoryError:
        pass


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A tracking store holding two studies' runs (made once: logging runs is the slow part)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('report') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        _log_runs(config_from_dict({"ablations": GRID, "mlflow": {"system_metrics": False}}))
    return uri


@pytest.fixture
def base(store, monkeypatch) -> Config:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return config_from_dict({"ablations": GRID, "mlflow": {"system_metrics": False}})


def _log_runs(config: Config) -> None:
    log_training(config, "main", "liver", "old-data", 0.10)  # an older study: not reported
    for seed, dice in ((0, 0.90), (1, 0.94)):  # two seeds: mean and spread
        log_training(config, "main", "liver", "d1", dice, seed=seed)
    log_training(config, "unet", "liver", "d1", 0.50)
    log_training(config, "unet", "liver", "d1", 0.85)  # rerun after an edit: the latest counts
    log_training(config, "broken", "liver", "d1", None, fail=True)
    log_training(config, "dropped", "liver", "d1", 0.99)  # not in ablations.run: not reported
    log_training(config, "main", "spleen", "d2", 0.80)


def test_latest_study_latest_run_per_variant_and_seed_with_mean_spread_and_failures(base):
    runs = collect_runs(base.mlflow, base.ablations.run)
    assert sorted(zip(runs["dataset"], runs["ablation"])) == [
        ("liver", "broken"), ("liver", "main"), ("liver", "main"), ("liver", "unet"), ("spleen", "main")]
    table = configuration_table(runs).set_index(["dataset", "variant"])
    main_liver = table.loc[("liver", "main")]
    assert main_liver["dice_mean"] == pytest.approx(0.92)
    assert main_liver["dice_std"] == pytest.approx(pd.Series([0.90, 0.94]).std()) and main_liver["seeds"] == 2
    assert table.loc[("liver", "unet"), "dice_mean"] == pytest.approx(0.85)
    assert table.loc[("liver", "unet"), "params_m"] == pytest.approx(
        parameter_count({"arch": "unet", "encoder": "unet", "deep_supervision": False, "cgm": False,
                         "in_channels": 3, "num_classes": 1, "width": 64}))
    broken = table.loc[("liver", "broken")]
    assert broken["status"] == "FAILED" and "out of memory" in broken["error"] and math.isnan(broken["dice_mean"])
    assert table.loc[("spleen", "main"), "paper_params_m"] == 26.97


def test_parameter_counts_are_the_papers_at_width_64():
    model = {"encoder": "unet", "deep_supervision": False, "cgm": False, "in_channels": 3, "num_classes": 1,
             "width": 64}
    counts = {arch: parameter_count({**model, "arch": arch}) for arch in ("unet", "unet2plus", "unet3plus")}
    assert counts == pytest.approx({"unet": 39.39, "unet2plus": 47.18, "unet3plus": 26.97}, abs=0.005)


def test_write_report_tables_plots_and_readme_block(base, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{README_BEGIN}\nstale table\n{README_END}\nafter\n")
    write_report(base, tmp_path / "reports" / "ablations.md", readme=readme)
    report = (tmp_path / "reports" / "ablations.md").read_text()
    assert "| main | UNet 3+ |" in report and "0.9200 ± 0.0283 (n=2)" in report
    assert "**FAILED**: MemoryError: CUDA out of memory" in report and "1 configuration(s) failed" in report
    assert "dropped" not in report and "0.1000" not in report
    csv = pd.read_csv(tmp_path / "reports" / "ablations.csv")
    assert len(csv) == 4 and set(csv["status"]) == {"ok", "FAILED"}
    assert (tmp_path / "reports" / "ablations_plots" / "dice_vs_params.png").stat().st_size > 5000
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    block = text.split(README_BEGIN)[1].split(README_END)[0]
    assert "| liver | 2 | 0.940 |" in block  # the latest main run of the liver study
    # Regenerating from the same runs gives the same README: the block is a function of the runs.
    write_report(base, tmp_path / "reports" / "ablations.md", readme=readme)
    assert readme.read_text() == text


def test_readme_without_markers_is_refused_before_anything_is_written(base, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="needs exactly one"):
        write_report(base, tmp_path / "out" / "ablations.md", readme=readme)
    assert not (tmp_path / "out").exists() and readme.read_text() == "no markers\n"
    assert replace_readme_block(f"a{README_BEGIN}b{README_END}c", "new\n") == f"a{README_BEGIN}\nnew\n{README_END}c"


def test_cli_prints_markdown_and_refuses_an_empty_store(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f"ablations: {GRID}\n".replace("'", '"'))
    assert main(["report"]) == 0
    assert "## Table 1" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    assert main(["report", "--out", "table.md"]) == 2
    assert "no MLflow tracking store" in capsys.readouterr().err
    assert not (tmp_path / "empty.db").exists()  # a read creates no store
    assert not (tmp_path / "table.md").exists()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(UserError, match="no training run"):
        mlflow.set_experiment("unet3plus")
        collect_runs(base.mlflow)
