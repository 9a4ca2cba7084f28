"""Device and precision choice: the one recipe that train, evaluate and predict share."""

from __future__ import annotations

import contextlib

import torch


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


def prepare_model(
    model: torch.nn.Module,
    device: torch.device,
    mixed_precision: bool = True,
    memory_format: torch.memory_format | None = None,
) -> torch.nn.Module:
    """Move ``model`` to ``device`` in ``memory_format`` (default: the layout of
    :func:`memory_format_for`); on CUDA turn on ``cudnn.benchmark`` (every batch of a run has the
    same size, so the autotuned kernels are chosen once and reused). Train, evaluate and predict
    all go through here."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return model.to(device, memory_format=memory_format or memory_format_for(device, mixed_precision))
