"""Training checkpoints: one format, written atomically, read with clear errors.

A checkpoint is a ``torch.save`` dict with at least:

- ``format``: ``"unet3plus-checkpoint/1"``
- ``model``: the model's ``state_dict``
- ``config``: ``Config.to_dict()`` of the run (``config["model"]`` rebuilds the network,
  ``config["data"]`` repeats the preprocessing at prediction time)
- ``dataset``: ``"liver"`` or ``"spleen"``
- ``epoch``, ``best_metric`` and, in training checkpoints, ``optimizer``, ``scheduler``, ``rng``
- ``mlflow_run_id``: the training run (or None when tracking was unavailable)

Checkpoints are data, not code: they hold only tensors and plain Python values (dicts, lists,
tuples, strings, numbers, None; :func:`save_checkpoint` turns NumPy arrays and scalars into
lists and numbers), and :func:`load_checkpoint` reads them with ``torch.load(weights_only=True)``,
so a crafted ``.pt`` that would run code when unpickled is refused instead.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
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
        torch.save(plain_data({"format": FORMAT, **payload}), tmp)
    return Path(path)


def plain_data(value: Any) -> Any:
    """``value`` with NumPy arrays and scalars (e.g. RNG states, metrics) as Python lists and numbers.

    Containers (dict, list, tuple) are copied recursively; tensors and other values are kept as
    they are. The result is what the ``weights_only`` loader accepts.
    """
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_data(item) for item in value)
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Only tensors and plain Python data are unpickled (``weights_only=True``): a file that asks for
    any other Python object (which could run code on load) is refused before that object is made.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds Python objects other than
            tensors and plain data, or is not a unet3plus checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    corrupt = f"{path}: cannot read checkpoint, the file is truncated or corrupt"
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names the first object it refused to create.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            detail = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
            raise CheckpointError(f"{corrupt} ({detail.group(1) if detail else err})") from err
        raise CheckpointError(
            f"{path}: refused to load: the file asks for the Python object {found.group(1)}, which could run code; "
            "a unet3plus checkpoint holds only tensors and plain data (load only checkpoints made by `unet3plus train`)"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(f"{corrupt} ({err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a unet3plus checkpoint (expected format {FORMAT!r})")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    check_model_schema(payload, path)
    return payload


def check_model_schema(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Check a checkpoint's model against the schema before a network is built from it.

    ``config["model"]`` must be a valid ``model`` section (known keys, values within the bounds of
    :class:`unet3plus.config.ModelConfig`, e.g. ``width``), and ``model`` must hold exactly the
    tensors, with the shapes, of that network, which is built on the meta device: no memory is
    allocated for a checkpoint that does not fit.

    Raises:
        CheckpointError: naming the file and the first problem.
    """
    from unet3plus.config import config_from_dict
    from unet3plus.errors import ConfigError
    from unet3plus.models import create_model

    try:
        model_config = config_from_dict({"model": payload["config"]["model"]}).model
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{path}: the checkpoint's model configuration is invalid ({err})") from err
    with torch.device("meta"):
        expected = create_model(**{**vars(model_config), "encoder_weights": None}).state_dict()
    state = payload["model"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    differences = [f"{len(keys)} {what}, e.g. {keys[0]}" for what, keys in
                   (("missing", sorted(set(expected) - set(state))), ("unexpected", sorted(set(state) - set(expected))))
                   if keys]
    if differences:
        raise CheckpointError(f"{path}: the weights do not belong to the model its configuration describes "
                              f"({'; '.join(differences)})")
    for key, reference in expected.items():
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(reference.shape):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise CheckpointError(f"{path}: weight {key} has shape {shape}, the model expects "
                                  f"{tuple(reference.shape)} (truncated or from another model)")


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
