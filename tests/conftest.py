"""Shared fixtures: a tiny random Stable Diffusion saved as a diffusers folder, a
synthetic photo with two exact masks, and one small learned scene. Everything runs
offline on the CPU. Plain helpers are in helpers.py."""

from __future__ import annotations

import pytest
from helpers import SMALL, learn_once, write_synthetic_scene


@pytest.fixture(autouse=True, scope="session")
def ctrl_c_heard():
    """The tests that press Ctrl-C (on this process: a Ray batch; on the children it
    starts: ui, learn) need SIGINT heard. A shell without job control starts a background
    command (`pytest ... &` in a script, a CI step run so) with SIGINT ignored, which
    Python and the children then keep: those tests waited forever for a stop."""
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Each test gets its own scenebreak home; nothing may touch the network."""
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SCENEBREAK_DEVICE", "cpu")
    monkeypatch.delenv("SCENEBREAK_BASE_MODEL", raising=False)
    from scenebreak import kept

    kept.drop()  # (a pipeline an earlier test's generate kept would serve this one's: each loads its own)
    yield
    kept.drop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from tinymodels import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture
def scene_files(tmp_path):
    image, red, blue = write_synthetic_scene(tmp_path / "inputs")
    return {"image": image, "masks": [red, blue]}


@pytest.fixture(scope="session")
def learned(tmp_path_factory, tiny_model):
    """One scene learned with the real pipeline, shared by read-only tests."""
    from scenebreak import LearnConfig

    return learn_once(tmp_path_factory.mktemp("learned"), tiny_model, LearnConfig(**SMALL))


@pytest.fixture(scope="session")
def learned_background(tmp_path_factory, tiny_model):
    """The synthetic scene learned with a <background> handle too (shared, read-only)."""
    from scenebreak import LearnConfig

    return learn_once(tmp_path_factory.mktemp("learned-bg"), tiny_model, LearnConfig(steps1=2, steps2=2, prior=False, background=True))


@pytest.fixture(scope="session")
def tiny_segmentation(tmp_path_factory):
    """A tiny random Grounding DINO and SAM saved as local folders: (detector, segmenter)."""
    from tinymodels import build_tiny_segmentation_models

    return build_tiny_segmentation_models(tmp_path_factory.mktemp("segmentation"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL (two text encoders, text_time conditioning, 8x VAE) saved as a
    diffusers folder whose model_index.json names StableDiffusionXLPipeline."""
    from tinymodels import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def learned_sdxl(tmp_path_factory, tiny_sdxl):
    """The synthetic scene learned on the tiny SDXL, with prior preservation and a
    <background> handle (shared, read-only)."""
    from scenebreak import LearnConfig

    return learn_once(tmp_path_factory.mktemp("learned-sdxl"), tiny_sdxl,
                       LearnConfig(steps1=3, steps2=2, num_class_images=1, background=True))


@pytest.fixture(params=["bf16", "fp32"])
def cpu_precision(request, monkeypatch):
    """Runs a precision-sensitive test both ways on every CPU: as on one with bf16
    instructions (SCENEBREAK_CPU_BF16=1; torch emulates them where they are missing)
    and as on one without (SCENEBREAK_CPU_BF16=0: fp32). Returns "bf16" or "fp32"."""
    from scenebreak.device import CPU_BF16_ENV

    monkeypatch.setenv(CPU_BF16_ENV, "1" if request.param == "bf16" else "0")
    return request.param


def pytest_report_header(config):
    """The CPU, whether it has bf16 instructions and torch's thread count: what the
    mechanics tests' figures depend on (tests/train/test_mechanics.py)."""
    import os
    import platform

    import torch

    from scenebreak.device import CPU_BF16_ENV, cpu_bf16_instructions

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    override = f" ({CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]})" if os.environ.get(CPU_BF16_ENV) else ""
    bf16 = "yes" if cpu_bf16_instructions() else "no"
    return f"cpu: {cpu}; bf16 instructions: {bf16}{override}; torch threads: {torch.get_num_threads()}"
