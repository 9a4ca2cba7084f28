"""The team tracking server's command line for real: ``python -m unet3plus.tracking_server start|stop|status``.

Real PostgreSQL (``initdb``/``pg_ctl``, as an unprivileged user under root) and a real ``mlflow
server --app-name basic-auth``, in a root whose path has a space. Foreign processes are real
too: an HTTP server answering ``/health`` on the port (the impostor a user would otherwise send
the admin password to) and a ``sleep`` whose pid a stale PID file names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import psutil
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client

from unet3plus.tracking_server import MlflowServer, Postgres, ServerError, free_port, main

pytestmark = pytest.mark.slow


class Health(BaseHTTPRequestHandler):
    """Answers every GET with 200 OK: to a naive check, a healthy MLflow server."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def impostor(port: int) -> Iterator[ThreadingHTTPServer]:
    """A foreign HTTP server on 127.0.0.1:``port`` answering ``/health``."""
    server = ThreadingHTTPServer(("127.0.0.1", port), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def root() -> Iterator[Path]:
    """A root path with a space, in a folder the postgres account may traverse (not pytest's 0700 tmp)."""
    parent = Path(tempfile.mkdtemp(prefix="unet3plus-server-"))
    parent.chmod(0o711)
    yield parent / "team root"
    with contextlib.suppress(Exception):
        main(["stop", "--root", str(parent / "team root")])
    shutil.rmtree(parent, ignore_errors=True)


def running_under(root: Path) -> list[str]:
    """Command lines of live processes that name a path under ``root`` (its servers)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if str(root) in line:
            found.append(line)
    return found


def run(capsys, *argv: str) -> tuple[int, str]:
    status = main(list(argv))
    return status, capsys.readouterr().err


def test_the_server_is_what_it_says_from_refused_ports_to_stale_pid_files(root, capsys, caplog, monkeypatch):
    caplog.set_level("INFO", logger="unet3plus.tracking_server")
    port, db_port = free_port(), free_port()
    ports = ["--root", str(root), "--port", str(port), "--db-port", str(db_port)]

    # The MLflow port answered by someone else: refused at once, nothing created or started.
    with impostor(port):
        status, err = run(capsys, "start", *ports)
    assert status == 2 and err == (f"error: 127.0.0.1:{port}: the port is in use by another process; stop that "
                                   "process or choose another --port\n")  # fmt: skip
    assert not root.exists() and running_under(root) == []

    # The database port taken: the cluster is initialised, then the start fails and stops what it started.
    with impostor(db_port):
        status, err = run(capsys, "start", *ports)
    assert status == 2 and err.startswith(f"error: 127.0.0.1:{db_port}: the port is in use") and err.count("\n") == 1
    assert (root / "pgdata" / "PG_VERSION").is_file() and running_under(root) == []

    # The next start completes the root (the databases are created) and verifies what answers.
    assert run(capsys, "start", *ports)[0] == 0
    pid = int((root / "mlflow.pid").read_text())
    assert f"at http://127.0.0.1:{port} (pid {pid})" in caplog.text and "export MLFLOW_TRACKING_PASSWORD" in caplog.text
    secrets = dict(line.split("=", 1) for line in (root / "secrets.env").read_text().splitlines())
    assert secrets["MLFLOW_AUTH_ADMIN_PASSWORD"] not in caplog.text
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    url = f"http://127.0.0.1:{port}"
    client = mlflow.MlflowClient(url)
    experiment = client.create_experiment("team")
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, "a private prediction", "predictions/case.txt")

    # What each account can read (README): on this machine, the owner only ...
    for path in [root, *root.rglob("*")]:
        mode, kind = stat.S_IMODE(path.lstat().st_mode), "folder" if path.is_dir() else "file"
        expected = {"folder": 0o700, "file": 0o600}[kind]
        if path == root and os.geteuid() == 0:
            expected = 0o710  # the postgres account's group may traverse to its data folder
        assert mode == expected, (path, oct(mode))
    assert any(path.name == "case.txt" for path in (root / "mlflow" / "artifacts").rglob("*"))
    # ... on the server, every login reads every experiment; writing into another's needs a grant.
    auth = get_app_client("basic-auth", tracking_uri=url)
    auth.create_user("reader", "reader-Pw-5e1d")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-Pw-5e1d")
    assert client.get_run(run_id).info.run_id == run_id
    with pytest.raises(MlflowException, match="Permission denied"):
        client.set_tag(run_id, "by", "reader")
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code == 401
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["MLFLOW_AUTH_ADMIN_PASSWORD"])
    auth.grant_user_permission("reader", "experiment", experiment, "EDIT")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "reader")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "reader-Pw-5e1d")
    client.set_tag(run_id, "by", "reader")

    # A second start reports the running server; after a database crash it brings the database back.
    caplog.clear()
    assert run(capsys, "start", *ports)[0] == 0 and "already running" in caplog.text
    Postgres(root).stop("immediate")
    assert run(capsys, "start", *ports)[0] == 0 and int((root / "mlflow.pid").read_text()) == pid
    assert Postgres(root).running_pid() is not None and client.get_run(run_id).data.tags["by"] == "reader"
    assert run(capsys, "status", "--root", str(root))[0] == 0

    # stop stops both and only them; a second stop finds nothing.
    caplog.clear()
    assert run(capsys, "stop", "--root", str(root))[0] == 0
    assert f"stopped MLflow (pid {pid}) and PostgreSQL" in caplog.text and running_under(root) == []
    assert not (root / "mlflow.pid").exists()
    caplog.clear()
    assert run(capsys, "stop", "--root", str(root))[0] == 0 and "not running" in caplog.text

    # A stale PID file naming an unrelated process: removed, the process left alone.
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (root / "mlflow.pid").write_text(str(bystander.pid))
        caplog.clear()
        assert run(capsys, "stop", "--root", str(root))[0] == 0
        assert "removed the stale PID file" in caplog.text and "not running" in caplog.text
        assert bystander.poll() is None and not (root / "mlflow.pid").exists()
        assert run(capsys, "status", "--root", str(root))[0] == 1
    finally:
        bystander.kill()
        bystander.wait()


def test_stop_and_status_of_a_root_that_does_not_exist_create_nothing(tmp_path, capsys, caplog):
    caplog.set_level("INFO", logger="unet3plus.tracking_server")
    missing = tmp_path / "never started"
    assert run(capsys, "stop", "--root", str(missing)) == (0, "")
    assert "not running" in caplog.text and "stopped" not in caplog.text
    assert run(capsys, "status", "--root", str(missing)) == (1, "")
    assert not missing.exists()


def test_a_process_that_takes_the_port_during_start_is_not_mistaken_for_the_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}")
    taken: list[ThreadingHTTPServer] = []

    def take_the_port() -> None:  # right after the launch, long before MLflow has imported enough to bind
        while server.process is None:
            time.sleep(0.001)
        taken.append(ThreadingHTTPServer(("127.0.0.1", server.port), Health))
        threading.Thread(target=taken[0].serve_forever, daemon=True).start()

    thief = threading.Thread(target=take_the_port)
    thief.start()
    try:
        with pytest.raises(ServerError, match=f"127.0.0.1:{server.port}: another process took the port"):
            server.start()
    finally:
        thief.join()
        for http in taken:
            http.shutdown()
            http.server_close()
    assert server.process.poll() is not None and running_under(tmp_path) == []
