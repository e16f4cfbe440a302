"""The benchmarks' own code paths, on the tiny model: a benchmark that breaks only shows
up on the GPU machine, where each minute is scarce (the baseline once failed there)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARKS / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize("phase", [1, 2])
def test_original_style_baseline_trains_on_the_tiny_model(train_step, phase):
    source = train_step.ModelSource(tiny=True, reuse=True)
    row = train_step.measure("original-style", phase, 1, "cpu", 64, source)
    assert row["kind"] == "original-style" and row["steps_timed"] == 1 and row["s_per_step"] > 0


def test_sdxl_note_says_what_auto_chose(train_step):
    rows = [{"kind": "scenebreak defaults", "phase": 1, "memory": "low", "tune": "lora", "half_frozen": True, "precision": "bf16"}]
    note = train_step.sdxl_defaults_note(rows, "cuda")
    assert "`--tune lora --memory low` with frozen weights in bf16" in note and "fp16 on CUDA" in note
