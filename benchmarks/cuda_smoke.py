"""CUDA smoke test: learn and generate on the tiny model with each mixed precision,
the fused and (if installed) 8-bit optimizers, gradient checkpointing, --memory low
(VAE off the GPU, optimizer in the backward pass), LoRA and torch.compile. The test
suite runs on the CPU only; this exercises the GPU code paths where a GPU exists.

    python benchmarks/cuda_smoke.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main() -> None:
    import torch

    from conftest import write_synthetic_scene
    from scenebreak import GenerateConfig, LearnConfig, generate, learn
    from tinymodels import build_tiny_model

    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    tmp = Path(tempfile.mkdtemp())
    os.environ["SCENEBREAK_HOME"] = str(tmp / "home")
    model = build_tiny_model(tmp / "tiny-sd")
    image, red, blue = write_synthetic_scene(tmp / "inputs")
    variants = {"bf16": {}, "fp16": {"mixed_precision": "fp16"}, "fp32": {"mixed_precision": "no"},
                "checkpointing": {"gradient_checkpointing": True}, "memory-low": {"memory": "low"},
                "memory-low-fp16": {"memory": "low", "mixed_precision": "fp16"}, "lora": {"tune": "lora"},
                "compile": {"compile": True}}
    try:
        import bitsandbytes  # noqa: F401

        variants["adam8bit"] = {"adam_8bit": True}
    except ImportError:
        pass
    rows = []
    for label, extra in variants.items():
        started = time.perf_counter()
        result = learn(image, [red, blue], LearnConfig(steps1=5, steps2=5, num_class_images=2, **extra),
                       base_model=str(model), device="cuda", name=label)
        images = generate(result.path, "<asset1> on the moon", GenerateConfig(num_images=2, steps=5, seed=0),
                          out_dir=tmp / "out", device="cuda")
        rows.append({"variant": label, "ok": True, "seconds": round(time.perf_counter() - started, 1),
                     "loss_last": result.losses["phase2"]["loss_last"], "images": len(images.images)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
