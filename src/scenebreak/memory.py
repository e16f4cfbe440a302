"""The memory policy of `learn` (`--memory auto|fast|low`).

- fast: everything stays in memory at once (weights, all gradients, AdamW's two fp32
  states): the quickest steps.
- low: gradient checkpointing, the phase-2 optimizer stepped inside the backward pass
  (one tensor at a time, so the gradients never all exist; clipping becomes per
  tensor), 8-bit AdamW on CUDA when bitsandbytes is installed, and on a GPU the VAE
  moved off it once the latents are cached.
- auto: low when the fast way would not fit in the memory the device has free, and
  for LoRA on the CPU, where it costs 9% time for 35% less memory (measured).
"""

from __future__ import annotations

import dataclasses

from .config import SD21_UNET_PARAMS, LearnConfig
from .events import Message, Reporter, silent

GiB = 2**30
# Activation memory of one 512x512 example through SD2.1-base's UNet with gradients
# (measured: phase 2 on the CPU at 20.3 GiB, of which 18.3 are weights, gradients and
# AdamW states). Autocast does not make it much smaller (fp32 copies remain around
# norms and softmax) and adds half-precision copies of the weights; with them the
# estimate matches both the CPU figures and phase 2 on an H200 (23 GiB).
ACTIVATIONS_PER_EXAMPLE_512 = 1.15 * GiB


def available_bytes(device) -> int:
    """Free memory where training runs: the GPU's for CUDA, the system's otherwise
    (Apple GPUs share it)."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device.torch)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def phase2_bytes(components, config: LearnConfig, resolution: int, autocast: bool, low: bool = False) -> int:
    """Roughly what phase 2 needs: every weight, plus per trained weight a gradient and
    two AdamW states (fast), or only the states, 8-bit ones where bitsandbytes does them
    (low); plus the activations of the batch (about a quarter with checkpointing)."""
    def count(*models) -> int:
        return sum(p.numel() for m in models for p in m.parameters())

    tunable = count(components.unet, components.text_encoder)
    total = tunable + count(components.vae)
    trained = 0 if config.tune == "lora" else tunable  # LoRA adapters are a few million parameters
    examples = 2 if config.prior else 1
    activations = ACTIVATIONS_PER_EXAMPLE_512 * count(components.unet) / SD21_UNET_PARAMS * (resolution / 512) ** 2 * examples
    if not low:
        cast_copies = 2 * tunable if autocast else 0  # autocast keeps a half-precision copy of each weight for the step
        return int(4 * total + 12 * trained + activations + cast_copies)
    per_trained = 2 if config.adam_8bit else 8
    return int(4 * total + per_trained * trained + activations / 4)


def choose(config: LearnConfig, components, device, resolution: int, report: Reporter = silent) -> LearnConfig:
    """The config with the memory switches the policy implies, said out loud."""
    import torch

    amp = device.train_dtype(config.mixed_precision)
    half = amp is not None
    policy, why, free = config.memory, "", None
    if policy == "auto" and config.tune == "lora" and device.type == "cpu":
        # Measured on the CPU: checkpointing LoRA costs 9% time for 35% less memory.
        policy, why = "low", "; for LoRA on the CPU it costs little time"
    elif policy == "auto":
        need, free = phase2_bytes(components, config, resolution, half), available_bytes(device)
        policy = "fast" if need <= 0.9 * free else "low"
        why = f"; fast needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free"
    if policy == "fast":
        config = dataclasses.replace(config, memory="fast")
        report(Message(f"memory: fast (all at once{why})"))
        return config
    from .optim import BNB_HINT, bitsandbytes_available

    in_backward = amp != torch.float16  # fp16 needs the loss scaler's check of all gradients first
    eight_bit = config.adam_8bit or (device.type == "cuda" and bitsandbytes_available())
    config = dataclasses.replace(config, memory="low", gradient_checkpointing=True, adam_8bit=eight_bit,
                                 optimizer_in_backward=in_backward)
    parts = ["gradient checkpointing"]
    if in_backward:
        parts.append("optimizer step inside the backward pass")
    if eight_bit:
        parts.append("8-bit AdamW")
    report(Message(f"memory: low ({', '.join(parts)}{why})"))
    need, free = phase2_bytes(components, config, resolution, half, low=True), free or available_bytes(device)
    if config.tune == "full" and need > free:
        report(Message(f"full tuning may not fit even so (about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free): "
                       "--tune lora needs far less", "warning"))
    if device.type == "cuda" and not eight_bit and config.tune == "full":
        report(Message(f"8-bit AdamW would save about 40% more on this GPU: {BNB_HINT}", "warning"))
    return config
