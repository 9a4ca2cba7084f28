"""Checkpoints are data, not code: a crafted ``.pt`` is refused by every verb that reads one, and runs nothing.

The crafted files carry a pickle whose ``__reduce__`` would call ``os.system("touch <marker>")`` when
unpickled: the classic way a model file runs code on the machine that loads it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import sqlite_uri
from unet3plus import create_model
from unet3plus.checkpoint import load_checkpoint, save_checkpoint
from unet3plus.cli import main
from unet3plus.errors import CheckpointError


class Payload:
    """Unpickling this runs ``touch marker`` through the shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted(path: Path, marker: Path, zipped: bool = True) -> Path:
    """A file that looks like a unet3plus checkpoint but hides ``Payload`` in its config."""
    content = {"format": "unet3plus-checkpoint/1", "model": {}, "config": {"model": Payload(marker)},
               "dataset": "liver", "epoch": 1}  # fmt: skip
    if zipped:
        torch.save(content, path)  # torch's zip format, like every real .pt
    else:
        path.write_bytes(pickle.dumps(content, protocol=2))  # the legacy plain-pickle format
    return path


def test_the_crafted_file_does_run_code_with_the_unsafe_loader(tmp_path):
    """The attack is real: the loader the project used before (weights_only=False) runs it."""
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_load_checkpoint_refuses_a_crafted_file_naming_it_and_runs_nothing(tmp_path, zipped):
    marker = tmp_path / "pwned"
    path = crafted(tmp_path / "evil.pt", marker, zipped)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: refused to load") and "posix.system" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("verb", ["predict", "evaluate", "register", "train"])
def test_every_verb_that_reads_a_checkpoint_refuses_it_with_one_line_and_exit_2(
    verb, tiny_dataset, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(tmp_path))
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    evil = crafted(out / ("last.pt" if verb == "train" else "best.pt"), marker)
    (tmp_path / "metrics.json").write_text('{"dice": 0.9, "dataset": "liver"}')
    scan = sorted((tiny_dataset.raw).glob("volume-*.nii"))[0]
    argv = {
        "predict": ["--model", str(evil), "--input", str(scan), "--output", "m.nii.gz"],
        "evaluate": ["--checkpoint", str(evil), "--data", str(tiny_dataset.processed), "--raw", str(tiny_dataset.raw),
                     "--out", "evaluation"],
        "register": ["--checkpoint", str(evil), "--metrics", "metrics.json"],
        "train": ["--data", str(tiny_dataset.processed), "--out", str(out), "--resume"],
    }[verb]  # fmt: skip
    assert main([verb, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {evil}: refused to load") and err.count("\n") == 1 and "Traceback" not in err
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "out"]  # nothing written, no mlflow.db


def test_training_checkpoints_round_trip_through_the_safe_loader(tmp_path):
    """RNG states (NumPy arrays, Python tuples) and NumPy metrics are stored as plain data, values intact."""
    np.random.seed(7)
    state = np.random.get_state()
    expected = np.random.rand(3)
    weights = create_model("unet3plus", width=4).state_dict()
    payload = {"model": weights, "config": {"model": {"width": 4}}, "dataset": "liver", "epoch": 1,
               "rng": [{"numpy": state, "torch": torch.get_rng_state()}],
               "history": [{"val_dice": np.float64(0.25)}]}  # fmt: skip
    loaded = load_checkpoint(save_checkpoint(tmp_path / "last.pt", payload))
    assert loaded["history"] == [{"val_dice": 0.25}] and type(loaded["history"][0]["val_dice"]) is float
    assert all(torch.equal(loaded["model"][key], value) for key, value in weights.items())
    np.random.seed(0)
    np.random.set_state(loaded["rng"][0]["numpy"])
    assert np.array_equal(np.random.rand(3), expected)
