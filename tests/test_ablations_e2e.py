"""End to end: the ablation grid through `dvc repro` of the real dvc.yaml, MLflow and `unet3plus report`.

One tiny `dvc repro` (the module-scoped ``study`` fixture), checked by one named test per promise:
matrix stage names and per-variant params in dvc.lock; one parent run per study with a named
child per variant, datasets and lineage tags, an injected failing variant (a FAILED run with its
error; `--keep-going` finishes the rest); the report's rows, failure mark and plots; the REST API
behind the MLflow UI; and that the rest is then up to date and editing one variant reruns only it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests
import yaml

from tests.conftest import MlflowServer, tiny_params
from unet3plus.config import MlflowConfig
from unet3plus.tracking import data_hash, runs_view_url

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "variants": {"unet": {"model.arch": "unet", "model.deep_supervision": False, "model.cgm": False},
                 # valid settings that fail at run time, during training: the loss or the weights become
                 # NaN or infinite (a TrainingError), which must end as a FAILED run carrying the error
                 "broken": {"train.lr": 1.0e30}},
    "run": ["unet", "broken"],
}


def _run(cmd: list[str], cwd: Path, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _write_params(repo: Path, grid: dict) -> None:
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(ablations=grid), sort_keys=False))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    """One `dvc repro --keep-going report` of the grid in a fresh git + DVC repository, then the report alone."""
    repo = tmp_path_factory.mktemp("ablations") / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    shutil.copytree(ROOT / "unet3plus", repo / "unet3plus", ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "reports" / "ablations").mkdir(parents=True)
    shutil.copy(ROOT / "reports" / "ablations" / "README.md", repo / "reports" / "ablations" / "README.md")
    _write_params(repo, GRID)
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MPLBACKEND": "Agg", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = f"{bin_dir}/dvc"
    _run(["git", "init", "--quiet"], repo, env)
    _run([dvc, "init", "--quiet"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "--quiet", "-m", "grid"], repo, env)
    # the report and everything it needs (registering models is test_pipeline_e2e's)
    failed = _run([dvc, "repro", "--keep-going", "report"], repo, env, ok=False)
    _run([dvc, "repro", "--single-item", "report"], repo, env)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("unet3plus").experiment_id])
    parents = {r.data.tags["dataset"]: r for r in runs if r.data.tags.get("study_parent") == "true"}
    return {"repo": repo, "env": env, "dvc": dvc, "failed": failed, "runs": runs, "parents": parents}


@pytest.mark.slow
def test_dvc_keeps_going_past_the_failing_variant_with_readable_matrix_stages(study):
    failed = study["failed"]
    assert failed.returncode != 0 and "ablate@liver-broken" in failed.stdout + failed.stderr
    # each matrix stage records only its own variant's params
    lock = yaml.safe_load((study["repo"] / "dvc.lock").read_text())["stages"]
    assert {"ablate@liver-unet", "ablate@spleen-unet", "report"} <= set(lock)
    assert "ablate@liver-broken" not in lock
    ablation_params = {k for k in lock["ablate@liver-unet"]["params"]["params.yaml"] if k.startswith("ablations")}
    assert ablation_params == {"ablations.variants.unet"}


@pytest.mark.slow
def test_mlflow_has_one_parent_per_study_and_a_named_child_per_variant_with_lineage(study):
    runs, parents, repo = study["runs"], study["parents"], study["repo"]
    assert sorted(parents) == ["liver", "spleen"]
    for organ in ("liver", "spleen"):
        children = {r.data.tags["ablation"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parents[organ].info.run_id}
        assert sorted(children) == ["broken", "main", "unet"]
        main, unet, broken = children["main"], children["unet"], children["broken"]
        assert main.info.run_name == f"{organ} | unet3plus | unet | DS | CGM | hybrid"
        assert unet.info.run_name == f"{organ} | unet | unet | no DS | no CGM | hybrid"
        assert broken.info.status == "FAILED", broken.data.tags
        assert broken.data.tags["error"].startswith("TrainingError: ") and "Lower train.lr" in broken.data.tags["error"]
        assert broken.data.params["train.lr"] == "1e+30"
        assert unet.info.status == "FINISHED" and 0 <= unet.data.metrics["test_dice"] <= 1
        assert unet.data.tags["dvc_stage"] == f"ablate@{organ}-unet"
        assert main.data.tags["dvc_stage"] == f"train@{organ}"
        assert len(main.data.tags["git_commit"]) == 40 and main.data.tags["git_dirty"] in ("true", "false")
        digest = data_hash(repo / "data" / "processed" / organ)
        inputs = {d.dataset.name: d for d in main.inputs.dataset_inputs}
        assert sorted(inputs) == [f"{organ}-test", f"{organ}-train", f"{organ}-val"]
        assert {d.dataset.digest for d in inputs.values()} == {digest}
        assert {d.dataset.source for d in inputs.values()} == {f'{{"uri": "data/raw/{organ}"}}'}
        assert "test_cgm_roc_auc" in main.data.metrics and "test_fp_organ_free_no_gate" in main.data.metrics


@pytest.mark.slow
def test_the_report_has_both_configurations_per_organ_marks_the_failure_and_draws_the_plots(study):
    repo = study["repo"]
    report = (repo / "reports" / "ablations.md").read_text()
    assert "**FAILED**: TrainingError: " in report and "2 configuration(s) failed" in report
    table = pd.read_csv(repo / "reports" / "ablations.csv")
    finished = table[table["status"] == "ok"]
    assert sorted(zip(finished["dataset"], finished["model"])) == [
        ("liver", "unet"), ("liver", "unet3plus"), ("spleen", "unet"), ("spleen", "unet3plus")]
    assert (table["status"] == "FAILED").sum() == 2
    for name in ("dice_vs_params", "per_case_dice", "overlays_liver", "overlays_spleen"):
        assert (repo / "reports" / "ablations_plots" / f"{name}.png").stat().st_size > 5000, name


@pytest.mark.slow
def test_the_mlflow_ui_api_shows_run_names_datasets_and_grouping(study):
    repo, parents = study["repo"], study["parents"]
    server = MlflowServer(repo)
    server.start()
    try:
        api = f"{server.url}/api/2.0/mlflow"
        experiment_id = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "unet3plus"},
                                     timeout=30).json()["experiment"]["experiment_id"]
        found = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id], "max_results": 100},
                              timeout=30).json()["runs"]
        by_name = {r["info"]["run_name"]: r for r in found}
        child = by_name["liver | unet | unet | no DS | no CGM | hybrid"]
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == parents["liver"].info.run_id
        assert {d["dataset"]["name"] for d in child["inputs"]["dataset_inputs"]} >= {"liver-train", "liver-test"}
        url = runs_view_url(MlflowConfig(tracking_uri=server.url), server.url)
        assert url == f"{server.url}/#/experiments/{experiment_id}?workflowType=machine_learning"
        assert requests.get(url, timeout=30).ok
    finally:
        server.stop()


@pytest.mark.slow
def test_the_rest_is_up_to_date_and_editing_one_variant_reruns_only_it(study):
    """Last in this file: it edits params.yaml."""
    repo, env, dvc = study["repo"], study["env"], study["dvc"]
    broken = ["ablate@liver-broken", "ablate@spleen-broken", "register@liver", "register@spleen"]
    assert sorted(yaml.safe_load(_run([dvc, "status", "--json"], repo, env).stdout)) == broken
    _write_params(repo, {**GRID, "variants": {**GRID["variants"], "unet": {**GRID["variants"]["unet"], "train.seed": 1}}})
    changed = yaml.safe_load(_run([dvc, "status", "--json"], repo, env).stdout)
    assert sorted(changed) == sorted(["ablate@liver-unet", "ablate@spleen-unet", *broken])
