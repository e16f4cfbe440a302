"""LoRA's adapters as each phase needs them (Trainer._adapters_for): phase 1 runs
without them (their B matrices are still zero: they add nothing and pass no gradient),
and under autocast phase 2 gives them their input without peft's round trip through
fp32. The training is the same, bit for bit, with fewer operations per step."""

from __future__ import annotations

import collections
import contextlib

from torch.utils._python_dispatch import TorchDispatchMode

from scenebreak import LearnConfig, learn
from scenebreak.train.trainer import Trainer

REAL_STEP = Trainer.train_step


class CountOps(TorchDispatchMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def run(monkeypatch, scene_files, tiny_model, name: str) -> tuple[list[list[float]], dict[int, collections.Counter]]:
    """The losses of each step of a LoRA `learn`, and the operations of each phase's steps."""
    import scenebreak.train.trainer as trainer

    losses, ops = [], {1: collections.Counter(), 2: collections.Counter()}
    real_step = REAL_STEP

    def step(self, phase, steps):
        with CountOps(ops[phase]):
            record = real_step(self, phase, steps)
        losses.append(record.losses.tolist())
        return record

    monkeypatch.setattr(trainer.Trainer, "train_step", step)
    config = LearnConfig(steps1=2, steps2=2, num_class_images=1, seed=3, tune="lora", memory="fast")
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name=name, device="cpu")
    return losses, ops


def test_lora_skips_needless_adapter_work_and_trains_bit_for_bit_the_same(cpu_precision, monkeypatch, scene_files,
                                                                          tiny_model):
    import scenebreak.train.trainer as trainer

    lean_losses, lean_ops = run(monkeypatch, scene_files, tiny_model, "lean")
    monkeypatch.setattr(trainer.Trainer, "_adapters_for", lambda self, phase: contextlib.nullcontext())
    peft_losses, peft_ops = run(monkeypatch, scene_files, tiny_model, "peft")

    assert lean_losses == peft_losses and len(lean_losses) == 4  # exactly
    assert peft_losses[3] != peft_losses[2]  # (phase 2 trained the adapters)
    # Phase 1: no adapter products at all (two small matrix products per adapted layer, and their backward).
    assert lean_ops[1]["mm"] + lean_ops[1]["addmm"] < peft_ops[1]["mm"] + peft_ops[1]["addmm"]
    if cpu_precision == "bf16":  # the adapters' inputs are no longer widened to fp32 and narrowed back
        assert lean_ops[2]["_to_copy"] < peft_ops[2]["_to_copy"]
    else:  # fp32: nothing to skip in phase 2
        assert lean_ops[2] == peft_ops[2]
