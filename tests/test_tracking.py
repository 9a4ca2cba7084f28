"""tracking.py: MLflow runs that never break the caller, and the reproducibility tags."""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow
import pytest
import yaml

from unet3plus import tracking
from unet3plus.cli import main
from unet3plus.config import MlflowConfig
from unet3plus.errors import UserError
from unet3plus.utils import redact

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def store(in_sqlite_store) -> MlflowConfig:
    """The module's SQLite tracking store (conftest.py), the test running in its folder."""
    return MlflowConfig(tracking_uri=in_sqlite_store, experiment="tests", system_metrics=False)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_configure_uses_the_config_unless_the_environment_names_a_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first, second = (MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / name}") for name in ("a.db", "b.db"))
    assert tracking.configure(first) == first.tracking_uri == mlflow.get_tracking_uri()
    # MLflow exports the URI it is given; that must not pin later configurations in this process.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.configure(second) == second.tracking_uri == mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    assert tracking.configure(first) == f"sqlite:///{tmp_path / 'env.db'}" == mlflow.get_tracking_uri()


def test_configure_caps_http_retries_but_keeps_the_users_own_settings(tmp_path, monkeypatch):
    for name in tracking.HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    tracking.configure(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'a.db'}"))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 2


def test_git_commit_reads_head_of_the_repository_and_none_outside(tmp_path, monkeypatch):
    monkeypatch.delenv("UNET3PLUS_GIT_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    (repo / "file.txt").write_text("x")
    subprocess.run([*git, "add", "file.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], cwd=repo, check=True)
    head = (repo / ".git" / "refs" / "heads" / "main").read_text().strip()  # independent of rev-parse
    assert tracking.git_commit(repo) == head and len(head) == 40
    (tmp_path / "plain").mkdir()
    assert tracking.git_commit(tmp_path / "plain") is None
    # In the project's image (no .git) the commit it was built from; a checkout still wins.
    monkeypatch.setenv("UNET3PLUS_GIT_COMMIT", "f" * 40)
    assert tracking.git_commit(tmp_path / "plain") == "f" * 40
    assert tracking.git_commit(repo) == head


def test_data_hash_is_the_md5_of_manifest_and_cases_and_changes_with_them(tmp_path):
    (tmp_path / "manifest.csv").write_text("case_id,slice_index\n1,0\n")
    (tmp_path / "cases.json").write_text('{"fingerprint": "abc"}')
    expected = hashlib.md5(b'case_id,slice_index\n1,0\n{"fingerprint": "abc"}').hexdigest()
    assert tracking.data_hash(tmp_path) == expected == tracking.data_hash(tmp_path)
    (tmp_path / "cases.json").write_text('{"fingerprint": "abd"}')
    assert tracking.data_hash(tmp_path) != expected


def test_dvc_hash_comes_from_the_dvc_lock_entry_of_the_data_directory(tmp_path):
    data = tmp_path / "data" / "processed" / "liver"
    data.mkdir(parents=True)
    assert tracking.dvc_hash(data) is None  # no dvc.lock anywhere above
    stages = {
        f"preprocess@{organ}": {"cmd": "x", "outs": [{"path": f"data/processed/{organ}", "hash": "md5", "md5": md5}]}
        for organ, md5 in (("liver", "f00d.dir"), ("spleen", "beef.dir"))
    }
    lock = {"schema": "2.0", "stages": stages}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert tracking.dvc_hash(data) == "f00d.dir"
    (tmp_path / "data" / "other").mkdir()
    assert tracking.dvc_hash(tmp_path / "data" / "other") is None


def test_a_run_records_params_metrics_tags_and_text_and_finishes(store):
    params = {"train.lr": 0.01, "data.hu_window": (-200, 250)}
    with tracking.open_run(store, run_name="r", tags={"dataset": "liver"}, params=params) as run:
        run.log_metrics({"loss": 2.0, "val_dice": 0.5}, step=1)
        run.log_metrics({"loss": 1.0, "val_dice": 0.7}, step=2)
        run.set_tags({"stage": "train"})
        run.log_text("a: 1\n", "config.yaml")
    client = mlflow.MlflowClient(store.tracking_uri)
    record = client.get_run(run.run_id)
    assert not run.offline and record.info.status == "FINISHED"
    assert client.get_experiment(record.info.experiment_id).name == "tests"
    assert record.data.params == {"train.lr": "0.01", "data.hu_window": "(-200, 250)"}
    assert record.data.tags["dataset"] == "liver" and record.data.tags["stage"] == "train"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["config.yaml"]


def test_log_datasets_attaches_one_dataset_per_split_quietly(store, sqlite_store):
    import pandas as pd

    data = sqlite_store / "processed"
    data.mkdir(exist_ok=True)
    manifest = pd.DataFrame({"case_id": ["1", "1", "2", "3"], "slice_index": [0, 1, 0, 0],
                             "path": ["a", "b", "c", "d"], "organ_present": [1, 0, 1, 1],
                             "split": ["train", "train", "val", "test"]})
    manifest.to_csv(data / "manifest.csv", index=False)
    (data / "cases.json").write_text("{}")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with tracking.open_run(store, run_name="data") as run:
            tracking.log_datasets(run, data, "liver", manifest)
    assert not [w for w in shown if issubclass(w.category, UserWarning)]  # MLflow's hints flood the user's log
    inputs = mlflow.MlflowClient(store.tracking_uri).get_run(run.run_id).inputs.dataset_inputs
    by_name = {d.dataset.name: d for d in inputs}
    assert sorted(by_name) == ["liver-test", "liver-train", "liver-val"]
    assert {d.dataset.digest for d in inputs} == {tracking.data_hash(data)[:32]}
    assert {d.tags[0].value for d in inputs} == {"train", "val", "test"}
    assert '"num_rows": 2' in by_name["liver-train"].dataset.profile


def test_continuing_a_run_keeps_its_id_and_reports_the_last_logged_step(store):
    with tracking.open_run(store, params={"a": 1}) as first:
        first.log_metrics({"val_dice": 0.1}, step=1)
        first.log_metrics({"val_dice": 0.2}, step=2)
        assert first.last_step("val_dice") == 0  # a new run: nothing to look up
    with tracking.open_run(store, run_id=first.run_id, params={"a": 2}) as again:
        assert again.resumed and again.run_id == first.run_id
        assert again.last_step("val_dice") == 2 and again.last_step("never_logged") == 0
        again.log_metrics({"val_dice": 0.3}, step=3)
    record = mlflow.MlflowClient(store.tracking_uri).get_run(first.run_id)
    assert record.data.params == {"a": "1"}  # params are immutable: not logged again on resume
    assert record.data.metrics["val_dice"] == 0.3 and record.info.status == "FINISHED"


def test_a_run_written_from_a_kubeflow_pod_names_its_kfp_run_and_pipeline_version(store, monkeypatch):
    with tracking.open_run(store, run_name="local") as local:
        pass
    monkeypatch.setenv("KFP_RUN_ID", "6f1c1d2e-run")
    monkeypatch.setenv("KFP_RUN_NAME", "unet3plus 0123456789ab-deadbeef 2026-12-03")
    monkeypatch.setenv("KFP_PIPELINE_VERSION", "0123456789ab-deadbeef")
    with tracking.open_run(store, run_name="pod", tags={"dataset": "liver"}) as pod:
        pass
    client = mlflow.MlflowClient(store.tracking_uri)
    assert not any(key.startswith("kfp_") for key in client.get_run(local.run_id).data.tags)
    tags = client.get_run(pod.run_id).data.tags
    assert {key: tags[key] for key in tracking.KFP_RUN_TAGS} == {
        "kfp_run_id": "6f1c1d2e-run", "kfp_run_name": "unet3plus 0123456789ab-deadbeef 2026-12-03",
        "kfp_pipeline_version": "0123456789ab-deadbeef"}
    assert tags["dataset"] == "liver"


def test_processes_creating_one_experiment_at_once_all_get_its_id(store):
    client = mlflow.MlflowClient(store.tracking_uri)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: tracking.experiment_id(client, "created-at-once"), range(8)))
    assert len(set(ids)) == 1 and client.get_experiment(ids[0]).name == "created-at-once"
    existing = client.create_experiment("made-before")
    assert tracking.experiment_id(client, "made-before") == existing


def test_variants_starting_one_study_at_once_end_under_one_parent(store, monkeypatch):
    from unet3plus.config import config_from_dict

    base = config_from_dict({"mlflow": {"system_metrics": False}})
    first = tracking.study_parent(store, "liver", "d" * 32, base)
    # A second process that searched before the first one's parent existed creates its own.
    search = mlflow.MlflowClient.search_runs
    calls = []

    def not_yet_visible(self, *args, **kwargs):
        calls.append(kwargs.get("max_results"))
        return [] if len(calls) == 1 else search(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", not_yet_visible)
    second = tracking.study_parent(store, "liver", "d" * 32, base)
    monkeypatch.setattr(mlflow.MlflowClient, "search_runs", search)
    assert second == first and len(calls) == 2  # it looked again after creating, and kept the oldest
    client = mlflow.MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name(store.experiment).experiment_id
    parents = client.search_runs([experiment], "tags.study_parent = 'true'")
    assert [run.info.run_id for run in parents] == [first]  # the duplicate deleted itself


WORKER = """
import sys, time
from pathlib import Path
from unet3plus import tracking
from unet3plus.config import MlflowConfig, config_from_dict
go = Path(sys.argv[2])
(go.parent / f"ready-{sys.argv[3]}").touch()
while not go.exists():
    time.sleep(0.01)
store = MlflowConfig(tracking_uri=sys.argv[1], experiment="tests", system_metrics=False)
parent = tracking.study_parent(store, "liver", "f" * 32, config_from_dict({"mlflow": {"system_metrics": False}}))
with tracking.open_run(store, run_name="child", parent_run_id=parent) as run:
    run.set_tags({"parent_seen": str(parent)})
"""


def test_processes_opening_a_new_sqlite_store_at_once_share_one_schema_and_one_study_parent(tmp_path):
    """MLflow migrates a new SQLite store in whichever process opens it first: at once, one of two used to fail."""
    uri, go = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("MLFLOW_TRACKING_URI", None)
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(go), str(i)], env=env, stderr=subprocess.PIPE,
                                text=True) for i in range(3)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # every worker has imported MLflow: they open the store at the same moment
    errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], errors
    assert not any("Traceback" in error or "could not" in error for error in errors), errors
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tests").experiment_id
    (parent,) = client.search_runs([experiment], "tags.study_parent = 'true'")
    children = client.search_runs([experiment], "attributes.run_name = 'child'")
    assert len(children) == 3 and {run.data.tags["mlflow.parentRunId"] for run in children} == {parent.info.run_id}
    assert sorted(path.name for path in (tmp_path / "new").iterdir()) == ["mlflow.db"]  # no lock file beside it


def test_the_study_parent_spans_its_children_in_time(store):
    from unet3plus.config import config_from_dict

    parent_id = tracking.study_parent(store, "spleen", "e" * 32, config_from_dict({"mlflow": {"system_metrics": False}}))
    client = mlflow.MlflowClient(store.tracking_uri)
    created = client.get_run(parent_id).info
    for name in ("main", "unet"):
        with tracking.open_run(store, run_name=name, parent_run_id=parent_id) as child:
            time.sleep(0.05)
        child_info = client.get_run(child.run_id).info
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent_id
        parent = client.get_run(parent_id).info
        assert parent.status == "FINISHED" and parent.start_time == created.start_time
        assert parent.end_time >= child_info.end_time > created.end_time  # it ends with its latest child


def test_an_unknown_run_id_starts_a_new_run_with_a_warning(store, caplog):
    caplog.set_level(logging.WARNING, logger="unet3plus.tracking")
    with tracking.open_run(store, run_id="0" * 32) as run:
        assert not run.offline and not run.resumed and run.run_id != "0" * 32
    assert "not found" in caplog.text


@pytest.mark.parametrize("error,status", [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")])
def test_a_failing_block_ends_the_run_failed_or_killed(store, error, status):
    with pytest.raises(error), tracking.open_run(store) as run:
        raise error()
    assert mlflow.MlflowClient(store.tracking_uri).get_run(run.run_id).info.status == status


def test_an_unreachable_server_costs_seconds_and_one_warning_then_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    for name in tracking.HTTP_LIMITS:
        monkeypatch.delenv(name, raising=False)
    config = MlflowConfig(tracking_uri=f"http://127.0.0.1:{unused_port()}", system_metrics=True)
    started = time.monotonic()
    caplog.set_level(logging.WARNING, logger="unet3plus.tracking")
    with tracking.open_run(config, params={"a": 1}) as run:
        run.log_metrics({"loss": 1.0}, step=1)
        run.log_artifact(tmp_path)
        run.end()
    assert time.monotonic() - started < 20  # MLflow's defaults retry for minutes
    assert run.offline and run.run_id is None and run.last_step("loss") == 0
    warnings = [r for r in caplog.records if r.name == "unet3plus.tracking" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "offline" in warnings[0].getMessage()


def test_a_disabled_run_never_contacts_mlflow(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'never.db'}")
    with tracking.open_run(config, enabled=False) as run:
        run.log_metrics({"loss": 1.0}, step=1)
    assert run.offline and run.run_id is None and not (tmp_path / "never.db").exists()


def test_run_tags_name_dataset_commit_and_data_hash(tmp_path, monkeypatch):
    (tmp_path / "manifest.csv").write_text("m")
    (tmp_path / "cases.json").write_text('{"data_source": "msd"}')
    monkeypatch.chdir(tmp_path)  # outside any git repository
    assert tracking.run_tags(tmp_path, "spleen") == {"dataset": "spleen", "data_source": "msd",
                                                     "data_hash": tracking.data_hash(tmp_path)}
    (tmp_path / "cases.json").write_text("{}")  # preprocessed before the source was recorded
    assert tracking.run_tags(tmp_path, "spleen")["data_source"] == "unknown"


@pytest.mark.parametrize(
    "text,expected",
    [("http://bob:pw@127.0.0.1:5000", "http://***@127.0.0.1:5000"),
     ("https://bob@host/path?q=1", "https://***@host/path?q=1"),
     ("postgresql+psycopg2://mlflow:p%40ss@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
     ("http://bob:p@ss@host/x", "http://***@host/x"),  # a raw '@' in the password: up to the last one, as urllib
     ("request to http://a:b@h/api failed; see https://c:d@i/", "request to http://***@h/api failed; see https://***@i/"),
     ("sqlite:///runs@2026.db", None), ("models:/unet3plus-liver@champion", None),
     ("http://host/path/a@b", None)],  # '@' after the authority: a path, not a login
)  # fmt: skip
def test_redact_hides_the_login_of_every_uri_in_a_text(text, expected):
    assert redact(text) == (expected or text)


def test_a_login_in_the_configured_tracking_uri_is_refused_naming_the_variables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("mlflow:\n  tracking_uri: https://bob:Pa55-w0rd@mlflow.example.org\n")
    for argv in (["train", "--data", "data", "--out", "run"], ["report"],
                 ["report", "--set", "mlflow.tracking_uri=http://bob:Pa55-w0rd@127.0.0.1:1"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "mlflow.tracking_uri" in err, err
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in err and "://***@" in err
        assert "Pa55-w0rd" not in err and "bob" not in err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_a_login_in_the_environments_uri_moves_to_the_credential_variables(monkeypatch):
    for name in tracking.CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://bob:p%40ss@127.0.0.1:5000/mlflow")
    assert tracking.configure(MlflowConfig()) == "http://127.0.0.1:5000/mlflow" == mlflow.get_tracking_uri()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000/mlflow"  # what subprocesses inherit
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "p@ss")
    # Variables already set win over the URI's login, as in MLflow's HTTP client.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://eve:other@host")
    assert tracking.configure(MlflowConfig()) == "https://host"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "p@ss")
    # A database URI needs its password: kept for MLflow, shown only redacted.
    database = "postgresql+psycopg2://mlflow:pw@127.0.0.1:1/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", database)
    assert tracking.configure(MlflowConfig()) == database
    assert tracking.explain_failure(RuntimeError(f"cannot connect to {database}"), database) == (
        "postgresql+psycopg2://***@127.0.0.1:1/mlflow: cannot connect to postgresql+psycopg2://***@127.0.0.1:1/mlflow")
    with pytest.raises(UserError) as caught, tracking.store_errors(MlflowConfig()):
        raise OSError(f"cannot open {database}")
    assert str(caught.value).startswith("postgresql+psycopg2://***@127.0.0.1:1/mlflow: cannot read") and ":pw@" not in str(
        caught.value)
