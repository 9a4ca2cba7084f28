"""Device and precision choice: the one recipe that train, evaluate and predict share."""

from __future__ import annotations

import contextlib

import torch


def select_device(preference: str = "auto", key: str = "device") -> torch.device:
    """Return the torch device to use.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
            ``"cuda:N"``.
        key: the setting that chose it (``train.device``), for the message.

    Raises:
        ConfigError: CUDA (or that GPU index) is asked for but not available.
    """
    from unet3plus.errors import ConfigError

    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} = {preference!r}: CUDA is not available on this machine; use 'auto' or 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key} = {preference!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                          f"numbered from 0")
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
