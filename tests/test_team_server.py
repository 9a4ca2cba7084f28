"""The team's tracking server for real: PostgreSQL + ``mlflow server --app-name basic-auth``.

One PostgreSQL cluster (``initdb``/``pg_ctl`` as an unprivileged user, 127.0.0.1) and one MLflow
server with basic authentication and the artifact proxy serve the whole module. Every process
gets its credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, and a few decoy
secrets (``*_TOKEN``, ``*_SECRET``, ``*_PASSWORD``) are exported so that the last test can grep
every output for all of them.

The tests run in file order and share state: the load test's trainings are registered by the
registration test, and the secrets test greps what all of them wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from test_train import after_epoch

from unet3plus.cli import main
from unet3plus.config import load_config
from unet3plus.tracking import STUDY_SECTIONS, data_hash
from unet3plus.tracking_server import AUTH_DATABASE, MlflowServer, Postgres, free_port, run_concurrently
from unet3plus.train import train
from unet3plus.utils import file_digest

pytestmark = pytest.mark.slow  # sharing state in file order: pyproject.toml gives xdist `--dist loadfile`

WRITERS = 8
EXPERIMENT = "team"
TINY = ["model.width=4", "train.epochs=2", "train.batch_size=4", "train.max_steps_per_epoch=2", "train.num_workers=0",
        "train.optimizer=sgd", "train.lr=0.05", f"mlflow.experiment={EXPERIMENT}", "mlflow.system_metrics=true",
        "evaluate.device=cpu", "evaluate.batch_size=8", "register.min_test_dice=0"]  # fmt: skip
ADMIN_PASSWORD = "adm1n-Pw-7f3c9e1b"
DECOYS = {"CLUSTER_API_TOKEN": "tok-5d8e2a91c7", "AWS_SECRET_ACCESS_KEY_SECRET": "sec-b41f0e6d3a",
          "POSTGRES_PASSWORD": "pg-c2a7f9e815"}  # fmt: skip
SECRETS = [ADMIN_PASSWORD, *DECOYS.values()]
# Sample system metrics every second so that even a few-second training records some.
SYSTEM_METRICS = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1", "MLFLOW_SYSTEM_METRICS_SAMPLES_BEFORE_LOGGING": "1"}

class Team:
    """The running servers, the data and the outputs the tests share."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.postgres = Postgres(root, password=DECOYS["POSTGRES_PASSWORD"])
        auth = self.postgres.uri(AUTH_DATABASE)
        self.server = MlflowServer(root / "mlflow", self.postgres.uri(), auth_database_uri=auth, admin_password=ADMIN_PASSWORD)
        self.url = self.server.url
        self.work = root / "work"
        self.outputs: list[str] = []  # stdout/stderr of every command run here

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.url)

    def launch(self, commands: list[list[str]], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run the command lines in concurrent processes (one per command); their output is recorded."""
        result = run_concurrently(commands, self.work, {**os.environ, **(env or {})})
        self.outputs += [result.stdout, result.stderr]
        return result


@pytest.fixture(scope="module")
def team(tiny_dataset) -> Iterator[Team]:
    root = Path(tempfile.mkdtemp(prefix="unet3plus-team-"))  # not under pytest's root-only 0700 folder
    team = Team(root)
    team.work.mkdir()
    shutil.copytree(tiny_dataset.raw, team.work / "raw")
    shutil.copytree(tiny_dataset.processed, team.work / "data")
    team.postgres.start()
    try:
        team.server.start()
        yield team
    finally:
        team.server.stop()
        team.postgres.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def environment(team, monkeypatch) -> None:
    """Credentials and decoy secrets in the environment, the work folder as cwd, one torch thread."""
    monkeypatch.chdir(team.work)
    for name, value in {"MLFLOW_TRACKING_URI": team.url, "MLFLOW_TRACKING_USERNAME": "admin",
                        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD, **DECOYS, **SYSTEM_METRICS}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    torch.set_num_threads(1)


def cli(team: Team, capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    team.outputs += [out, err]
    return status, out, err


def overrides(*extra: str) -> list[str]:
    return [arg for item in [*TINY, *extra] for arg in ("--set", item)]


def same_study(parent: mlflow.entities.Run, run: mlflow.entities.Run) -> bool:
    """Whether ``parent`` holds the data hash and the study's settings of training run ``run``.

    A study is its data (the hash) and every ``model.*``, ``loss.*``, ``train.*`` setting but the seed
    (:func:`unet3plus.tracking.study_params`): the parent holds exactly those of its children.
    """
    study = {key: value for key, value in run.data.params.items()
             if key.partition(".")[0] in STUDY_SECTIONS and key != "train.seed"}  # fmt: skip
    same_data = parent.data.tags["data_hash"] == run.data.tags["data_hash"]
    return same_data and parent.data.params == study and len(study) > 0


def test_train_evaluate_register_and_report_end_to_end_with_credentials_from_the_environment(team, capsys):
    assert cli(team, capsys, "train", "--data", "data", "--out", "e2e", *overrides())[0] == 0
    assert cli(team, capsys, "evaluate", "--checkpoint", "e2e/best.pt", "--data", "data", "--raw", "raw",
               "--out", "e2e/evaluation", *overrides())[0] == 0  # fmt: skip
    assert cli(team, capsys, "register", "--checkpoint", "e2e/best.pt", "--metrics", "e2e/evaluation/metrics.json",
               "--output", "e2e/registered.json", *overrides())[0] == 0  # fmt: skip
    status, table, _ = cli(team, capsys, "report", *overrides())
    assert status == 0

    run_id = json.loads((team.work / "e2e" / "train_summary.json").read_text())["mlflow_run_id"]
    run = team.client().get_run(run_id)
    assert run.info.status == "FINISHED" and "test_dice" in run.data.metrics
    registered = json.loads((team.work / "e2e" / "registered.json").read_text())
    assert registered | {"reason": None} == {"name": "unet3plus-liver-synthetic", "version": 1, "alias": "champion",
                                             "champion": True, "reason": None}  # fmt: skip
    main_row = next(line for line in table.splitlines() if line.startswith("| main |"))  # Table 1's main model
    assert "| Dice liver |" in table and f"| {run.data.metrics['test_dice']:.4f} |" in main_row
    parent = team.client().get_run(run.data.tags["mlflow.parentRunId"])  # the study's parent run
    assert parent.data.tags["study_parent"] == "true" and same_study(parent, run)


@pytest.mark.parametrize(
    "username,password,expected",
    [(None, None, "requires a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
     ("admin", None, "requires a login: set MLFLOW_TRACKING_PASSWORD"),
     ("admin", "wrong-password",
      "rejected the login of MLFLOW_TRACKING_USERNAME=admin: check MLFLOW_TRACKING_PASSWORD")],
    ids=["no-credentials", "no-password", "wrong-password"],
)  # fmt: skip
def test_register_and_report_without_a_valid_login_fail_at_once_naming_the_variable(
    team, capsys, monkeypatch, username, password, expected
):
    experiment = team.client().get_experiment_by_name(EXPERIMENT).experiment_id
    models_before, runs_before = len(team.client().search_registered_models()), len(team.client().search_runs([experiment]))
    for name, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
        monkeypatch.delenv(name) if value is None else monkeypatch.setenv(name, value)
    for verb in (["register", "--checkpoint", "e2e/best.pt", "--metrics", "e2e/evaluation/metrics.json"], ["report"]):
        status, _, err = cli(team, capsys, *verb, *overrides())
        assert status == 2 and err == f"error: the tracking server {team.url} {expected}\n", err
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
    assert len(team.client().search_registered_models()) == models_before  # nothing half-registered
    versions = team.client().search_model_versions("name = 'unet3plus-liver-synthetic'")
    assert len(versions) == 1
    assert len(team.client().search_runs([experiment])) == runs_before


def test_training_without_a_login_falls_back_offline_saying_which_variable_to_set(team, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with caplog.at_level(logging.WARNING):
        summary = train(load_config(None, [*TINY, "train.epochs=1"]), "data", team.work / "offline")
    assert summary["mlflow_offline"] and summary["mlflow_run_id"] is None and summary["epochs"] == 1
    assert "requires a login: set MLFLOW_TRACKING_PASSWORD" in caplog.text and "--resume" in caplog.text
    team.outputs.append(caplog.text)


class NoRegistry(BaseHTTPRequestHandler):
    """A tracking API without the model registry: experiments answer, registered-models is 404."""

    def do_GET(self) -> None:
        found = "/experiments/search" in self.path
        body = b'{"experiments": []}' if found else b"Not Found"
        self.send_response(200 if found else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


def test_an_unreachable_server_or_one_without_a_registry_is_one_clear_line(team, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead := f"http://127.0.0.1:{free_port()}")
    register = ["register", "--checkpoint", "e2e/best.pt", "--metrics", "e2e/evaluation/metrics.json"]
    status, _, err = cli(team, capsys, *register, *overrides())
    assert status == 2 and err == f"error: cannot reach the tracking server {dead}: is it running? " \
        "(set MLFLOW_TRACKING_URI to its address)\n"  # fmt: skip
    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRegistry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    try:
        status, _, err = cli(team, capsys, *register, *overrides())
    finally:
        server.shutdown()
    assert status == 2 and err.startswith(f"error: {url} has no MLflow model registry") and err.count("\n") == 1


def test_eight_concurrent_trainings_lose_and_duplicate_nothing(team):
    commands = [["train", "--data", "data", "--out", f"load/{i}", *overrides(f"train.seed={i}")]
                for i in range(WRITERS)]
    result = team.launch(commands)
    assert result.returncode == 0, result.stderr[-3000:]

    client = team.client()
    for i in range(WRITERS):
        out = team.work / "load" / str(i)
        summary = json.loads((out / "train_summary.json").read_text())
        assert not summary["mlflow_offline"]
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        history = pd.read_csv(out / "history.csv")
        for key in ("loss", "val_dice", "lr"):  # every epoch exactly once, with the local value
            logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert logged == list(zip(history.epoch, history[key])), (i, key)
        params = len(load_config(None, TINY).flat()) + 1  # every setting and the device
        assert run.data.params["train.seed"] == str(i) and len(run.data.params) == params
        assert run.data.tags["dataset"] == "liver" and "data_hash" in run.data.tags
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.csv", "curves.png", "train_summary.json"} <= artifacts
        assert any(key.startswith("system/") for key in run.data.metrics), sorted(run.data.metrics)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = client.search_runs([experiment], "params.`train.max_steps_per_epoch` = '2'", max_results=100)
    parents = {run.info.run_id: run for run in found if run.data.tags.get("study_parent") == "true"}
    load_runs = [run for run in found if run.info.run_id not in parents]
    assert len(load_runs) == WRITERS + 1  # the eight and the end-to-end run: no duplicate run was created
    # One parent run per study (data, parameters but the seed): the eight seeds and the end-to-end run repeat one
    # configuration, so eight concurrent writers created exactly one parent between them.
    assert len(parents) == 1 and len({p.data.tags["study"] for p in parents.values()}) == 1
    for run in load_runs:  # each training run is the child of its own study's parent
        parent = parents[run.data.tags["mlflow.parentRunId"]]
        assert same_study(parent, run)
    assert {run.data.tags["mlflow.parentRunId"] for run in load_runs} == set(parents)  # no orphan parent


def test_eight_concurrent_registrations_give_consistent_versions_and_one_champion(team):
    dice = [0.50 + 0.05 * i for i in (3, 7, 1, 5, 0, 6, 2, 4)]
    evaluated = json.loads((team.work / "e2e" / "evaluation" / "metrics.json").read_text())
    commands = []
    for i, value in enumerate(dice):
        metrics = team.work / "load" / str(i) / "metrics.json"
        scored = {"checkpoint_sha256": file_digest(team.work / "load" / str(i) / "best.pt"),
                  "data_hash": data_hash(team.work / "data"),  # what `unet3plus evaluate` records and register checks
                  **{key: evaluated[key] for key in ("data_source", "test_set")}}  # the same test set
        metrics.write_text(json.dumps({"dice": value, "dataset": "liver", **scored}))
        commands.append(["register", "--checkpoint", f"load/{i}/best.pt", "--metrics", str(metrics),
                         "--output", f"load/{i}/registered.json", *overrides()])  # fmt: skip
    result = team.launch(commands)
    assert result.returncode == 0, result.stderr[-3000:]

    client = team.client()
    registered = [json.loads((team.work / "load" / str(i) / "registered.json").read_text()) for i in range(WRITERS)]
    versions = sorted(r["version"] for r in registered)
    assert versions == list(range(2, WRITERS + 2))  # version 1 is the end-to-end test's: no gap, no repeat
    for i, record in enumerate(registered):
        version = client.get_model_version("unet3plus-liver-synthetic", str(record["version"]))
        assert float(version.tags["test_dice"]) == dice[i]
        summary = json.loads((team.work / "load" / str(i) / "train_summary.json").read_text())
        assert version.run_id == summary["mlflow_run_id"]  # logged into its own training run
    every = [client.get_model_version("unet3plus-liver-synthetic", str(v)) for v in range(1, WRITERS + 2)]
    holders = [v.version for v in every if "champion" in v.aliases]
    assert len(holders) == 1
    champion = client.get_model_version_by_alias("unet3plus-liver-synthetic", "champion")
    assert [champion.version] == holders and float(champion.tags["test_dice"]) >= min(dice)


def test_a_database_restart_mid_training_loses_nothing_after_resume(team, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    config = load_config(None, [*TINY, "train.epochs=3", "mlflow.system_metrics=false"])
    out = team.work / "restart"
    # The database is down during epoch 2 (stopped after epoch 1's checkpoint, started after epoch 2's).
    with caplog.at_level(logging.WARNING), after_epoch(1, team.postgres.stop), after_epoch(2, team.postgres.start):
        summary = train(config, "data", out)
    assert summary["epochs"] == 3 and summary["mlflow_offline"] and summary["mlflow_run_id"] is not None
    assert "continuing offline" in caplog.text
    history = pd.read_csv(out / "history.csv")
    assert list(history.epoch) == [1, 2, 3]
    logged = sorted(m.step for m in team.client().get_metric_history(summary["mlflow_run_id"], "val_dice"))
    assert logged == [1]

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    again = train(config, "data", out, resume=True)
    assert again["mlflow_run_id"] == summary["mlflow_run_id"] and not again["mlflow_offline"]
    metrics = team.client().get_metric_history(summary["mlflow_run_id"], "val_dice")
    assert sorted((m.step, m.value) for m in metrics) == list(zip(history.epoch, history.val_dice))
    team.outputs.append(caplog.text)


def test_a_password_inside_mlflow_tracking_uri_works_and_is_shown_nowhere(team, capsys, monkeypatch, caplog):
    """The login only in MLFLOW_TRACKING_URI (http://admin:PASSWORD@...) through train, evaluate, register, report.

    The last test then greps every output, log, file, artifact and database row for the password.
    """
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.url.replace("http://", f"http://admin:{ADMIN_PASSWORD}@"))
    caplog.set_level(logging.INFO)
    assert cli(team, capsys, "train", "--data", "data", "--out", "login", *overrides("train.seed=11"))[0] == 0
    assert not json.loads((team.work / "login" / "train_summary.json").read_text())["mlflow_offline"]
    assert cli(team, capsys, "evaluate", "--checkpoint", "login/best.pt", "--data", "data", "--raw", "raw",
               "--out", "login/evaluation", *overrides())[0] == 0  # fmt: skip
    assert cli(team, capsys, "register", "--checkpoint", "login/best.pt", "--metrics", "login/evaluation/metrics.json",
               "--output", "login/registered.json", *overrides())[0] == 0  # fmt: skip
    assert cli(team, capsys, "report", *overrides())[0] == 0
    # An error that shows the URI (a server that is not there): the server named, not the login.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://admin:{ADMIN_PASSWORD}@127.0.0.1:{free_port()}")
    status, _, err = cli(team, capsys, "report", *overrides())
    assert status == 2 and err.startswith("error: cannot reach the tracking server http://127.0.0.1:")
    assert f"(new) in {team.url}" in caplog.text  # the logs show the server, without the login
    team.outputs.append(caplog.text)


def database_dump(team: Team) -> str:
    """Every row of every table of the tracking and auth databases, as text."""
    import psycopg2

    lines = []
    for database in ("mlflow", AUTH_DATABASE):
        connection = psycopg2.connect(host="127.0.0.1", port=team.postgres.port, user="mlflow",
                                      password=team.postgres.password, dbname=database)  # fmt: skip
        with contextlib.closing(connection):
            cursor = connection.cursor()
            cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            for (table,) in cursor.fetchall():
                cursor.execute(f'SELECT * FROM "{table}"')
                lines += [f"{table}: {row}" for row in cursor.fetchall()]
    return "\n".join(lines)


def test_no_secret_reaches_params_tags_artifacts_logs_checkpoints_or_the_compiled_pipeline(team, tmp_path):
    compiled = subprocess.run([sys.executable, "-m", "pipeline", "compile", "--output", str(tmp_path / "p.yaml")],
                              cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=300,
                              check=False)  # fmt: skip
    assert compiled.returncode == 0, compiled.stderr
    team.outputs += [compiled.stdout, compiled.stderr]
    dump = database_dump(team)
    assert "val_dice" in dump and "unet3plus-liver" in dump  # the dump holds what the tests logged
    haystacks = {"database": dump.encode(), "output": "\n".join(team.outputs).encode()}
    folders = (team.work, team.root / "mlflow" / "artifacts", tmp_path)
    files = [path for folder in folders for path in folder.rglob("*") if path.is_file()]
    assert any(path.suffix == ".pt" for path in files) and any(path.name == "config.yaml" for path in files)
    haystacks |= {str(path): path.read_bytes() for path in files}
    leaks = [(where, secret) for where, data in haystacks.items() for secret in SECRETS if secret.encode() in data]
    assert leaks == []
    # The secrets really were in the environment of everything above, so a leak would have shown.
    assert all(os.environ[name] == value for name, value in DECOYS.items())
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == ADMIN_PASSWORD
