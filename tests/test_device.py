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
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a machine without the card
    with pytest.raises(DeviceNotAvailable, match="CUDA is not available on this machine"):
        choose_device("cuda")
    # A CPU-only build (PyPI's on Windows) never sees an NVIDIA card: say so, and how to get one that does.
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceNotAvailable, match=r"was built without CUDA: .*--index-url"):
        choose_device("cuda")


def test_precision_per_device():
    import torch

    from scenebreak.device import cpu_has_bf16

    cpu = choose_device("cpu")
    assert cpu.train_dtype("auto") is (torch.bfloat16 if cpu_has_bf16() else None)  # fp32 without bf16 instructions
    assert cpu.train_dtype("no") is None and cpu.train_dtype("fp32") is None  # (sampling's --precision says fp32)
    from scenebreak.config import LearnConfig

    assert LearnConfig(mixed_precision="fp32") == LearnConfig(mixed_precision="no")  # one run, for --resume
    with pytest.raises(InvalidInput, match="needs a CUDA device"):
        cpu.train_dtype("fp16")


def test_bf16_on_the_cpu_only_where_it_has_the_instructions(monkeypatch):
    import torch

    from scenebreak import device as device_module

    cpu = choose_device("cpu")
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    assert cpu.train_dtype("bf16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(InvalidInput, match="no bf16 instructions"):
        cpu.train_dtype("bf16")


def test_scenebreak_cpu_bf16_makes_the_cpu_act_with_or_without_bf16(monkeypatch):
    """How the suite tests both kinds of CPU on either: 0 acts as a CPU without bf16
    instructions (fp32, bf16 refused), 1 as one with them."""
    import torch

    from scenebreak.device import cpu_bf16_instructions, cpu_has_bf16

    cpu = choose_device("cpu")
    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "0")
    assert not cpu_has_bf16()
    assert cpu.train_dtype("auto") is None and cpu.sampling_precision("auto") == (torch.float32, None)
    for choose in (cpu.train_dtype, cpu.sampling_precision):
        with pytest.raises(InvalidInput, match="no bf16 instructions"):
            choose("bf16")
    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")
    assert cpu_has_bf16()
    assert cpu.train_dtype("auto") is torch.bfloat16 and cpu.train_dtype("bf16") is torch.bfloat16
    assert cpu.sampling_precision("auto") == (torch.float32, torch.bfloat16)
    monkeypatch.delenv("SCENEBREAK_CPU_BF16")
    assert cpu_has_bf16() == cpu_bf16_instructions()


@pytest.mark.parametrize("machine, avx512_bf16, amx, onednn, native", [
    ("x86_64", False, False, True, False),  # AVX-512 without bf16 (Skylake to Ice Lake): oneDNN emulates it
    ("x86_64", True, False, True, True),  # Cooper Lake, Zen 4
    ("AMD64", False, True, True, True),  # Sapphire Rapids and later (Windows spells the machine so)
    ("aarch64", False, False, True, True),  # Arm's BF16 extension: oneDNN's check is the instruction's
    ("arm64", False, False, False, False),
])
def test_bf16_instructions_are_the_native_ones_not_onednns_emulation(monkeypatch, machine, avx512_bf16, amx, onednn,
                                                                     native):
    import platform

    import torch

    from scenebreak.device import cpu_bf16_instructions

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert cpu_bf16_instructions() is native


def test_a_bad_scenebreak_cpu_bf16_is_one_line_and_exit_2(scene_files, monkeypatch):
    from click.testing import CliRunner

    from scenebreak.cli.commands import cli

    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "no")
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"])])
    assert result.exit_code == 2, result.output
    assert "SCENEBREAK_CPU_BF16='no': use 0" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_autocast_is_turned_off_even_where_torch_has_none_for_mps(monkeypatch):
    """torch before 2.5 refuses torch.autocast("mps", enabled=False) (an unsupported device
    type), and decoding, blending and the attention maps turn autocast off around their
    fp32 work: on such a torch they failed on every Mac."""
    import contextlib

    import torch

    from scenebreak import device

    real = torch.autocast

    def torch_2_4(device_type, *args, **kwargs):
        if device_type == "mps":
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return real(device_type, *args, **kwargs)

    device._mps_autocast.cache_clear()
    monkeypatch.setattr(torch, "autocast", torch_2_4)
    try:
        assert isinstance(device.autocast_off("mps"), contextlib.nullcontext)
        with device.autocast_off("mps"):
            pass
        with torch.autocast("cpu", dtype=torch.bfloat16), device.autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
    finally:
        device._mps_autocast.cache_clear()
