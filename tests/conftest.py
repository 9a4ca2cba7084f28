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
