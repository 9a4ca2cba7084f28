"""Device choice: GPU steps refuse to fall back to the CPU, naming the driver/CUDA mismatch; the device is described."""

import platform

import pytest
import torch

from unet3plus import device as device_module
from unet3plus.device import cpu_name, describe_device, nvidia_driver_version, select_device
from unet3plus.errors import UserError

PROPRIETARY = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\nGCC version: 12\n"
OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder)\n"


@pytest.mark.parametrize(("text", "version"), [(PROPRIETARY, "550.54.15"), (OPEN, "580.65.06"), ("garbage", None)])
def test_the_driver_version_is_read_from_the_kernel_module(tmp_path, text, version):
    (tmp_path / "version").write_text(text)
    assert nvidia_driver_version(tmp_path / "version") == version
    assert nvidia_driver_version(tmp_path / "absent") is None


@pytest.fixture
def no_cuda(monkeypatch):
    """A CUDA 13 torch build on a node where CUDA does not come up."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # in a pod (kfp.local runs have no refusal)


def test_auto_falls_back_to_the_cpu_unless_gpus_were_requested(no_cuda, monkeypatch):
    monkeypatch.delenv("UNET3PLUS_REQUIRE_CUDA", raising=False)
    assert select_device("auto") == torch.device("cpu")
    monkeypatch.setenv("UNET3PLUS_REQUIRE_CUDA", "1")
    assert select_device("cpu") == torch.device("cpu")  # an explicit choice stands
    with pytest.raises(UserError) as refused:
        select_device("auto")
    assert "CUDA is unavailable" in str(refused.value) and "\n" not in str(refused.value)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    assert select_device("auto") == torch.device("cpu")  # kfp.local on a laptop: the same step, no pod


def test_the_refusal_names_the_cuda_build_the_driver_it_needs_and_the_nodes(no_cuda, monkeypatch):
    monkeypatch.setenv("UNET3PLUS_REQUIRE_CUDA", "1")
    monkeypatch.setattr(device_module, "nvidia_driver_version", lambda: "550.54.15")
    with pytest.raises(UserError, match=r"built for CUDA 13\.0, which needs NVIDIA driver >= 580\.65\.06, but this "
                                        r"node's driver is 550\.54\.15; use the image built with --build-arg "
                                        r"TORCH_CUDA=cu128"):
        select_device("auto")
    monkeypatch.setattr(device_module, "nvidia_driver_version", lambda: None)
    with pytest.raises(UserError, match="no NVIDIA driver is visible in this container"):
        select_device("auto")


def test_a_cpu_device_is_described_with_its_model_and_threads(tmp_path):
    assert describe_device(torch.device("cpu")) == f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n")
    assert cpu_name(cpuinfo) == "AMD EPYC 7B13 64-Core Processor"
    assert cpu_name(tmp_path / "absent") == (platform.processor() or platform.machine() or "unknown CPU")
