"""A training step never makes the CPU wait for the device: no tensor is turned into a
Python value inside `Trainer.train_step` (on a GPU each such read is a synchronisation
that stalls the queue of kernels, and a data-dependent branch that breaks a captured
graph). Checked on the CPU by trapping every conversion during the steps of a real
`learn`, on the tiny SD and the tiny FLUX, in both phases, with prior preservation."""

from __future__ import annotations

import pytest
import torch

from scenebreak import LearnConfig, learn

CONVERSIONS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "numpy")


@pytest.fixture
def trapped_steps(monkeypatch):
    """Every tensor-to-Python conversion made inside a training step, by kind."""
    import scenebreak.train.trainer as trainer

    seen: list[str] = []
    real_step = trainer.Trainer.train_step

    def step(self, phase, steps):
        real = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

        def trap(name):
            def converted(tensor, *args, **kwargs):
                seen.append(name)
                return real[name](tensor, *args, **kwargs)
            return converted

        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, trap(name))
        try:
            return real_step(self, phase, steps)
        finally:
            for name in CONVERSIONS:
                monkeypatch.setattr(torch.Tensor, name, real[name])

    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    return seen


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_no_step_reads_a_tensor_back(family, trapped_steps, scene_files, tmp_path, tiny_model):
    from tinymodels import build_tiny_flux

    model = build_tiny_flux(tmp_path / "flux") if family == "flux" else tiny_model
    result = learn(scene_files["image"], scene_files["masks"],
                   LearnConfig(steps1=2, steps2=2, num_class_images=1, tune="lora" if family == "flux" else "full"),
                   base_model=str(model), name=family)
    assert result.losses["phase2"]["steps"] == 2
    assert trapped_steps == [], f"tensors read back inside a step: {sorted(set(trapped_steps))}"
