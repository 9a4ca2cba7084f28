"""The champion is earned (issue 16.7) and registering is idempotent (issue 18.5), on a real SQLite registry.

Rules under test (:func:`unet3plus.register.decide_alias`): below ``register.min_test_dice`` no
alias; ``champion`` only for a version that beats the holder on the same test set; otherwise
``challenger``; phantom-trained models live under their own registered name.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.exceptions import MlflowException

from unet3plus.checkpoint import save_checkpoint
from unet3plus.cli import main
from unet3plus.config import RegisterConfig, config_from_dict
from unet3plus.errors import UserError
from unet3plus.models import create_model
from unet3plus.register import decide_alias, register, registered_name
from unet3plus.utils import file_digest

REAL, PHANTOM = "unet3plus-liver", "unet3plus-liver-synthetic"
TEST_SET = {"lits": "a" * 64, "synthetic": "b" * 64, "other": "c" * 64}


@pytest.fixture(autouse=True)
def _no_exported_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _tags(dice: float, test_set: str = TEST_SET["lits"], **more: str) -> dict[str, str]:
    return {"test_dice": str(dice), "test_set": test_set, **more}


@pytest.mark.parametrize(
    ("dice", "holder", "expected", "why"),
    [
        (0.79, None, None, "test dice 0.7900 is below register.min_test_dice 0.80"),
        (float("nan"), None, None, "below register.min_test_dice"),
        (0.80, None, "champion", "first version to clear"),
        (0.90, _tags(0.85), "champion", "test dice 0.9000 beats champion version 7's 0.8500 on the same test set"),
        (0.85, _tags(0.85), "challenger", "does not beat champion version 7's 0.8500 on the same test set"),
        (0.95, _tags(0.85, TEST_SET["other"]), "challenger", "was tested on another test set"),
        (0.95, {"test_dice": "0.85"}, "challenger", "another test set (unknown"),
        (0.70, _tags(0.60), None, "below register.min_test_dice"),
    ],
    ids=["below-floor", "nan", "first", "better", "tie", "other-test-set", "holder-without-test-set", "floor-first"],
)
def test_decide_alias(dice, holder, expected, why):
    holder = None if holder is None else {**holder, "version": "7"}
    alias, reason = decide_alias(_tags(dice), holder, RegisterConfig())
    assert alias == expected and why in reason and "\n" not in reason


def test_decide_alias_with_a_distance_metric_prefers_lower_values():
    config = RegisterConfig(metric="hd95")
    holder = {**_tags(0.9, test_hd95="5.0"), "version": "1"}
    assert decide_alias(_tags(0.9, test_hd95="4.0"), holder, config)[0] == "champion"
    assert decide_alias(_tags(0.95, test_hd95="6.0"), holder, config)[0] == "challenger"


def test_registered_names_keep_phantom_and_unrecorded_sources_apart_from_real_data():
    assert registered_name("unet3plus", "liver", "lits") == REAL
    assert registered_name("unet3plus", "spleen", "msd") == "unet3plus-spleen"
    assert registered_name("unet3plus", "liver", "synthetic") == PHANTOM
    assert registered_name("unet3plus", "liver", "unknown") == "unet3plus-liver-unknown"


def _metrics(path: Path, checkpoint: Path, dice: float, source: str, test_set: str) -> Path:
    """evaluate's metrics.json for ``checkpoint`` (content hash), trained and tested on ``source`` data."""
    path.write_text(json.dumps({"dice": dice, "cases": 2, "dataset": "liver", "data_source": source,
                                "test_set": test_set, "checkpoint_sha256": file_digest(checkpoint)}))
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """One checkpoint registered in turn as phantom- and real-data models into one SQLite registry."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = config_from_dict({"data": {"size": 32}, "model": {"width": 4, "deep_supervision": False},
                               "mlflow": {"tracking_uri": uri, "system_metrics": False}})
    torch.manual_seed(0)
    model = create_model(**dataclasses.asdict(config.model))
    checkpoint = save_checkpoint(root / "best.pt", {"model": model.state_dict(), "config": config.to_dict(),
                                                    "dataset": "liver", "epoch": 1, "mlflow_run_id": None})
    return {"root": root, "uri": uri, "config": config, "checkpoint": checkpoint, "client": mlflow.MlflowClient(uri)}


def _register(store: dict, name: str, dice: float, source: str, test_set: str) -> dict:
    return register(store["config"], store["checkpoint"],
                    _metrics(store["root"] / f"{name}.json", store["checkpoint"], dice, source, test_set))


def _aliases(store: dict, name: str) -> dict[str, int]:
    return dict(store["client"].get_registered_model(name).aliases)


@pytest.mark.slow
def test_phantom_models_never_hold_an_alias_real_data_models_compete_for(store):
    phantom = _register(store, "phantom1", 0.95, "synthetic", TEST_SET["synthetic"])
    assert (phantom["name"], phantom["version"], phantom["alias"]) == (PHANTOM, 1, "champion")
    # A real-data model scoring lower than the phantom champion still becomes the real-data champion...
    real = _register(store, "real1", 0.90, "lits", TEST_SET["lits"])
    assert (real["name"], real["version"], real["alias"]) == (REAL, 1, "champion")
    # ... and a phantom model scoring higher than it cannot take the real-data alias.
    better_phantom = _register(store, "phantom2", 0.97, "synthetic", TEST_SET["synthetic"])
    assert (better_phantom["name"], better_phantom["alias"]) == (PHANTOM, "champion")
    assert _aliases(store, REAL) == {"champion": 1}
    assert _aliases(store, PHANTOM) == {"champion": 2}
    for name, version, source in ((REAL, "1", "lits"), (PHANTOM, "1", "synthetic"), (PHANTOM, "2", "synthetic")):
        model_version = store["client"].get_model_version(name, version)
        assert model_version.tags["data_source"] == source
        assert f"({source} source," in model_version.description
        run = store["client"].get_run(model_version.run_id)
        assert run.info.experiment_id == store["client"].get_experiment_by_name("unet3plus").experiment_id


@pytest.mark.slow
def test_a_retry_after_log_model_succeeded_creates_no_second_version(store, monkeypatch, caplog):
    """The fault strikes between log_model and the rest (first version tag); the retry completes that version."""
    before = len(store["client"].search_model_versions(f"name = '{REAL}'"))
    real_set_tag = mlflow.MlflowClient.set_model_version_tag
    calls = []

    def fail_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise MlflowException("injected fault: connection reset after log_model")
        return real_set_tag(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_model_version_tag", fail_once)
    with pytest.raises(UserError, match="injected fault"):
        _register(store, "other_test_set", 0.99, "lits", TEST_SET["other"])
    logged = store["client"].search_model_versions(f"name = '{REAL}'")
    assert len(logged) == before + 1 and "test_dice" not in max(logged, key=lambda v: int(v.version)).tags

    with caplog.at_level(logging.INFO, logger="unet3plus.register"):
        retried = _register(store, "other_test_set", 0.99, "lits", TEST_SET["other"])
    assert retried["version"] == before + 1
    assert len(store["client"].search_model_versions(f"name = '{REAL}'")) == before + 1
    assert "already holds this registration (a retry)" in caplog.text
    version = store["client"].get_model_version(REAL, str(retried["version"]))
    assert float(version.tags["test_dice"]) == 0.99 and version.tags["test_set"] == TEST_SET["other"]
    # Better, but on another test set: not comparable with the champion, so it is the challenger.
    assert retried["alias"] == "challenger" and "another test set" in retried["reason"]
    assert _aliases(store, REAL) == {"champion": 1, "challenger": retried["version"]}


@pytest.mark.slow
def test_below_the_quality_floor_no_alias_and_the_command_says_so(store, caplog):
    metrics = _metrics(store["root"] / "weak.json", store["checkpoint"], 0.527, "lits", TEST_SET["lits"])
    before = _aliases(store, REAL)
    argv = ["register", "--checkpoint", str(store["checkpoint"]), "--metrics", str(metrics),
            "--output", str(store["root"] / "weak_registered.json"), "--set", f"mlflow.tracking_uri={store['uri']}"]
    with caplog.at_level(logging.INFO, logger="unet3plus.register"):
        assert main(argv) == 0
    lines = [record.getMessage() for record in caplog.records if record.name == "unet3plus.register"]
    assert lines[-1].startswith(f"registered {REAL} version ")
    assert lines[-1].endswith(": no alias (test dice 0.5270 is below register.min_test_dice 0.80)")
    written = json.loads((store["root"] / "weak_registered.json").read_text())
    assert written["alias"] is None and written["champion"] is False
    assert _aliases(store, REAL) == before
    # Run again (a retried step after success): still that one version.
    versions = len(store["client"].search_model_versions(f"name = '{REAL}'"))
    assert main(argv) == 0
    assert len(store["client"].search_model_versions(f"name = '{REAL}'")) == versions
