"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

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


def strict_schema(schema):
    """A CRD's openAPIV3Schema with ``additionalProperties: false`` on every object that lists its
    properties and neither allows nor preserves unknown fields, so a misspelled field fails."""
    if isinstance(schema, dict):
        schema = {key: strict_schema(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_schema(item) for item in schema]
    return schema


@pytest.fixture(scope="session")
def crd_validator():
    """``crd_validator(path, version)``: a strict jsonschema validator of a vendored CRD (tests/schemas/)."""
    import jsonschema
    import yaml

    def build(path: Path, version: str) -> jsonschema.Draft7Validator:
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB: the C parser
        spec = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        return jsonschema.Draft7Validator(strict_schema(spec["schema"]["openAPIV3Schema"]))

    return build


ROOT = Path(__file__).resolve().parents[1]


class DvcProject:
    """A copy of the project's ``dvc.yaml`` and library in a fresh git + DVC repository, with ``params``.

    ``run(...)`` runs a command there (``dvc`` and ``unet3plus`` from this interpreter's environment)
    and fails the test, showing its output, when it exits non-zero.
    """

    def __init__(self, root: Path, params: dict) -> None:
        self.root = root
        root.mkdir()
        shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
        shutil.copytree(ROOT / "unet3plus", root / "unet3plus", ignore=shutil.ignore_patterns("__pycache__"))
        # tracked in the project, so a checkout has it: the `report` stage depends on reports/ablations
        (root / "reports" / "ablations").mkdir(parents=True)
        shutil.copy(ROOT / "reports" / "ablations" / "README.md", root / "reports" / "ablations" / "README.md")
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        (root / ".gitignore").write_text("/mlflow.db\n/mlruns/\n__pycache__/\n")  # as the project's
        self.bin = Path(sys.executable).parent
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                    "MPLBACKEND": "Agg", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
                    "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com"}
        self.env.pop("MLFLOW_TRACKING_URI", None)
        self.run("git", "init", "--quiet")
        self.run("dvc", "init", "--quiet")

    def run(self, *cmd: str, timeout: int = 1800) -> subprocess.CompletedProcess:
        executable = str(self.bin / cmd[0]) if (self.bin / cmd[0]).is_file() else cmd[0]
        # Its own process group: a timeout ends the stage commands `dvc` started too, not only `dvc`.
        process = subprocess.Popen([executable, *cmd[1:]], cwd=self.root, env=self.env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{' '.join(cmd)} timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-5000:]}")
        assert process.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory) -> Callable[[dict], DvcProject]:
    """Make a :class:`DvcProject` with the given params (a dict like params.yaml) in a new temporary folder."""
    return lambda params: DvcProject(tmp_path_factory.mktemp("dvc") / "repo", params)
