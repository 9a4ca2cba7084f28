"""Training checkpoints: one format, written atomically, read with clear errors.

A checkpoint is a ``torch.save`` dict with at least:

- ``format``: ``"unet3plus-checkpoint/1"``
- ``model``: the model's ``state_dict``
- ``config``: ``Config.to_dict()`` of the run (``config["model"]`` rebuilds the network,
  ``config["data"]`` repeats the preprocessing at prediction time)
- ``dataset``: ``"liver"`` or ``"spleen"``
- ``epoch``, ``best_metric`` and, in training checkpoints, ``optimizer``, ``scheduler``, ``rng``
- ``mlflow_run_id``: the training run (or None when tracking was unavailable)
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unet3plus.errors import CheckpointError
from unet3plus.utils import atomic_path

logger = logging.getLogger(__name__)

FORMAT = "unet3plus-checkpoint/1"
REQUIRED_KEYS = ("format", "model", "config", "dataset", "epoch")


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus the format tag) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, or not a unet3plus checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # weights_only=False: the checkpoint holds RNG states and plain config dicts we wrote.
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint, the file is truncated or corrupt ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unet3plus checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    return payload


def model_from_checkpoint(checkpoint: dict[str, Any]) -> nn.Module:
    """Rebuild the network described by ``checkpoint["config"]["model"]`` and load its weights.

    The model is returned in eval mode on the CPU. Encoder weight files are not needed: the
    checkpoint holds every weight.
    """
    from unet3plus.models import create_model

    model_kwargs = dict(checkpoint["config"]["model"])
    model_kwargs["encoder_weights"] = None
    model = create_model(**model_kwargs)
    model.load_state_dict(checkpoint["model"])
    return model.eval()
