"""Small helpers used everywhere: atomic writes, device and precision choice, logging setup."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    The temporary file lives in the same directory (same filesystem), so the final
    ``os.replace`` is atomic: readers see either the old file or the complete new one, never a
    half-written file. On any exception the temporary file is removed and ``path`` is untouched.

    The temporary name keeps the final suffix (``x.npz`` -> ``.x.npz.<random>.tmp.npz``) so that
    libraries which choose a format from the suffix (numpy, nibabel, matplotlib) behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name, not a created file (mkstemp would make it 0600): the writer creates it with
    # the usual permissions.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented, key-sorted JSON to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def select_device(preference: str = "auto") -> torch.device:
    """Return the torch device to use.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.

    Raises:
        ValueError: if CUDA is asked for but not available.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return device


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The mixed-precision context for ``device``: bf16 autocast on CUDA, full precision on CPU.

    CPU training stays in float32 because bf16 on CPU is slower than fp32 on most cores and would
    make CPU runs non-comparable with the tests' float references.
    """
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def memory_format_for(device: torch.device, mixed_precision: bool = True) -> torch.memory_format:
    """``channels_last`` where bf16 autocast runs (CUDA): cuDNN's bf16 convolutions are NHWC-native,
    so NCHW tensors would be transposed around every convolution. Contiguous elsewhere."""
    if mixed_precision and device.type == "cuda":
        return torch.channels_last
    return torch.contiguous_format


def prepare_model(model: torch.nn.Module, device: torch.device, mixed_precision: bool = True) -> torch.nn.Module:
    """Move ``model`` to ``device`` in the layout of :func:`memory_format_for`; on CUDA turn on
    ``cudnn.benchmark`` (every batch of a run has the same size, so the autotuned kernels are
    chosen once and reused). Train, evaluate and predict all go through here."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device, memory_format=memory_format_for(device, mixed_precision))


def setup_logging(verbosity: int = 0) -> None:
    """Configure root logging once for command-line use (``-v`` for debug)."""
    level = logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "git", "alembic", "matplotlib", "PIL", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
