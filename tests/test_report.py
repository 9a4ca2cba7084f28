"""`unet3plus report`: the ablation tables rebuilt from real (SQLite-backed) MLflow runs made by the tracking helpers."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import mlflow
import pandas as pd
import pytest

from tests.conftest import sqlite_uri
from unet3plus import tracking
from unet3plus.cli import main
from unet3plus.config import Config, ablation_config, apply_overrides, config_from_dict
from unet3plus.errors import ConfigError, UserError
from unet3plus.report import (
    README_BEGIN,
    README_END,
    collect_runs,
    configuration_table,
    load_spread,
    order_note,
    parameter_count,
    replace_readme_block,
    write_report,
)
from unet3plus.train import train

GRID = {"variants": {"unet": {"model.arch": "unet", "model.deep_supervision": False, "model.cgm": False},
                     "broken": {"model.width": 2}, "dropped": {"model.width": 3}, "never": {"loss.iou_weight": 0}},
        "run": ["unet", "broken", "never"]}


def log_training(base: Config, variant: str, dataset: str, digest: str, dice: float | None, seed: int = 0,
                 fail: bool = False, changes: tuple[str, ...] = ()) -> None:
    """A training run as `train` + `evaluate` leave it: child of the study parent, tagged, test metrics.

    ``changes``: ``section.key=value`` applied to the base (another study) when ``variant`` is main, else to
    the variant (an earlier definition of it, same study).
    """
    if variant == "main":
        base = config = apply_overrides(base, list(changes))
    else:
        config = apply_overrides(ablation_config(base, base.ablations.get(variant)), list(changes))
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
    # Issue 20: none of these may change what the report shows for the configuration above.
    log_training(config, "main", "liver", "d1", 0.11, changes=("train.lr=0.5",))  # a stray train --set: its own study
    log_training(config, "main", "spleen", "d2", 0.33, changes=("model.width=16",))  # a newer study, other widths
    log_training(config, "unet", "liver", "d1", 0.22, changes=("model.width=4",))  # an earlier definition of unet


def test_the_study_of_the_parameters_latest_run_per_variant_and_seed_with_mean_spread_and_failures(base):
    collected = collect_runs(base)
    runs = collected.runs
    assert sorted(zip(runs["dataset"], runs["ablation"])) == [
        ("liver", "broken"), ("liver", "main"), ("liver", "main"), ("liver", "unet"), ("spleen", "main")]
    study = tracking.study_name("liver", "d1", base)
    assert collected.studies["liver"].startswith(f"liver: study `{study}` (data hash d1, the settings given), started ")
    assert "2 other studies of this organ not shown" in collected.studies["liver"]  # old-data and the stray lr
    assert collected.studies["spleen"].startswith(f"spleen: study `{tracking.study_name('spleen', 'd2', base)}`")
    table = configuration_table(collected).set_index(["dataset", "variant"])
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
    assert table.loc[("spleen", "main"), "dice_mean"] == pytest.approx(0.80)  # not the newer width-16 study's
    # Every name of ablations.run has a row per organ: a variant never trained (or not in this organ's study) says so.
    assert table.loc[("liver", "never"), "status"] == table.loc[("spleen", "unet"), "status"] == "not run"
    assert table.loc[("liver", "never"), "loss"] == "focal+ms-ssim"  # described from the parameters


def test_parameters_without_a_study_show_every_name_as_not_run_and_say_why(base):
    other = apply_overrides(base, ["train.epochs=3"])
    collected = collect_runs(other)
    assert collected.runs.empty
    table = configuration_table(collected)
    assert len(table) == 8 and set(table["status"]) == {"not run"}
    assert "liver: no study of the settings given" in collected.studies["liver"]
    assert "train.epochs (20 there, 3 here)" in collected.studies["liver"]
    # A seed is a repeat within the study, not another study: the main model's seeds are averaged above.
    assert tracking.params_hash(apply_overrides(base, ["train.seed=5"])) == tracking.params_hash(base)


def test_a_variant_that_fails_before_training_is_a_failed_row_with_its_error(tiny_dataset, tmp_path, monkeypatch):
    """Issue 20: a missing weights file failed before the variant's run existed, and the report omitted it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    grid = {"variants": {"vgg": {"model.encoder": "vgg16", "model.encoder_weights": str(tmp_path / "absent.pth")}},
            "run": ["vgg"]}
    config = config_from_dict({"ablations": grid, "mlflow": {"system_metrics": False}})
    with pytest.raises(ConfigError, match="file not found"):
        train(ablation_config(config, config.ablations.get("vgg")), tiny_dataset.processed, tmp_path / "out",
              ablation="vgg", base=config)
    table = configuration_table(collect_runs(config)).set_index("variant")
    assert table.loc["vgg", "status"] == "FAILED" and "absent.pth': file not found" in table.loc["vgg", "error"]
    assert table.loc["main", "status"] == "not run" and not (tmp_path / "out").exists()


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
    assert "dropped" not in report and not any(f"{dice:.4f}" in report for dice in (0.10, 0.11, 0.22, 0.33))
    assert f"- liver: study `{tracking.study_name('liver', 'd1', base)}`" in report
    [missing] = [line for line in report.splitlines() if line.startswith("**4 configuration(s) not run**: ")]
    assert all(name in missing for name in ("liver never", "spleen unet", "spleen broken", "spleen never"))
    csv = pd.read_csv(tmp_path / "reports" / "ablations.csv")
    assert len(csv) == 8 and set(csv["status"]) == {"ok", "FAILED", "not run"}
    assert (tmp_path / "reports" / "ablations_plots" / "dice_vs_params.png").stat().st_size > 5000
    text = readme.read_text()
    assert "stale table" not in text and text.startswith("# x\n\nbefore\n") and text.endswith(f"{README_END}\nafter\n")
    block = text.split(README_BEGIN)[1].split(README_END)[0]
    assert "| liver | 2 | 0.940 |" in block  # the latest main run of the liver study
    # Regenerating from the same runs gives the same README: the block is a function of the runs.
    write_report(base, tmp_path / "reports" / "ablations.md", readme=readme)
    assert readme.read_text() == text


def test_readme_block_names_date_and_device_and_shows_the_benchmarks_spread(base, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    spread = tmp_path / "bench_recipe.json"
    summary = [{"organ": "liver", "model": "main", "runs": 6, "min": 0.901, "mean": 0.92, "std": 0.011, "max": 0.93},
               {"organ": "liver", "model": "unet", "runs": 6, "min": 0.8, "mean": 0.85, "std": 0.02, "max": 0.87}]
    spread.write_text(json.dumps({"date": "2026-12-03", "cpu": "Some CPU", "seeds": [0, 1, 2], "threads": [1, 2],
                                  "summary": summary}))
    write_report(base, tmp_path / "reports" / "ablations.md", readme=readme, spread=spread)
    block = readme.read_text()
    assert re.search(r"Runs of \d{4}-\d{2}-\d{2}, trained on an unrecorded device\.", block)  # no device tag logged
    assert "2026-12-03, Some CPU: seeds 0, 1, 2 x torch threads 1, 2" in block
    assert "| main | UNet 3+ | 0.901 / 0.920 ± 0.011 (n=6) | not measured |" in block
    # liver: UNet 0.85 < UNet 3+ 0.92 (mean of 0.90 and 0.94), a step larger than either spread
    assert "- liver: UNet w/o DS 0.850 < UNet 3+ 0.920: the paper's order, every step larger than" in block
    spread.write_text("{}")
    with pytest.raises(UserError, match="bench_recipe.json: not a bench_recipe.py summary"):
        load_spread(spread)


def _ablation_table(dice: dict[str, float]) -> pd.DataFrame:
    models = {"unet": ("unet", False), "unet2plus": ("unet2plus", True), "unet3plus_no_ds": ("unet3plus", False),
              "main": ("unet3plus", True)}
    return pd.DataFrame([{"dataset": "spleen", "variant": name, "model": models[name][0], "DS": models[name][1],
                          "dice_mean": value, "status": "ok"} for name, value in dice.items()])


@pytest.mark.parametrize("dice, std, verdict", [
    ((0.80, 0.85, 0.88, 0.90), 0.01, "the paper's order, every step larger than the measured spread"),
    ((0.80, 0.85, 0.88, 0.90), 0.025, "the paper's order, but some steps are within the measured spread"),
    ((0.80, 0.85, 0.91, 0.90), 0.001, "not the paper's order"),
])
def test_the_ablation_order_is_claimed_only_beyond_the_measured_spread(dice, std, verdict):
    table = _ablation_table(dict(zip(("unet", "unet2plus", "unet3plus_no_ds", "main"), dice)))
    spread = {("spleen", name): {"std": std} for name in table["variant"]}
    note = order_note(table, spread)
    assert note.startswith("- spleen: UNet w/o DS 0.800 < UNet++ 0.850 ") and f": {verdict}" in note
    assert ("no spread was measured" in order_note(table, {})) == verdict.startswith("the paper's order")


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
        collect_runs(base)
