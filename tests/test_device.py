import pytest

from scenebreak.device import choose_device
from scenebreak.errors import DeviceNotAvailable, InvalidInput


def test_cpu_and_env_override(monkeypatch):
    assert choose_device("cpu").type == "cpu"
    monkeypatch.setenv("SCENEBREAK_DEVICE", "cpu")
    assert choose_device(None).type == "cpu"
    monkeypatch.delenv("SCENEBREAK_DEVICE")
    assert choose_device("auto").type in ("cuda", "mps", "cpu")


def test_unknown_or_absent_devices(monkeypatch):
    import torch

    with pytest.raises(DeviceNotAvailable, match="unknown device"):
        choose_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceNotAvailable, match="CUDA is not available"):
        choose_device("cuda")


def test_precision_per_device():
    cpu = choose_device("cpu")
    assert cpu.train_dtype("auto") is None  # fp32 on the CPU
    with pytest.raises(InvalidInput, match="needs a CUDA device"):
        cpu.train_dtype("fp16")
