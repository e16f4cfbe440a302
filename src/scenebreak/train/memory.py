"""The memory policy of `learn` (`--memory auto|fast|low`): what the run will do to
fit, decided once before training and explained.

- fast: everything stays in memory at once (weights, all gradients, AdamW's two fp32
  states): the quickest steps.
- low: gradient checkpointing, the phase-2 optimizer stepped inside the backward pass
  (one tensor at a time, so the gradients never all exist; clipping becomes per
  tensor), 8-bit AdamW on CUDA when bitsandbytes is installed, and on a GPU the VAE
  moved off it once the latents are cached.
- auto: low when the fast way would not fit in the memory the device has free, and
  for LoRA on the CPU, where it costs 9% time for 35% less memory (measured).

It also settles `--tune auto` (the default): full tuning (the paper) where the memory
policy can make it fit, LoRA otherwise (SDXL's 3.5 billion weights with fp32 AdamW
need over 50 GB); and on GPUs, weights that never train (the base model under LoRA)
are kept in the autocast precision.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..config import LearnConfig
from ..estimates import size_scale
from ..errors import InvalidInput

GiB = 2**30
# Activation memory of one 512x512 example through SD2.1-base's UNet with gradients
# (measured: phase 2 on the CPU at 20.3 GiB, of which 18.3 are weights, gradients and
# AdamW states). Autocast does not make it much smaller (fp32 copies remain around
# norms and softmax) and adds half-precision copies of the weights; with them the
# estimate matches both the CPU figures and phase 2 on an H200 (23 GiB).
ACTIVATIONS_PER_EXAMPLE_512 = 1.15 * GiB


@dataclass(frozen=True)
class MemoryPlan:
    """What `learn` does to fit in memory, and why."""

    policy: str  # fast | low
    gradient_checkpointing: bool
    optimizer_in_backward: bool  # phase 2 steps each tensor inside the backward pass
    adam_8bit: bool
    offload_vae: bool  # the VAE leaves the GPU once every latent is cached
    reason: str = ""  # why auto chose this policy ("" when asked for)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    tune: str = "full"  # full | lora: what phase 2 tunes (settles --tune auto)
    tune_reason: str = ""  # why --tune auto chose it
    half_frozen: bool = False  # never-trained weights live in the autocast precision (GPUs)
    quantize: str = "none"  # none | nf4 | int8: the frozen base under LoRA (families/quantized.py)
    quantize_reason: str = ""  # why auto chose it

    def describe(self) -> str:
        if self.policy == "fast":
            parts = ["all at once"]
        else:
            parts = ["gradient checkpointing"]
            if self.optimizer_in_backward:
                parts.append("optimizer step inside the backward pass")
        if self.adam_8bit:
            parts.append("8-bit AdamW")
        elif self.policy == "fast" and self.gradient_checkpointing:
            parts.append("gradient checkpointing")
        if self.quantize != "none":
            parts.append(f"frozen base in {self.quantize}" + (f", {self.quantize_reason}" if self.quantize_reason else ""))
        elif self.half_frozen:
            parts.append("frozen weights in half precision")
        text = f"memory: {self.policy} ({', '.join(parts)}{'; ' + self.reason if self.reason else ''})"
        if self.tune_reason:
            text += f"; tuning: {self.tune} ({self.tune_reason})"
        return text

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "warnings"}


def available_bytes(device) -> int:
    """Free memory where training runs: the GPU's for CUDA; on an Apple GPU what Metal
    recommends for one process, less what it holds already (and never more than the
    system has free); the system's on the CPU."""
    import psutil

    system = int(psutil.virtual_memory().available)
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device.torch)
        return int(free)
    if device.type == "mps":
        import torch

        try:
            return min(system, int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()))
        except (AttributeError, RuntimeError):  # an older torch
            return system
    return system


def phase2_bytes(components, config: LearnConfig, resolution: int, autocast: bool, low: bool = False,
                 adam_8bit: bool = False, half_frozen: bool = False, gradients_kept: bool = False) -> int:
    """Roughly what phase 2 needs: every weight (2 bytes for a frozen one held in half
    precision, `half_frozen`), plus per trained weight a gradient and two AdamW states
    (fast), or only the states, 8-bit ones where bitsandbytes does them (low; its
    gradients too where the optimizer cannot step inside the backward pass,
    `gradients_kept`: fp16's loss scaler checks them all first); plus the activations
    of the batch (about a quarter with checkpointing)."""
    def count(*models) -> int:
        return sum(p.numel() for m in models for p in m.parameters())

    tunable = count(components.denoiser, *components.text_encoders)
    vae = count(components.vae)
    trained = 0 if config.tune == "lora" else tunable  # LoRA adapters are a few million parameters (auto: sized as full)
    frozen = tunable - trained
    weights = 4 * (vae + trained) + (2 if half_frozen else 4) * frozen
    examples = 2 if config.prior else 1
    activations = ACTIVATIONS_PER_EXAMPLE_512 * size_scale(components.denoiser, resolution**2) * examples
    if not low:
        # Autocast's half-precision copies of the fp32 weights (measured on the CPU:
        # train_step-cpu.md); a frozen weight already held in half precision needs none.
        cast_copies = 2 * (trained if half_frozen else tunable) if autocast else 0
        return int(weights + 12 * trained + activations + cast_copies)
    per_trained = (2 if adam_8bit else 8) + (4 if gradients_kept else 0)
    return int(weights + per_trained * trained + activations / 4)


def _eight_bit(config: LearnConfig, device, low: bool) -> bool:
    """8-bit AdamW: asked for, or part of `--memory low` on CUDA when bitsandbytes is there."""
    from .optim import bitsandbytes_available

    return config.adam_8bit or (low and device.type == "cuda" and bitsandbytes_available())


def choose_tuning(config: LearnConfig, components, device, resolution: int, amp_dtype, resumed: str | None = None
                  ) -> tuple[str, str]:
    """What phase 2 tunes, and why: `config.tune` when it is not auto; the tuning of the
    run being resumed; the family's usual (LoRA on FLUX.1); else full where `--memory`
    can make it fit, LoRA otherwise."""
    if config.tune != "auto":
        return config.tune, ""
    if resumed in ("full", "lora"):
        return resumed, "as in the run being resumed"
    if config.quantize in ("nf4", "int8"):
        return "lora", f"--quantize {config.quantize} holds a frozen base"
    family = components.family
    if family.default_tune:
        return family.default_tune, f"the usual on {family.name} (--tune full to tune every weight)"
    import torch

    low = config.memory != "fast"
    need = phase2_bytes(components, replace(config, tune="full"), resolution, amp_dtype is not None, low=low,
                        adam_8bit=_eight_bit(config, device, low), gradients_kept=amp_dtype == torch.float16)
    free = available_bytes(device)
    if need <= 0.9 * free:
        return "full", f"full tuning needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free"
    return "lora", f"full tuning would need about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free"


def choose(config: LearnConfig, components, device, resolution: int, amp_dtype, resumed_tuning: str | None = None,
           resumed_quantize: str | None = None) -> MemoryPlan:
    """The plan for `config.memory` on this device, with the training precision
    `amp_dtype` (None: fp32) already resolved; `resumed_tuning` and `resumed_quantize`
    are the tuning and the base's quantisation of the checkpoint being resumed, which
    `--tune auto` and `--quantize auto` keep (a resume with --memory low after running
    out of memory must not switch to a 4-bit base: another base, other class images)."""
    import torch

    from .optim import BNB_HINT

    tune, tune_reason = choose_tuning(config, components, device, resolution, amp_dtype, resumed_tuning)
    config = replace(config, tune=tune)
    half = amp_dtype is not None
    policy, reason, free = config.memory, "", None
    if policy == "auto" and config.tune == "lora" and device.type == "cpu":
        # Measured on the CPU: checkpointing LoRA costs 9% time for 35% less memory.
        policy, reason = "low", "for LoRA on the CPU it costs little time"
    elif policy == "auto":
        need = phase2_bytes(components, config, resolution, half, half_frozen=half and device.type != "cpu")
        free = available_bytes(device)
        policy = "fast" if need <= 0.9 * free else "low"
        reason = f"fast needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free"
    low = policy == "low"
    # fp16 needs the loss scaler's check of all gradients before any step.
    fp16 = amp_dtype == torch.float16
    eight_bit = _eight_bit(config, device, low)
    warnings = []
    if config.optimizer_in_backward and fp16:
        warnings.append("fp16 steps after the loss scaler has checked every gradient: the optimizer steps after the backward pass")
    if low:
        need = phase2_bytes(components, config, resolution, half, low=True, adam_8bit=eight_bit,
                            half_frozen=half and device.type != "cpu", gradients_kept=fp16)
        free = free or available_bytes(device)
        if config.tune == "full" and need > free:
            warnings.append(f"full tuning may not fit even so (about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB free): "
                            "--tune lora needs far less")
        if device.type == "cuda" and not eight_bit and config.tune == "full":
            warnings.append(f"8-bit AdamW would save about 40% more on this GPU: {BNB_HINT}")
    quantize, quantize_reason = choose_quantization(config, components, device, resolution, half, low, warnings,
                                                    resumed_quantize)
    # Frozen weights in half precision: on GPUs; on a CPU (bf16) only for LoRA with low
    # memory and adapters alone, where they stay frozen and no fp32 copy is needed (it
    # would wait in the same RAM).
    half_frozen = half and (device.type != "cpu" or (low and tune == "lora" and not config.standalone))
    if tune == "lora" and device.type != "cuda":  # (on CUDA a base that does not fit is held in 4 bits: above)
        need = phase2_bytes(components, config, resolution, half, low=low, half_frozen=half_frozen)
        free = free or available_bytes(device)
        if need > free:
            where = "memory" if device.type == "cpu" else "unified memory for the GPU"
            warnings.append(f"LoRA may not fit even so (about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB of {where} "
                            "free): expect heavy swapping or the system ending the run; a smaller --resolution "
                            "needs less, and a CUDA GPU can hold the base in 4 bits")
    return MemoryPlan(
        policy=policy,
        gradient_checkpointing=low or config.gradient_checkpointing,
        optimizer_in_backward=(low or config.optimizer_in_backward) and not fp16,
        adam_8bit=eight_bit,
        offload_vae=(low or half_frozen) and device.type != "cpu",
        reason=reason,
        warnings=tuple(warnings),
        tune=tune,
        tune_reason=tune_reason,
        half_frozen=half_frozen,
        quantize=quantize,
        quantize_reason=quantize_reason,
    )


def choose_quantization(config: LearnConfig, components, device, resolution: int, half: bool, low: bool,
                        warnings: list, resumed: str | None = None) -> tuple[str, str]:
    """How the frozen base of LoRA is held (none, nf4, int8), and why: as asked; with
    auto, as in the checkpoint being `resumed`, else NF4 on a GPU where LoRA with
    --memory low would not fit otherwise (and a warning naming the install where
    bitsandbytes is missing)."""
    from ..families.quantized import KINDS, QUANTIZE_HINT, quantization_available, require_quantization

    if config.tune != "lora" or config.quantize == "none":
        return "none", ""
    if config.quantize != "auto":
        require_quantization(f"--quantize {config.quantize}", device)
        return config.quantize, ""
    if config.standalone and resumed in KINDS:
        raise InvalidInput(f"--standalone cannot resume this run: its base is held in {resumed}, which cannot be "
                           "baked into full weights; resume without --standalone, or start over with --force")
    if resumed == "none":
        return "none", ""
    if resumed in KINDS:
        require_quantization(f"resuming a run with its base in {resumed}", device)
        return resumed, "as in the run being resumed"
    if device.type != "cuda" or not low:
        return "none", ""
    # (The frozen weights under LoRA on a GPU wait in half precision: 2 bytes each, not 4.)
    need = phase2_bytes(components, config, resolution, half, low=True, half_frozen=half)
    free = available_bytes(device)
    if need <= 0.9 * free:
        return "none", ""
    if config.standalone:  # the scene bakes the adapters into full weights, which a 4-bit base cannot give
        warnings.append(f"LoRA needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free, and a --standalone "
                        "scene's base cannot be held in 4 bits: without --standalone it could")
        return "none", ""
    if not quantization_available():
        warnings.append(f"LoRA needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free: a base held in 4 bits "
                        f"would fit, with {QUANTIZE_HINT}")
        return "none", ""
    return "nf4", f"LoRA in half precision needs about {need / GiB:.1f} GiB, {free / GiB:.1f} GiB is free"


def denoiser_load_dtype(config: LearnConfig, family, device, amp_dtype):
    """The precision to load the denoiser in: the training's half precision where the
    plan will keep it frozen there anyway (a family whose usual tuning is LoRA, FLUX.1:
    its 12B transformer then takes 24 GB of RAM to load instead of 48, and its weights
    are published in bf16, so nothing is lost), else None (fp32). The conditions are
    those under which `choose` keeps frozen weights in half precision; where the plan
    turns out otherwise (a resumed run of full tuning), `learn` loads nothing again: it
    widens the denoiser back to fp32."""
    if amp_dtype is None or family.default_tune != "lora" or config.tune == "full" or config.standalone:
        return None
    if device.type == "cpu" and config.memory == "fast":  # the CPU keeps them in fp32 then
        return None
    return amp_dtype
