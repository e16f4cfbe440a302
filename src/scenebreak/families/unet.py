"""What the UNet families (SD 1.x/2.x and SDXL) share: the denoiser call, the training
noise and target of DDPM (epsilon or v-prediction, timesteps uniform over the training
schedule), and where the attention loss hooks in (the cross-attention layers at latent
size / 4: 16x16 for SD2.1-base at 512)."""

from __future__ import annotations

import re
from typing import ClassVar

from ..config import SCHEDULER_STEPS
from ..errors import InvalidInput
from .family import Family, vae_scale

_CROSS_ATTENTION = re.compile(r"^(down_blocks|up_blocks|mid_block)\.?(\d*)\..*\.attn2\.processor$")
ATTENTION_SCALE = 4  # the loss reads maps at latent size / 4
UNET = "UNet2DConditionModel"


def layer_scale(name: str, num_down: int, num_up: int) -> int | None:
    """How many times smaller than the latent a cross-attention processor's feature map
    is (None for any other processor)."""
    match = _CROSS_ATTENTION.match(name)
    if not match:
        return None
    kind, index = match.group(1), match.group(2)
    if kind == "down_blocks":
        return 2 ** int(index)  # each earlier down block halved the map
    if kind == "up_blocks":
        return 2 ** (num_up - 1 - int(index))  # up block j runs before its upsampler
    return 2 ** (num_down - 1)


def cross_attention_layers(unet, scale: int = ATTENTION_SCALE) -> list[str]:
    """Names of the cross-attention processors that work at latent size / `scale`."""
    num_down = len(unet.config.down_block_types)
    num_up = len(unet.config.up_block_types)
    names = [n for n in unet.attn_processors if layer_scale(n, num_down, num_up) == scale]
    if not names:
        raise InvalidInput(
            f"this UNet has no cross-attention layer at latent size / {scale}, which the attention loss needs: "
            "use --lambda-attn 0 or another base model"
        )
    return names


class DiffusionSchedule:
    """DDPM training noise over a base model's schedule: timesteps drawn uniformly, the
    noisy latents, and what the UNet should predict (its prediction type's target)."""

    def __init__(self, scheduler_config: dict):
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)

    def timesteps(self, count: int, generator):
        import torch

        return torch.randint(0, self.scheduler.config.num_train_timesteps, (count,), generator=generator)

    def add_noise(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"unsupported prediction type {kind!r}")


class UNetFamily(Family):
    """A family whose denoiser is diffusers' UNet2DConditionModel."""

    denoiser: ClassVar[str] = "unet"
    quantize_skip: ClassVar[tuple[str, ...]] = ("time_embedding", "add_embedding")
    samplers: ClassVar[tuple[str, ...]] = ("dpm", "ddim", "euler")
    lora_denoiser_targets: ClassVar[list[str]] = ["to_q", "to_k", "to_v", "to_out.0"]  # self- and cross-attention

    def sampler_steps(self, sampler: str) -> int:
        return SCHEDULER_STEPS[sampler]

    def sampler(self, name: str, scheduler_config: dict):
        """dpm is DPM-Solver++ 2M, the multistep solver diffusers uses for few-step
        sampling; ddim is deterministic DDIM (eta 0), the paper's; euler is plain Euler
        (not ancestral), so every sampler is deterministic for a seed."""
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        if name == "dpm":
            return DPMSolverMultistepScheduler.from_config(scheduler_config, algorithm_type="dpmsolver++", solver_order=2)
        if name == "euler":
            return EulerDiscreteScheduler.from_config(scheduler_config)
        if name == "ddim":
            return DDIMScheduler.from_config(scheduler_config)
        raise ValueError(f"unknown scheduler {name!r}")

    @staticmethod
    def is_unet(config: dict) -> bool:
        return bool(config) and config.get("_class_name", UNET) == UNET

    @classmethod
    def refusal(cls, index: dict, parts: set[str], what: str, denoiser: dict | None = None) -> str | None:
        denoiser = denoiser or {}
        channels = denoiser.get("in_channels", 4)
        if channels != 4:
            return f"a model whose UNet takes {str(channels)[:20]} input channels (an inpainting or other special UNet)"
        if denoiser.get("class_embed_type") or denoiser.get("num_class_embeds"):
            return "a class-conditioned UNet (Stable unCLIP: it needs an image embedding at every step)"
        if denoiser.get("time_cond_proj_dim"):
            return "a latent consistency model (LCM: a UNet distilled to sample in a few steps with its own scheduler)"
        scheduler = index.get("scheduler")
        if isinstance(scheduler, list) and scheduler and str(scheduler[-1]).startswith("EDM"):
            return "a model trained with EDM noise (Playground v2.5 and alike: another diffusion schedule)"
        return None

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def native_resolution(self, denoiser, vae) -> int:
        return int(denoiser.config.sample_size) * vae_scale(vae)

    def resolution_step(self, denoiser, vae) -> int:
        """The UNet halves the latent once per down block; the loss needs latent/4."""
        scale = vae_scale(vae)
        return max(scale * 2 ** (len(denoiser.config.down_block_types) - 1), scale * ATTENTION_SCALE)

    def training_schedule(self, scheduler_config: dict) -> DiffusionSchedule:
        return DiffusionSchedule(scheduler_config)

    def denoise(self, model, noisy, timesteps, hidden, added):
        return model(noisy, timesteps, hidden, added_cond_kwargs=added).sample

    def attention_layers(self, model) -> list[str]:
        return cross_attention_layers(model)

    def attention_size(self, latent_size: int) -> int:
        return latent_size // ATTENTION_SCALE
