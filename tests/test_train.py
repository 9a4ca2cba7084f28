"""train.py: exact resume, determinism, learning, MLflow tracking (SQLite, server, dead server), DDP.

Every training here runs for real on a tiny synthetic LiTS dataset made by the phantom and the
preprocessing step (4 cases of 48x48x10 voxels -> 32x32 samples; 2 train, 1 val, 1 test case),
with a width-4 UNet 3+ (deep supervision and CGM on) on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch

from tests.conftest import TINY_DATA, sqlite_uri
from unet3plus import tracking
from unet3plus.checkpoint import load_checkpoint, model_from_checkpoint
from unet3plus.config import Config, load_config
from unet3plus.data.dataset import SliceDataset
from unet3plus.device import cpu_name
from unet3plus.errors import CheckpointError, ConfigError, DataError
from unet3plus.models import predict_proba
from unet3plus.train import EpochSampler, lr_multiplier, train

CPU = f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"  # the device a run records (unet3plus.device.describe_device)

LOSS_COLUMNS = ["loss", "loss_cgm", "loss_focal", "loss_iou", "loss_ms_ssim"]
TINY = [
    "model.width=4",
    "train.epochs=2",
    "train.batch_size=4",
    "train.max_steps_per_epoch=3",
    "train.num_workers=0",
    "train.optimizer=sgd",
    "train.lr=0.05",
    "train.schedule=poly",
    "train.augment=true",
    "mlflow.system_metrics=false",
]


def as_trained(config: Config) -> Config:
    """``config`` with the data section the run records: how its data was preprocessed."""
    return dataclasses.replace(config, data=TINY_DATA)


pytestmark = pytest.mark.usefixtures("in_sqlite_store")  # one SQLite store for the module, the cwd of every test


def tiny_config(store: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"mlflow.tracking_uri={sqlite_uri(store)}", *overrides])


@pytest.fixture(scope="module")
def straight(tiny_dataset, sqlite_store, tmp_path_factory) -> Path:
    """Two epochs in one go: the reference for resume and determinism."""
    out = tmp_path_factory.mktemp("straight")
    with contextlib.chdir(sqlite_store):
        train(tiny_config(sqlite_store), tiny_dataset.processed, out)
    return out


class Interrupted(Exception):
    """Stands for a crash, a Ctrl-C or a pre-empted node."""


@contextlib.contextmanager
def after_epoch(epoch: int, action: Callable[[], None]) -> Iterator[None]:
    """Run ``action`` when training logs the summary of ``epoch`` (after its checkpoint is written)."""

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith(f"epoch {epoch}/"):
                action()

    logger, handler = logging.getLogger("unet3plus.train"), Handler()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def interrupt() -> None:
    raise Interrupted()


def assert_same_state(a: dict, b: dict) -> None:
    """Every tensor of the model and optimiser equal (bitwise), the schedule and history equal."""
    assert a["model"].keys() == b["model"].keys()
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert states_a.keys() == states_b.keys()
    for index, state in states_a.items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(states_b[index][key])), (index, key)
    assert a["scheduler"] == b["scheduler"]
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in a["history"]]
    assert drop_time == [{k: v for k, v in row.items() if k != "seconds"} for row in b["history"]]
    assert (a["epoch"], a["best_metric"], a["best_epoch"]) == (b["epoch"], b["best_metric"], b["best_epoch"])


def val_dice_history(tracking_uri: str, run_id: str) -> list[tuple[int, float]]:
    history = mlflow.MlflowClient(tracking_uri).get_metric_history(run_id, "val_dice")
    return sorted((metric.step, metric.value) for metric in history)


@pytest.mark.parametrize("workers", [0, 2])
def test_an_interrupted_run_resumed_ends_bitwise_equal_to_a_straight_run(workers, straight, tiny_dataset, sqlite_store, tmp_path):
    config = tiny_config(sqlite_store, f"train.num_workers={workers}")
    with after_epoch(1, interrupt), pytest.raises(Interrupted):
        train(config, tiny_dataset.processed, tmp_path)
    interrupted = load_checkpoint(tmp_path / "last.pt")
    assert interrupted["epoch"] == 1 and len(pd.read_csv(tmp_path / "history.csv")) == 1
    uri = config.mlflow.tracking_uri
    assert mlflow.MlflowClient(uri).get_run(interrupted["mlflow_run_id"]).info.status == "FAILED"

    summary = train(config, tiny_dataset.processed, tmp_path, resume=True)

    # augmentation depends on (seed, epoch, index) only, so workers do not change the result either
    assert_same_state(load_checkpoint(tmp_path / "last.pt"), load_checkpoint(straight / "last.pt"))
    assert summary["mlflow_run_id"] == interrupted["mlflow_run_id"] and summary["epochs"] == 2
    history = pd.read_csv(tmp_path / "history.csv")
    assert val_dice_history(uri, summary["mlflow_run_id"]) == list(zip(history.epoch, history.val_dice))
    assert mlflow.MlflowClient(uri).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


def test_the_same_seed_gives_identical_weights_and_another_seed_does_not(straight, tiny_dataset, sqlite_store, tmp_path):
    train(tiny_config(sqlite_store), tiny_dataset.processed, tmp_path / "again")
    assert_same_state(load_checkpoint(tmp_path / "again" / "last.pt"), load_checkpoint(straight / "last.pt"))
    train(tiny_config(sqlite_store, "train.seed=1"), tiny_dataset.processed, tmp_path / "other")
    other, reference = load_checkpoint(tmp_path / "other" / "last.pt"), load_checkpoint(straight / "last.pt")
    assert not all(torch.equal(other["model"][name], tensor) for name, tensor in reference["model"].items())


def test_select_checkpoint_last_epoch_keeps_the_final_epoch_whatever_its_validation_dice(tiny_dataset, sqlite_store, tmp_path):
    with contextlib.chdir(sqlite_store):
        summary = train(tiny_config(sqlite_store, "train.select_checkpoint=last_epoch", "train.epochs=3"), tiny_dataset.processed, tmp_path)
    history = pd.read_csv(tmp_path / "history.csv")
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert best["epoch"] == last["epoch"] == summary["best_epoch"] == 3
    assert summary["best_val_dice"] == history.val_dice.iloc[-1] == best["best_metric"]
    assert all(torch.equal(best["model"][key], value) for key, value in last["model"].items())


def test_resuming_a_finished_run_trains_no_further(straight, tiny_dataset, sqlite_store, tmp_path):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    before = load_checkpoint(tmp_path / "last.pt")
    summary = train(tiny_config(sqlite_store), tiny_dataset.processed, tmp_path, resume=True)
    assert summary["epochs"] == 2 and summary["mlflow_run_id"] == before["mlflow_run_id"]
    assert_same_state(load_checkpoint(tmp_path / "last.pt"), before)
    uri = sqlite_uri(sqlite_store)
    assert len(val_dice_history(uri, summary["mlflow_run_id"])) == 2  # nothing logged twice


def test_resume_refuses_changed_train_and_loss_settings_and_records_a_longer_run(straight, tiny_dataset, sqlite_store, tmp_path):
    """Issue 20: a new lr was silently ignored, a new loss weight used but not shown, a new optimizer a KeyError."""
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    changed = tiny_config(sqlite_store, "train.lr=0.02", "loss.focal_weight=2", "train.optimizer=adamw")
    with pytest.raises(CheckpointError) as refused:
        train(changed, tiny_dataset.processed, tmp_path, resume=True)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'last.pt'}: --resume with settings other than the checkpoint's")
    for change in ("train.lr (0.05 -> 0.02)", "loss.focal_weight (1.0 -> 2.0)", "train.optimizer ('sgd' -> 'adamw')"):
        assert change in message
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    # Training longer is what resume is for: allowed, and the run says so (its params keep the first value).
    summary = train(tiny_config(sqlite_store, "train.epochs=3"), tiny_dataset.processed, tmp_path, resume=True)
    run = mlflow.MlflowClient(sqlite_uri(sqlite_store)).get_run(summary["mlflow_run_id"])
    assert summary["epochs"] == 3 and run.data.tags["resumed_with"] == "train.epochs (2 -> 3)"
    assert load_checkpoint(tmp_path / "last.pt")["config"]["train"]["epochs"] == 3


@pytest.mark.parametrize("schedule", ["poly", "cosine", "constant"])
def test_learning_rate_schedules_follow_their_formulas_per_step(schedule, sqlite_store):
    config = tiny_config(sqlite_store, f"train.schedule={schedule}", "train.poly_power=0.9").train
    expected = {
        "poly": lambda t: (1 - t) ** 0.9,
        "cosine": lambda t: (1 + math.cos(math.pi * t)) / 2,
        "constant": lambda t: 1.0,
    }
    for step in (0, 1, 25, 50, 99, 100):
        assert lr_multiplier(config, step, total_steps=100) == pytest.approx(expected[schedule](step / 100), abs=1e-12)
    assert lr_multiplier(config, 150, total_steps=100) == pytest.approx(expected[schedule](1.0), abs=1e-12)


def test_warm_up_rises_linearly_then_hands_over_to_the_schedule(sqlite_store):
    config = tiny_config(sqlite_store, "train.schedule=cosine").train
    # 4 warm-up steps of 10: factors 1/5, 2/5, 3/5, 4/5, then cosine over the 6 remaining steps
    # (by hand: step 5 is progress 1/6, (1 + cos 30 deg) / 2 = 0.9330127; step 7 is progress 3/6,
    # cos 90 deg = 0, so 0.5; step 10 is the end, 0, and stays there).
    by_hand = {0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8, 4: 1.0, 5: 0.9330127019, 7: 0.5, 10: 0.0, 12: 0.0}
    for step, factor in by_hand.items():
        assert lr_multiplier(config, step, total_steps=10, warmup_steps=4) == pytest.approx(factor, abs=1e-9)


def test_history_lr_is_the_scheduled_rate_at_each_epochs_first_step(straight):
    history = pd.read_csv(straight / "history.csv")
    steps, base_lr, total = 3, 0.05, 2 * 3
    expected = [base_lr * (1 - (epoch - 1) * steps / total) ** 0.9 for epoch in history.epoch]
    np.testing.assert_allclose(history.lr, expected, rtol=1e-12)


def reference_val_dice(checkpoint_path: Path, data_dir: Path) -> float:
    """Mean volume Dice of a checkpoint on the val split, with plain numpy Dice."""
    model = model_from_checkpoint(load_checkpoint(checkpoint_path))
    volumes: dict[str, list] = {}
    for item in SliceDataset(data_dir, "val"):
        with torch.no_grad():
            predicted = predict_proba(model, item["image"][None])[0] > 0.5
        truth = item["mask"].numpy() > 0.5
        volumes.setdefault(item["case_id"], []).append((item["slice_index"], predicted.numpy(), truth))
    scores = []
    for slices in volumes.values():
        slices.sort(key=lambda s: s[0])
        predicted, truth = np.stack([s[1] for s in slices]), np.stack([s[2] for s in slices])
        total = predicted.sum() + truth.sum()
        scores.append(1.0 if total == 0 else 2.0 * (predicted & truth).sum() / total)
    return float(np.mean(scores))


@pytest.mark.slow
def test_training_learns_and_is_recorded_in_files_and_mlflow(tiny_dataset, sqlite_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    epochs = ["train.epochs=15", "train.max_steps_per_epoch=null", "train.augment=false"]
    optimiser = ["train.optimizer=adamw", "train.lr=0.01", "train.schedule=cosine"]
    config = tiny_config(sqlite_store, *epochs, *optimiser, "mlflow.system_metrics=true")
    summary = train(config, tiny_dataset.processed, tmp_path)

    history = pd.read_csv(tmp_path / "history.csv")
    assert list(history.columns) == ["epoch", "lr", *LOSS_COLUMNS, "val_dice", "seconds"]
    assert list(history.epoch) == list(range(1, 16))
    assert history.loss.iloc[-1] < history.loss.iloc[0] / 2
    assert history.val_dice.between(0, 1).all() and history.val_dice.iloc[-1] > 0.5  # ~0.84: it segments
    assert json.loads((tmp_path / "train_summary.json").read_text()) == summary
    assert summary == {
        "dataset": "liver",
        "mlflow_run_id": summary["mlflow_run_id"],
        "mlflow_offline": False,
        "best_val_dice": history.val_dice.max(),
        "best_epoch": int(history.epoch[history.val_dice.idxmax()]),
        "epochs": 15,
        "device": CPU,
    }
    last, best = load_checkpoint(tmp_path / "last.pt"), load_checkpoint(tmp_path / "best.pt")
    assert last["epoch"] == 15 and last["config"] == as_trained(config).to_dict() and last["dataset"] == "liver"
    assert best["epoch"] == summary["best_epoch"] and best["best_metric"] == summary["best_val_dice"]
    assert reference_val_dice(tmp_path / "last.pt", tiny_dataset.processed) == pytest.approx(history.val_dice.iloc[-1], abs=1e-12)
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")

    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == config.mlflow.experiment
    assert run.data.params == {**{key: str(value) for key, value in as_trained(config).flat().items()}, "device": CPU}
    assert run.data.tags["device"] == CPU
    for column in ["lr", *LOSS_COLUMNS, "val_dice"]:
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, column))
        assert logged == list(zip(history.epoch, history[column])), column
    assert any(key.startswith("system/") for key in run.data.metrics)
    assert run.data.tags["dataset"] == "liver" and run.data.tags["data_hash"] == tracking.data_hash(tiny_dataset.processed)
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "history.csv", "curves.png", "train_summary.json"} <= artifacts


def test_bad_inputs_fail_clearly_and_write_nothing(straight, tiny_dataset, sqlite_store, tmp_path):
    config = tiny_config(sqlite_store)
    with pytest.raises(DataError, match="not found"):
        train(config, tmp_path / "absent", tmp_path / "out")
    no_train = shutil.copytree(tiny_dataset.processed, tmp_path / "no_train")
    manifest = pd.read_csv(no_train / "manifest.csv", dtype={"case_id": str})
    manifest.loc[manifest.split == "train", "split"] = "test"
    manifest.to_csv(no_train / "manifest.csv", index=False)
    with pytest.raises(DataError, match=r"manifest.csv: the 'train' split has no samples"):
        train(config, no_train, tmp_path / "out")
    with pytest.raises(CheckpointError, match="last.pt: checkpoint not found"):
        train(config, tiny_dataset.processed, tmp_path / "out", resume=True)
    assert not (tmp_path / "out").exists()

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "last.pt").write_bytes((straight / "last.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(config, tiny_dataset.processed, corrupt, resume=True)
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    shutil.copy(straight / "last.pt", other_model / "last.pt")
    with pytest.raises(CheckpointError, match="was trained with model"):
        train(tiny_config(sqlite_store, "model.width=8"), tiny_dataset.processed, other_model, resume=True)
    assert sorted(p.name for p in [*corrupt.iterdir(), *other_model.iterdir()]) == ["last.pt", "last.pt"]

    with pytest.raises(ConfigError, match=r"train.optimizer = 'adam' is invalid: expected 'sgd' or 'adamw'"):
        tiny_config(sqlite_store, "train.optimizer=adam")
    with pytest.raises(ConfigError, match=r"train.epochs = 'two' has the wrong type: expected int"):
        tiny_config(sqlite_store, "train.epochs=two")


@pytest.mark.slow
def test_two_process_ddp_run_writes_one_checkpoint_set_and_one_mlflow_run(tiny_dataset, tmp_path):
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [arg for item in TINY for arg in ("--set", item)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, "-m", "unet3plus", "train", "--data", str(tiny_dataset.processed), "--out", str(out), *overrides]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-5000:]

    written = sorted(path.name for path in out.iterdir())
    assert written == [".unet3plus-outputs.json", "best.pt", "curves.png", "history.csv", "last.pt", "train_summary.json"]
    last = load_checkpoint(out / "last.pt")
    assert len(last["rng"]) == 2  # both ranks trained (their RNG states are gathered into the checkpoint)
    assert not any(name.startswith("module.") for name in last["model"])  # the unwrapped model is saved
    client = mlflow.MlflowClient(uri)
    found = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    parents = [run for run in found if run.data.tags.get("study_parent") == "true"]
    runs = [run for run in found if run.data.tags.get("study_parent") != "true"]
    assert [run.info.run_id for run in runs] == [last["mlflow_run_id"]]  # one training run, from rank 0 only
    assert len(parents) == 1 and runs[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id  # its study
    assert json.loads((out / "train_summary.json").read_text())["mlflow_run_id"] == last["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED" and list(pd.read_csv(out / "history.csv").epoch) == [1, 2]


def rest(server_url: str, endpoint: str, **params: str) -> dict:
    response = requests.get(f"{server_url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    response.raise_for_status()
    return response.json()


def logged_val_dice(server_url: str, run_id: str) -> list[tuple[int, float]]:
    metrics = rest(server_url, "metrics/get-history", run_id=run_id, metric_key="val_dice")["metrics"]
    return sorted((metric["step"], metric["value"]) for metric in metrics)


@pytest.mark.slow
def test_training_against_a_tracking_server_is_readable_over_its_rest_api(
    mlflow_server, tiny_dataset, sqlite_store, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    config = tiny_config(sqlite_store)
    summary = train(config, tiny_dataset.processed, tmp_path)

    run = rest(mlflow_server.url, "runs/get", run_id=summary["mlflow_run_id"])["run"]
    assert run["info"]["status"] == "FINISHED" and not summary["mlflow_offline"]
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {
        **{k: str(v) for k, v in as_trained(config).flat().items()}, "device": CPU}
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}["dataset"] == "liver"
    history = pd.read_csv(tmp_path / "history.csv")
    assert logged_val_dice(mlflow_server.url, summary["mlflow_run_id"]) == list(zip(history.epoch, history.val_dice))
    artifacts = rest(mlflow_server.url, "artifacts/list", run_id=summary["mlflow_run_id"])["files"]
    assert {"config.yaml", "history.csv", "curves.png", "train_summary.json"} <= {a["path"] for a in artifacts}


@pytest.mark.slow
def test_a_server_dying_mid_training_loses_nothing(mlflow_server, tiny_dataset, sqlite_store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    config = tiny_config(sqlite_store, "train.epochs=3")
    with caplog.at_level(logging.WARNING), after_epoch(1, mlflow_server.kill):
        summary = train(config, tiny_dataset.processed, tmp_path)

    assert summary["mlflow_offline"] and summary["mlflow_run_id"] is not None and summary["epochs"] == 3
    assert [r.name for r in caplog.records if "continuing offline" in r.getMessage()] == ["unet3plus.tracking"]
    assert "--resume" in caplog.text  # the final warning says how to upload the rest
    assert list(pd.read_csv(tmp_path / "history.csv").epoch) == [1, 2, 3]
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 3 and (tmp_path / "best.pt").is_file()

    mlflow_server.start()  # back on the same port and store: a resume uploads what the run missed
    again = train(config, tiny_dataset.processed, tmp_path, resume=True)
    assert again["mlflow_run_id"] == summary["mlflow_run_id"] and not again["mlflow_offline"]
    history = pd.read_csv(tmp_path / "history.csv")
    assert logged_val_dice(mlflow_server.url, summary["mlflow_run_id"]) == list(zip(history.epoch, history.val_dice))


def test_epoch_sampler_is_a_seeded_permutation_when_oversampling_is_off():
    organ = np.array([1, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=np.float32)
    sampler = EpochSampler(organ, 0.0, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert first == _epoch(EpochSampler(organ, 0.0, seed=3), 1)  # a function of (seed, epoch) alone
    assert _epoch(sampler, 2) != first


def _epoch(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.8])
def test_epoch_sampler_oversamples_organ_slices_to_the_requested_share(fraction):
    organ = np.zeros(40, dtype=np.float32)
    organ[[3, 17, 25, 31]] = 1.0  # natural share 10 %
    order = _epoch(EpochSampler(organ, fraction, seed=0), 1)
    assert len(order) == 40
    assert sum(organ[i] for i in order) == round(fraction * 40)
    assert set(i for i in order if organ[i]) == {3, 17, 25, 31}
    free = [i for i in order if not organ[i]]
    assert len(free) == len(set(free))  # organ-free slices are not repeated


def test_epoch_sampler_shards_one_epoch_across_processes():
    organ = (np.arange(11) % 4 == 0).astype(np.float32)
    whole = EpochSampler(organ, 0.5, seed=1)
    whole.set_epoch(4)
    shards = [_epoch(EpochSampler(organ, 0.5, seed=1, rank=rank, world_size=2), 4) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6
    interleaved = [index for pair in zip(*shards) for index in pair]
    order = whole.epoch_order().tolist()
    assert interleaved == order + order[:1]  # padded to a multiple of the process count


def test_checkpoint_records_how_the_data_was_preprocessed_not_the_current_params(straight, sqlite_store):
    assert tiny_config(sqlite_store).data.size != 32  # params say one thing ...
    data = torch.load(straight / "last.pt", weights_only=True)["config"]["data"]
    assert data == dataclasses.asdict(TINY_DATA)  # ... the data another
