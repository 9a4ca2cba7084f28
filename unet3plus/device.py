"""Device and precision choice: the one recipe that train, evaluate and predict share."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from pathlib import Path

import torch

from unet3plus.errors import ConfigError, UserError

REQUIRE_CUDA_ENV = "UNET3PLUS_REQUIRE_CUDA"
"""``1`` on the pipeline's GPU steps: there, in a Kubernetes pod, ``auto`` refuses to fall back to the CPU
(:func:`select_device`). ``kfp.local`` runs the same steps on this machine: no pod, no refusal."""

MIN_DRIVER = {"12": "525.60.13", "13": "580.65.06"}
"""Oldest Linux NVIDIA driver per CUDA major version of the torch build (CUDA minor-version compatibility)."""


def nvidia_driver_version(proc_file: str | os.PathLike = "/proc/driver/nvidia/version") -> str | None:
    """The NVIDIA kernel driver's version (``580.65.06``), or None when no driver is visible."""
    try:
        text = Path(proc_file).read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return match.group(1) if match else None


def cuda_unavailable_reason(driver: str | None) -> str:
    """Why CUDA is unavailable, naming the torch build's CUDA version and the driver it needs against ``driver``."""
    cuda = torch.version.cuda
    if cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    needed = MIN_DRIVER.get(cuda.split(".")[0], "?")
    if driver is None:
        return (f"no NVIDIA driver is visible in this container (torch {torch.__version__} is built for CUDA {cuda}, "
                f"driver >= {needed}); is the pod on a GPU node with the NVIDIA container runtime?")
    return (f"torch {torch.__version__} is built for CUDA {cuda}, which needs NVIDIA driver >= {needed}, but this "
            f"node's driver is {driver}; use the image built with --build-arg TORCH_CUDA=cu128 (CUDA 12, driver >= "
            f"{MIN_DRIVER['12']}) or GPU nodes with a newer driver")


def cpu_name(proc_file: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU model (``AMD EPYC 7B13``) from ``/proc/cpuinfo``, else ``platform.processor()`` or the machine type.

    Float results depend on it (SIMD kernels, summation order), so runs record it.
    """
    with contextlib.suppress(OSError):
        for line in Path(proc_file).read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_device(device: torch.device) -> str:
    """What a run records as its device: ``cuda:0 (NVIDIA H200, CUDA 13.0, driver 580.65.06)`` or
    ``cpu (AMD EPYC 7B13, 8 threads)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return (f"cuda:{index} ({torch.cuda.get_device_name(index)}, CUDA {torch.version.cuda}, "
                f"driver {nvidia_driver_version() or 'unknown'})")
    return f"{device.type} ({cpu_name()}, {torch.get_num_threads()} threads)"


def select_device(preference: str = "auto", key: str = "device") -> torch.device:
    """Return the torch device to use.

    Args:
        preference: ``"auto"`` (CUDA when available, else CPU; CUDA required in a pod the pipeline
            gave GPUs, :data:`REQUIRE_CUDA_ENV`), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        key: the setting that chose it (``train.device``), for the message.

    Raises:
        UserError: GPUs were requested (:data:`REQUIRE_CUDA_ENV`) but CUDA is unavailable; the
            message names the torch build's CUDA version, the driver it needs and the node's.
        ConfigError: CUDA (or that GPU index) is asked for but not available.
    """
    if preference == "auto":
        on_gpu_pod = os.environ.get(REQUIRE_CUDA_ENV) == "1" and "KUBERNETES_SERVICE_HOST" in os.environ
        if on_gpu_pod and not torch.cuda.is_available():
            raise UserError(f"GPUs were requested for this step, but CUDA is unavailable: "
                            f"{cuda_unavailable_reason(nvidia_driver_version())}")
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
