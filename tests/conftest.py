"""Shared pytest fixtures."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

# `make test` runs two test processes on 2-core machines; one torch thread each avoids
# oversubscription, which made small trainings 10x slower.
torch.set_num_threads(1)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend store, local artifact store).

    ``url`` is the tracking URI; ``kill()`` simulates a crash (SIGKILL, no shutdown), ``start()``
    brings it back on the same port and stores, ``stop()`` shuts it down.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> None:
        command = [str(Path(sys.executable).parent / "mlflow"), "server", "--workers", "1"]
        command += ["--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        # No job runner: it forks helper processes that outlive the server and slow its start.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.root / "server.log", "ab") as log:  # the server keeps its own copy of the handle
            self.process = subprocess.Popen(
                command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}); see {self.root / 'server.log'}")
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer /health within {timeout} s; see {self.root / 'server.log'}")

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def _signal(self, number: int) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, number)  # the server and its uvicorn worker share our new session
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A running tracking server; point MLflow at ``mlflow_server.url`` (e.g. MLFLOW_TRACKING_URI)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()
