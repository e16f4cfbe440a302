"""How long things take and how much room they need: the measured CPU figures scaled
to other models and sizes, file sizes of scenes and checkpoints, and durations and
sizes written for people. Imports nothing heavy."""

from __future__ import annotations

# UNet parameters of SD2.1-base, the model every measured figure was taken on: other
# models' figures scale by their own count over this one.
SD21_UNET_PARAMS = 865.9e6
MEASURED_RESOLUTION = 512

# Seconds per step measured on a 2-core CPU (AVX512-BF16) with SD2.1-base at 512x512 and
# prior preservation (benchmarks/results/train_step-cpu.md), used to warn CPU users
# before hours of work. Keys: phase 1, or the phase-2 mode; then the precision.
CPU_SECONDS = {
    ("phase1", "fp32"): 13.1, ("phase1", "bf16"): 8.9,
    ("fast", "fp32"): 45.4, ("low", "fp32"): 49.9, ("low", "bf16"): 28.8,
    ("lora", "bf16"): 19.3, ("lora-low", "bf16"): 21.0,
}
BF16_SPEEDUP = 13.1 / 8.9  # phase 1 fp32 / bf16, for the combinations not measured
# One image-step of guided sampling (the UNet on a batch of 2), fp32, with the VAE
# decode's share: 571 s per image with DDIM at 50 steps, two at a time; bf16 autocast
# makes the steps 1.74x faster (benchmarks/results/train_step-cpu.md, generation rows).
CPU_SECONDS_SAMPLING_STEP = 571 / 50
SAMPLING_BF16_SPEEDUP = 22.55 / 12.96


def denoiser_params(denoiser) -> int:
    return sum(p.numel() for p in denoiser.parameters())


def size_scale(denoiser, pixels: int) -> float:
    """How much more work one step is than on the measured model (SD2.1-base at
    512x512): by UNet parameters and by pixel count."""
    return denoiser_params(denoiser) / SD21_UNET_PARAMS * pixels / MEASURED_RESOLUTION**2


def cpu_seconds_per_step(phase: str, precision: str) -> float:
    """A measured figure, or one derived from the nearest measured one: fast bf16 does
    not fit the 24 GiB machine (scaled from low by the fp32 fast/low ratio), fp32 LoRA
    runs on CPUs without bf16 (scaled by the phase-1 bf16 speed-up)."""
    if (phase, precision) in CPU_SECONDS:
        return CPU_SECONDS[(phase, precision)]
    if phase == "fast":
        return CPU_SECONDS[("low", "bf16")] * CPU_SECONDS[("fast", "fp32")] / CPU_SECONDS[("low", "fp32")]
    return CPU_SECONDS[(phase, "bf16")] * BF16_SPEEDUP


def cpu_training_estimate(denoiser, resolution: int, config, plan, class_images_missing: int, class_steps: int,
                          bf16: bool = False, left: tuple[int, int] | None = None) -> str:
    """A rough duration of `learn` on this CPU from the measured SD2.1-base figures,
    scaled by UNet size and pixel count, for the memory plan and tuning chosen (`left`:
    the steps of each phase a resumed run still takes). Phase 1 runs the instance alone
    either way; phase 2 without prior preservation runs a batch of one (estimated at
    0.6 of the time)."""
    precision = "bf16" if bf16 else "fp32"
    mode = ("lora-low" if plan.policy == "low" else "lora") if config.tune == "lora" else plan.policy
    scale = size_scale(denoiser, resolution**2)
    steps1, steps2 = left or (config.steps1, config.steps2)
    seconds = scale * (steps1 * cpu_seconds_per_step("phase1", precision)
                       + steps2 * cpu_seconds_per_step(mode, precision) * (1.0 if config.prior else 0.6))
    class_seconds = class_images_missing * class_steps * cpu_sampling_seconds(denoiser, resolution**2, bf16)
    text = (f"training on the CPU: expect roughly {format_duration(seconds)} for {steps1}+{steps2} steps"
            + (" left" if left else ""))
    if class_seconds:
        text += (f", plus {format_duration(class_seconds)} once for {class_images_missing} class images "
                 "(--num-class-images or --no-prior make it shorter)")
    from .device import torch_without_cuda

    if torch_without_cuda():  # (a CUDA card would go unseen: say how to make it count)
        return text + ("; a CUDA GPU takes minutes, with a CUDA build of torch (this one has none: pipx runpip "
                       "scenebreak install torch --index-url https://download.pytorch.org/whl/cu128)")
    return text + "; a CUDA GPU takes minutes (--device cuda)"


def cpu_sampling_seconds(denoiser, pixels: int, bf16: bool = False) -> float:
    """Seconds of one guided sampling step for one image on this CPU."""
    return CPU_SECONDS_SAMPLING_STEP * size_scale(denoiser, pixels) / (SAMPLING_BF16_SPEEDUP if bf16 else 1.0)


def format_duration(seconds: float, clock: bool = False) -> str:
    """"45 s", "12 min", "3.2 hours"; or with `clock` "m:ss" / "h:mm:ss" (progress ETAs)."""
    if clock:
        h, rest = divmod(int(seconds), 3600)
        m, s = divmod(rest, 60)
        return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} hours"


# -- room on disk ------------------------------------------------------------------------------------

LORA_BYTES_SD21_RANK32 = 40e6  # a LoRA scene's adapters at rank 32 on SD2.1-base (measured: ~39 MB)


def scene_bytes(counts: dict[str, int], config) -> int:
    """About how large the scene file will be, from the parameter counts of the
    denoiser, the text encoders and the VAE (families.base_model.parameter_counts):
    the tuned weights at the save precision (full tuning, or
    LoRA baked in; `--tune auto` counts as full, the upper bound), or only the adapters."""
    if config.tune == "lora" and not config.standalone:
        return int(LORA_BYTES_SD21_RANK32 * config.rank / 32 * counts["denoiser"] / SD21_UNET_PARAMS) + 2**20
    per_param = 2 if config.save_dtype == "fp16" else 4
    return per_param * (counts["denoiser"] + counts["text_encoders"] + counts["vae"]) + 2**20


def checkpoint_bytes(counts: dict[str, int], config, adam_8bit: bool = False) -> int:
    """About how large a phase-2 checkpoint is: the tuned weights in fp32 and the
    optimizer's two running averages per trained weight."""
    if config.tune == "lora":
        adapters = scene_bytes(counts, config) // 2  # fp16 in the scene; here fp32 weights and two states
        return 6 * adapters + 2**20
    return int((counts["denoiser"] + counts["text_encoders"]) * (4 + (2 if adam_8bit else 8))) + 2**20


def format_bytes(count: float) -> str:
    return f"{count / 2**30:.1f} GiB" if count >= 2**30 else f"{max(1, round(count / 2**20))} MiB"
