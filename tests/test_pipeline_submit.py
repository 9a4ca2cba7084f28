"""``python -m pipeline submit`` against a fake Kubeflow Pipelines API server on 127.0.0.1: token, versions, run input."""

import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml
from fake_kfp import FakeKfp

from pipeline.__main__ import main
from unet3plus.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "kubeflow-user-example-com"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.s3cret-token"


def _submit(server: FakeKfp, *extra: str) -> int:
    return main(["submit", "--host", server.url, "--namespace", NAMESPACE, "--params", str(ROOT / "params.yaml"),
                 "--set", "train.epochs=3", "--timeout", "60", *extra])


@pytest.fixture
def at_root(monkeypatch):
    """Submit from the checkout: the version is named after its HEAD."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("UNET3PLUS_GIT_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    return head


def test_submit_authenticates_uploads_a_version_named_after_the_commit_and_runs_it(at_root, monkeypatch, capsys):
    monkeypatch.setenv("KF_PIPELINES_TOKEN", TOKEN)
    with FakeKfp(token=TOKEN) as server:
        assert _submit(server) == 0
        # Every call carried the bearer token (the proxy answers 401 otherwise).
        assert server.requests and {auth for _, _, auth in server.requests} == {f"Bearer {TOKEN}"}
        assert [(p["display_name"], p["namespace"]) for p in server.pipelines] == [("unet3plus", NAMESPACE)]
        uploaded = [v for v in server.versions if v["display_name"] != "unet3plus"]
        assert len(uploaded) == 1
        version = uploaded[0]
        digest = hashlib.sha256(version["yaml"].encode()).hexdigest()[:8]
        assert version["display_name"] == f"{at_root[:12]}-{digest}"
        assert next(yaml.safe_load_all(version["yaml"]))["pipelineInfo"]["name"] == "unet3plus"
        # The run is of that version, in the profile's experiment, with the parameters file as its input.
        (run,) = server.runs
        assert run["pipeline_version_reference"] == {"pipeline_id": version["pipeline_id"],
                                                    "pipeline_version_id": version["pipeline_version_id"]}
        (experiment,) = server.experiments
        assert (experiment["display_name"], experiment["namespace"]) == ("unet3plus", NAMESPACE)
        assert run["experiment_id"] == experiment["experiment_id"]
        sent = run["runtime_config"]["parameters"]
        assert parse_config(sent["params"]).train.epochs == 3
        assert sent["dataset"] == "liver"

        # The same commit and settings again: the version is reused, a second run starts.
        assert _submit(server) == 0
        assert len([v for v in server.versions if v["display_name"] != "unet3plus"]) == 1
        assert len(server.runs) == 2
        assert server.runs[1]["pipeline_version_reference"] == run["pipeline_version_reference"]
        assert sum(path.endswith("upload_version") for _, path, _ in server.requests) == 1
        # Other compiled settings are another version of the same pipeline.
        assert _submit(server, "--gpus", "2") == 0
        assert len(server.pipelines) == 1
        assert len({v["display_name"] for v in server.versions if v["display_name"] != "unet3plus"}) == 2
    output = capsys.readouterr()
    assert TOKEN not in output.out + output.err


def test_submit_without_the_right_token_is_one_line_naming_the_refusal(at_root, monkeypatch, capsys):
    monkeypatch.delenv("KF_PIPELINES_TOKEN", raising=False)
    with FakeKfp(token=TOKEN) as server:
        assert _submit(server, "--token", "wrong-token") == 2
        assert not server.runs and not server.pipelines
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: {server.url}: Kubeflow Pipelines refused") and "401" in error, error
    assert "KF_PIPELINES_TOKEN" in error and "wrong-token" not in error
