"""A diffusers text-to-image pipeline over given models, and one sampling call of it:
shared by class images, `generate` and the blended sampling of `edit`/`extract-bg`."""

from __future__ import annotations

from ..device import autocast_off
from ..errors import is_out_of_memory
from ..events import Progress, Reporter, silent
from ..kept import empty_gpu_cache


def images_per_pass(device, batch_size: int | None = None) -> int:
    """Images sampled together: `batch_size`, else 4 on a CUDA GPU and 1 elsewhere (a
    CPU gains nothing from batching, and one image at a time shows progress sooner)."""
    return batch_size or (4 if device.type == "cuda" else 1)


def run_in_passes(items: list, batch: int, run_pass, report: Reporter = silent, what: str = "images") -> None:
    """`run_pass(chunk, more)` over `items`, `batch` at a time (`more`: whether passes
    follow). A pass that runs out of GPU memory runs again with half as many, down to
    one, with a note: at 1024 a pass of four can be more than a card its weights only
    just fit has left, and each image starts from its own seed's noise either way."""
    from ..events import Message

    start = 0
    while start < len(items):
        chunk = items[start:start + batch]
        try:
            run_pass(chunk, start + len(chunk) < len(items))
        except RuntimeError as exc:  # (torch.OutOfMemoryError is one; and it is not in every torch >= 2.4)
            if len(chunk) == 1 or not is_out_of_memory(exc):
                raise
            batch = max(1, min(batch // 2, len(chunk) - 1))
            report(Message(f"out of memory making {len(chunk)} {what} at a time: {batch} at a time now"))
        else:
            start += len(chunk)
            continue
        empty_gpu_cache()  # (here, not in the except: its traceback held the failed pass's tensors)


def make_pipeline(family, denoiser, vae, text_encoders: list, tokenizers: list, scheduler_config: dict,
                  scheduler: str | None = None, options: dict | None = None):
    """The diffusers text-to-image pipeline of `family` (families.Family) with the
    sampler `scheduler` (default: the family's), the base's pipeline `options`
    (Family.pipeline_options), and no safety checker or watermark."""
    sampler = family.sampler(scheduler or family.samplers[0], scheduler_config)
    pipe = family.pipeline(denoiser, vae, text_encoders, tokenizers, sampler, options)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Pixels the VAE decodes at once: its decoder's full-resolution activations are ~0.5 GB
# per megapixel and channel block in fp32, so four 1024x1024 images decoded together
# would want ~10 GB beside the denoiser (FLUX.1 or SDXL on a 24 GB card). Eight 512x512
# images still go in one call.
PIXELS_PER_DECODE = 2 * 1024 * 1024


def decode_latents(vae, latents, report: Reporter = silent, max_pixels: int = PIXELS_PER_DECODE):
    """Pixels in [-1, 1] from the denoiser's latents, at most `max_pixels` output pixels
    (at least one image) per call of the VAE. A half-precision VAE can overflow (NaN or
    inf in the image): then the decode is done again in fp32, with a note."""
    import torch

    from ..families import vae_normalisation, vae_scale

    if not bool(torch.isfinite(latents).all()):
        from ..errors import SceneBreakError

        fix = "try --precision fp32 (on the same GPU), or --device cpu" if latents.device.type != "cpu" else \
            "try --precision fp32"
        raise SceneBreakError("sampling produced NaN or infinite values (an overflow in the model in half precision, "
                              f"or a damaged scene): {fix}")
    shift, scale = vae_normalisation(vae)
    scaled = latents / scale + shift
    factor = vae_scale(vae) if hasattr(vae.config, "block_out_channels") else 8
    per_call = max(1, max_pixels // (latents.shape[-2] * latents.shape[-1] * factor * factor))

    def decode(x):
        return torch.cat([vae.decode(chunk).sample for chunk in x.split(per_call)])

    # The VAE decodes in its own weights' dtype, never under the sampling's autocast.
    with torch.inference_mode(), autocast_off(latents.device.type):
        pixels = decode(scaled.to(vae.dtype))
        if vae.dtype != torch.float32 and not bool(torch.isfinite(pixels).all()):
            from ..events import Message

            report(Message(f"the VAE overflowed in {str(vae.dtype).removeprefix('torch.')}: decoding again in fp32"))
            dtype = vae.dtype
            try:  # (the VAE goes back to its dtype whatever happens: a kept pipeline serves again)
                vae.to(torch.float32)
                pixels = decode(scaled.float())
            finally:
                vae.to(dtype)
    if not bool(torch.isfinite(pixels).all()):  # (in fp32 too: else a black image, written as if fine)
        from ..errors import SceneBreakError

        raise SceneBreakError("decoding produced NaN or infinite pixels: the scene or its base model's VAE is damaged")
    return pixels.float()


def sample(pipe, family, prompt: str, seeds: list[int], *, steps: int, guidance: float, resolution: int,
           negative: str | None = None, autocast=None, report: Reporter = silent, task: str = "generate",
           done: int = 0, total: int | None = None):
    """Images for `prompt` from the pipeline of `family`, one per seed; image i starts
    from noise seeded with seeds[i] (drawn on the CPU, so a seed gives the same start on
    every device: in half precision torch's CPU generator gives the fp32 draw rounded)."""
    import contextlib

    import torch

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    total = total if total is not None else len(seeds) * steps

    def on_step_end(pipeline, step, timestep, kwargs):
        report(Progress(task, done + (step + 1) * len(seeds), total))
        return kwargs

    with torch.inference_mode():
        with autocast or contextlib.nullcontext():
            latents = pipe(
                prompt=[prompt] * len(seeds),
                negative_prompt=[negative] * len(seeds) if negative else None,
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
                generator=generators,
                callback_on_step_end=on_step_end,
                output_type="latent",
                **family.pipeline_kwargs(),
            ).images
        side = resolution // pipe.vae_scale_factor
        pixels = decode_latents(pipe.vae, family.pipeline_latents(latents, (side, side)), report)
    return pipe.image_processor.postprocess(pixels, output_type="pil", do_denormalize=[True] * len(pixels))
