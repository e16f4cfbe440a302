"""Blended Latent Diffusion (Avrahami et al., SIGGRAPH 2023): denoise inside a mask
while the latents outside it follow the source image, then paste the source pixels
back outside the mask. The engine behind `edit` and `extract-bg`.

Three differences from the authors' script for SD (scripts/text_editing_SD2.py):
- it noises the source to the timestep the step started from, one step behind the
  latents, so its background never becomes clean; here the source is noised to the
  level the step has just reached (as the authors' original LDM sampler and diffusers'
  inpainting pipelines do), and the last step's background is the source latents
  themselves;
- it starts from pure noise at the scale of the schedule's first step, although
  `blend_start` skips that step; here the start is the source noised to the first step
  run, by the sampler's own `add_noise` (as diffusers' img2img does, and the authors'
  SDXL script): at the level the UNet expects, whatever the sampler's parametrisation
  (Euler's first sigma is ~14.6, its sigma after a quarter of the steps ~4);
- it noises the background with fresh noise at every step; here each sample keeps its
  starting noise, so the background follows one smooth path, as a deterministic
  sampler's own latents do (benchmarks/blend_noise.py: the inside then changes from
  step to step nearly as little as without any mask, a third of what fresh noise makes,
  or less).
"""

from __future__ import annotations

import math

import numpy as np

from ..device import autocast_off
from ..errors import InvalidMask
from ..events import Progress, Reporter, silent
from ..families import vae_normalisation
from ..masks.ops import dilate


def work_size(size: tuple[int, int], resolution: int, multiple: int = 8) -> tuple[int, int]:
    """The model's pixel count in the image's aspect ratio, sides multiples of `multiple`
    (and no side above twice the model's: a panorama is not worth 10k-pixel latents)."""
    width, height = size
    scale = min(resolution / math.sqrt(width * height), 2 * resolution / max(width, height))
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (width, height))


def vae_factor(vae_config: dict) -> int:
    """Pixels per latent cell of a VAE from its config, as diffusers' pipelines count it."""
    return 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1)


def latent_grid(size: tuple[int, int], resolution: int, factor: int, patch: int = 1):
    """The model's working size for an image of `size` (work_size, sides a multiple of
    what its latents pack into) and that size's latent grid (h, w); `factor`: pixels
    per latent cell, `patch`: latent cells per denoiser token (Family.latent_patch)."""
    size = work_size(size, resolution, multiple=max(8, factor * patch))
    return size, (size[1] // factor, size[0] // factor)


def latent_masks(masks: list[np.ndarray], size: tuple[int, int], latent_hw: tuple[int, int],
                 names: list[str] | None = None) -> list:
    """Each (H, W) mask at the working `size`, on the latent grid (latent_mask); one
    that falls between the grid's cells is refused, naming it."""
    result = [latent_mask(resize_mask(m, size), latent_hw) for m in masks]
    for j, m in enumerate(result):
        if not m.any():
            what = names[j] if names else f"mask {j + 1}"
            raise InvalidMask(f"{what} is too thin for the model's {latent_hw[1]}x{latent_hw[0]} latent grid: grow it "
                              "with --dilate")
    return result


def feather_weights(mask: np.ndarray, px: int) -> np.ndarray:
    """1 on the mask, falling linearly outside it (1/(px+1) at `px` pixels), 0 from px+1."""
    px = max(0, px)
    total = sum(dilate(mask, radius).astype(np.float32) for radius in range(px + 1))
    return total / (px + 1)


def paste_back(original: np.ndarray, generated: np.ndarray, mask: np.ndarray, feather: int,
               weights: np.ndarray | None = None) -> np.ndarray:
    """The generated pixels on the mask, the original ones beyond `feather` pixels
    from it (bit for bit), a linear seam between. Arrays are (H, W, 3) uint8.
    `weights`: feather_weights(mask, feather), where already made (seconds at 12 MP)."""
    alpha = (feather_weights(mask, feather) if weights is None else weights)[..., None]
    mixed = np.rint(alpha * generated.astype(np.float32) + (1 - alpha) * original.astype(np.float32))
    return np.where(alpha > 0, mixed.clip(0, 255).astype(np.uint8), original)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to (width, height)."""
    from PIL import Image

    image = Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
    return np.asarray(image) > 127


def latent_mask(mask: np.ndarray, latent_hw: tuple[int, int]):
    """The pixel mask on the latent grid as a (1, 1, h, w) float tensor of 0 and 1: each
    latent cell takes the pixel at its centre, as Pillow's nearest does (torch's
    "nearest" takes the cell's top-left pixel, which shifts the mask by half a cell)."""
    import torch

    height, width = latent_hw
    return torch.from_numpy(resize_mask(mask, (width, height)).astype(np.float32))[None, None]


def encode(vae, images: list[np.ndarray]):
    """Scaled VAE posterior means of (H, W, 3) uint8 images: the source latents."""
    import torch

    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    pixels = pixels.to(vae.device, vae.dtype)
    with torch.inference_mode(), autocast_off(pixels.device.type):  # in the VAE's own dtype
        shift, scale = vae_normalisation(vae)
        return (vae.encode(pixels).latent_dist.mean - shift) * scale


def decode(vae, latents) -> list[np.ndarray]:
    import torch

    from .pipeline import decode_latents

    pixels = decode_latents(vae, latents)
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(pixels.permute(0, 2, 3, 1).cpu().numpy())


def noised(source, noise, scheduler, timestep):
    """`source` noised to `timestep` in the sampler's own parametrisation (Euler's
    latents are x0 + sigma * noise; DDIM's and DPM-Solver's sqrt(a) x0 + sqrt(1 - a)
    noise; a flow's (1 - sigma) x0 + sigma noise). `timestep`: a number, or a tensor of
    one on the device (made from a number, it is copied there: a wait on a GPU)."""
    import torch

    if not torch.is_tensor(timestep):
        timestep = torch.tensor([timestep], device=source.device)
    if hasattr(scheduler, "add_noise"):
        return scheduler.add_noise(source, noise, timestep)
    return scheduler.scale_noise(source, timestep, noise)  # flow matching (FLUX.1)


def blend_step(latents, source, mask, noise, scheduler, timestep):
    """m * z + (1 - m) * (source noised to `timestep`); `timestep` None: the source itself."""
    background = source if timestep is None else noised(source, noise, scheduler, timestep)
    return mask * latents + (1 - mask) * background.to(latents.dtype)


def blended_latents(pipe, family, source, mask, prompt: str, seeds: list[int], *, steps: int = 50, guidance: float = 7.5,
                    blend_start: float = 0.25, negative: str | None = None, fixed_noise: bool = True,
                    on_step=None, report: Reporter = silent, task: str = "edit", done: int = 0,
                    total: int | None = None):
    """Blended sampling of one region for a batch of seeds, with the pipeline's scheduler.

    `family` (families.Family) builds the pipeline's conditioning.
    `source` (B or 1, C, h, w): the source latents; `mask` (1, 1, h, w): 1 where the prompt
    may change things. The first `blend_start` of the steps are skipped, and sample i
    starts from the source noised to the first step run, with Gaussian noise seeded with
    seeds[i] (drawn on the CPU, like `generate`). The background is noised again after
    every step with that same noise, so it follows one smooth path as the sampler's own
    latents do; `fixed_noise=False` draws fresh noise each time, as the reference does
    (docs/editing.md has the figures that chose the first).
    `on_step(i, timestep, latents)` sees the latents after every blended step."""
    import torch

    scheduler, denoiser = pipe.scheduler, getattr(pipe, family.denoiser)
    device, dtype = denoiser.device, denoiser.dtype
    family.set_timesteps(scheduler, steps, tuple(source.shape[-2:]), device)
    timesteps = scheduler.timesteps[int(len(scheduler.timesteps) * blend_start):]
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    shape = source.shape[1:]

    def draw():
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)

    cfg = family.classifier_free and guidance > 1  # FLUX.1 embeds its guidance: one pass per step
    with torch.inference_mode():
        factor = pipe.vae_scale_factor
        embeds, added = family.pipeline_conditioning(pipe, prompt, len(seeds), cfg, negative,
                                                     (shape[1] * factor, shape[2] * factor), embedded_guidance=guidance)
        source = source.to(device, dtype).expand(len(seeds), *shape)
        mask = mask.to(device, dtype)
        noise = draw()
        # Not noise * init_noise_sigma: that is the level of the schedule's first step, and
        # blend_start skips it (for Euler, inputs of std ~3 instead of ~1 at the first step).
        latents = noised(source, noise, scheduler, timesteps[:1])
        levels = timesteps.tolist()  # (read once: .item() at every step waited for the GPU each time)
        total = total if total is not None else len(timesteps) * len(seeds)
        for i, t in enumerate(timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            if hasattr(scheduler, "scale_model_input"):  # (a flow's inputs need none)
                model_input = scheduler.scale_model_input(model_input, t)
            pred = family.denoise(denoiser, model_input, t, embeds, added)
            if cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
            # The level this step landed on is the next timestep of the schedule (the
            # same for every sampler); after the last one the latents are clean.
            last = i + 1 == len(timesteps)
            level = None if last else levels[i + 1]  # (Euler's are floats)
            latents = blend_step(latents, source, mask, noise if fixed_noise else draw(), scheduler,
                                 None if last else timesteps[i + 1:i + 2])
            if on_step is not None:
                on_step(i, level, latents)
            report(Progress(task, done + (i + 1) * len(seeds), total))
    return latents


def blended_steps(steps: int, blend_start: float) -> int:
    """How many UNet steps one blended sample runs."""
    return steps - int(steps * blend_start)
