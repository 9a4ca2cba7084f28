"""Shared pytest fixtures."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from unet3plus import tracking_server
from unet3plus.config import DataConfig
from unet3plus.data.phantom import write_dataset
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.data.sources import Case, discover_cases

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

    def build(path: Path, version: str) -> jsonschema.Draft7Validator:
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB: the C parser
        spec = next(v for v in crd["spec"]["versions"] if v["name"] == version)
        return jsonschema.Draft7Validator(strict_schema(spec["schema"]["openAPIV3Schema"]))

    return build


ROOT = Path(__file__).resolve().parents[1]

# ---- voxel orders a volume may be stored in (geometry, transforms and preprocessing tests) ----

# A LiTS-like affine: voxel axes point left and posterior (negative diagonal), 0.7 mm in plane, 2.5 mm slices.
LITS_AFFINE = np.array([[-0.7, 0, 0, 180.0], [0, -0.7, 0, 170.0], [0, 0, 2.5, -400.0], [0, 0, 0, 1]])
AFFINES = {
    "lps_diagonal": LITS_AFFINE,
    "ras_diagonal": np.diag([0.8, 0.9, 3.0, 1.0]),
    "permuted_axes": np.array([[0, 0.75, 0, 0], [0, 0, -2.0, 0], [-0.8, 0, 0, 0], [0, 0, 0, 1.0]]),
}


def reference_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (nonzero = inside), plain numpy: the reference for the library's resampling."""
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


# ---- tiny data: raw phantom datasets and one preprocessed dataset, made once per test process ----


@pytest.fixture(scope="session")
def raw_datasets(tmp_path_factory) -> dict[str, Path]:
    """Small synthetic raw datasets by layout (``lits``, ``msd-spleen``: 4 cases of 32 x 32 x 8 voxels).

    Shared: read them, never change them; :func:`raw_copy` gives a writable copy.
    """
    root = tmp_path_factory.mktemp("raw")
    for layout in ("lits", "msd-spleen"):
        write_dataset(layout, root / layout, cases=4, seed=1, size=32, slices=8)
    return {layout: root / layout for layout in ("lits", "msd-spleen")}


@pytest.fixture
def raw_copy(raw_datasets, tmp_path) -> Callable[[str], Path]:
    """``raw_copy(layout)``: a fresh, writable copy of the small raw dataset of that layout."""
    return lambda layout: Path(shutil.copytree(raw_datasets[layout], tmp_path / layout))


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    """Write ``array`` as a NIfTI file (identity affine unless given)."""
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def first_labelled(layout: str, root: Path) -> Case:
    """The first case of the raw dataset at ``root`` that has a label."""
    return next(case for case in discover_cases(layout, root) if case.label is not None)


TINY_DATA = DataConfig(size=32, val_fraction=0.34, workers=1)  # how tiny_dataset is preprocessed


@dataclasses.dataclass(frozen=True)
class TinyDataset:
    """A raw LiTS-layout phantom, its preprocessed form and the data settings that made it."""

    raw: Path
    processed: Path
    config: DataConfig


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> TinyDataset:
    """4 phantom LiTS cases of 48 x 48 x 10 voxels (seed 0) preprocessed at 32 x 32, one case for validation.

    Shared by every test of the process: train on it, read it, never write into it.
    """
    root = tmp_path_factory.mktemp("tiny_dataset")
    write_dataset("lits", root / "raw", cases=4, seed=0, size=48, slices=10)
    preprocess_dataset("lits", root / "raw", root / "processed", TINY_DATA)
    return TinyDataset(root / "raw", root / "processed", TINY_DATA)


# ---- MLflow: a SQLite store per test module ----


def sqlite_uri(folder: Path) -> str:
    """The tracking URI of the SQLite store ``mlflow.db`` in ``folder``."""
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory) -> Path:
    """The folder of one SQLite MLflow store for the test module (creating a store takes seconds); its
    tracking URI is ``sqlite_uri(sqlite_store)``. Use :func:`in_sqlite_store` to run a test inside it."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def in_sqlite_store(sqlite_store, monkeypatch) -> str:
    """The test runs in the module's store folder (MLflow puts a SQLite store's artifacts under the working
    directory) with ``MLFLOW_TRACKING_URI`` unset; returns the store's tracking URI."""
    monkeypatch.chdir(sqlite_store)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return sqlite_uri(sqlite_store)


# ---- params.yaml for seconds-long pipeline runs ----

TINY_PARAMS = {
    "data": {"size": 32, "synth_cases": 4, "synth_size": 48, "synth_slices": 16, "workers": 1},
    "model": {"width": 4},
    "train": {"epochs": 1, "warmup_epochs": 1, "batch_size": 8, "num_workers": 0, "max_steps_per_epoch": 2},
    "evaluate": {"batch_size": 16},
    "mlflow": {"system_metrics": False},
    "register": {"min_test_dice": 0.0},  # a one-epoch model is far below the floor: let it be the champion
}


def tiny_params(**sections: dict) -> dict:
    """The project's params.yaml with :data:`TINY_PARAMS`, then ``sections``, merged into its sections.

    E.g. ``tiny_params(train={"epochs": 2}, ablations={"run": []})``.
    """
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for changes in (TINY_PARAMS, sections):
        for section, values in changes.items():
            params[section].update(values)
    return params


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
