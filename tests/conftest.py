"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from unet3plus import tracking_server

# `make test` runs two test processes on 2-core machines; one torch thread each avoids
# oversubscription, which made small trainings 10x slower.
torch.set_num_threads(1)


class MlflowServer(tracking_server.MlflowServer):
    """A real ``mlflow server`` on 127.0.0.1 (SQLite backend store, local artifact store) in ``root``.

    ``url`` is the tracking URI; ``kill()`` simulates a crash (SIGKILL, no shutdown), ``start()``
    brings it back on the same port and stores, ``stop()`` shuts it down.
    """

    def __init__(self, root: Path) -> None:
        super().__init__(root, f"sqlite:///{root / 'mlflow.db'}")


@pytest.fixture
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A running tracking server; point MLflow at ``mlflow_server.url`` (e.g. MLFLOW_TRACKING_URI)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    server.start()
    yield server
    server.stop()
