"""Blended Latent Diffusion: the pure pieces exactly, then the loop on the tiny model."""

import numpy as np
import pytest
import torch

from scenebreak.masks.ops import dilate
from scenebreak.sample.blending import blend_step, blended_latents, encode, feather_weights, latent_mask, paste_back, work_size


def test_work_size_keeps_the_pixel_count_and_aspect_in_multiples_of_8():
    assert work_size((512, 512), 512) == (512, 512)
    assert work_size((3000, 2000), 512) == (624, 416)  # 3:2, about 512*512 pixels
    assert work_size((2000, 3000), 512) == (416, 624)
    assert work_size((96, 80), 64) == (72, 56)
    assert work_size((4000, 10), 512) == (1024, 8)  # capped long side, never a zero side


def test_feather_is_one_on_the_mask_linear_outside_and_zero_beyond():
    mask = np.zeros((1, 12), bool)
    mask[0, :3] = True
    weights = feather_weights(mask, 4)
    np.testing.assert_allclose(weights[0], [1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0, 0, 0, 0, 0], atol=1e-6)
    assert np.array_equal(feather_weights(mask, 0), mask.astype(np.float32))


def test_paste_back_keeps_the_original_beyond_the_seam_bit_for_bit():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    generated = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 8:15] = True
    out = paste_back(original, generated, mask, 3)
    far = dilate(mask, 3) == 0
    assert np.array_equal(out[far], original[far])
    assert np.array_equal(out[mask], generated[mask])
    seam = (dilate(mask, 3) > 0) & ~mask
    assert not np.array_equal(out[seam], original[seam])


def test_blend_step_noises_the_source_to_the_given_level_and_is_the_source_at_the_end():
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    latents, source, noise = (torch.randn(1, 4, 6, 6, generator=gen) for _ in range(3))
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1
    out = blend_step(latents, source, mask, noise, scheduler, 500)
    a = scheduler.alphas_cumprod[500]
    expected = a.sqrt() * source + (1 - a).sqrt() * noise
    torch.testing.assert_close(out[..., 3:], expected[..., 3:])
    assert torch.equal(out[..., :3], latents[..., :3])
    assert torch.equal(blend_step(latents, source, mask, noise, scheduler, None)[..., 3:], source[..., 3:])


@pytest.fixture(scope="module")
def pipe(learned):
    from scenebreak.scenes.bundle import load_scene
    from scenebreak.device import choose_device
    from scenebreak.sample.scene_models import open_pipeline

    return open_pipeline(load_scene(learned.path), choose_device("cpu"))


@pytest.fixture(scope="module")
def family(learned):
    from scenebreak.scenes.bundle import load_scene

    return load_scene(learned.path).family


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_blended_loop_follows_the_source_outside_the_mask(pipe, family, scheduler):
    pipe.scheduler = family.sampler(scheduler, pipe.scheduler.config)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    source = encode(pipe.vae, [image])
    pixel_mask = np.zeros((64, 64), bool)
    pixel_mask[16:48, 8:40] = True
    mask = latent_mask(pixel_mask, tuple(source.shape[-2:]))
    seen = []
    latents = blended_latents(pipe, family, source, mask, "a photo of <asset1>", [3, 4], steps=8, blend_start=0.25,
                              on_step=lambda i, level, z: seen.append((i, level, z.clone())))
    timesteps = pipe.scheduler.timesteps[2:]  # 25% of 8 steps skipped
    # Each step lands on the schedule's next timestep; for DDIM that is t - 1000/8.
    assert [level for _, level, _ in seen] == [int(t) for t in timesteps[1:]] + [None]
    if scheduler == "ddim":
        assert [level for _, level, _ in seen[:-1]] == [int(t) - 125 for t in timesteps[:-1]]
    outside = (mask == 0).expand_as(latents)
    # After the last step the background is exactly the source; the inside is new.
    assert torch.equal(latents[outside], source.expand_as(latents)[outside])
    assert not torch.allclose(latents[~outside], source.expand_as(latents)[~outside], atol=1e-2)
    # Before it, the background is the source noised to the level the step reached, in
    # the sampler's own parametrisation (Euler's latents are x0 + sigma * noise):
    # removing the source leaves unit Gaussian noise at exactly that level.
    for _, level, z in seen[:-1]:
        at = torch.tensor([level])
        signal = pipe.scheduler.add_noise(source, torch.zeros_like(source), at)
        scale = pipe.scheduler.add_noise(torch.zeros_like(source), torch.ones_like(source), at)
        values = ((z - signal) / scale)[outside]
        assert abs(values.mean()) < 0.15 and 0.85 < values.std() < 1.15
    # The two seeds start from different noise.
    assert not torch.equal(latents[0][~outside[0]], latents[1][~outside[1]])


def _signal_and_scale(scheduler, level):
    """(a, s) with the sampler's add_noise(x0, n, level) = a * x0 + s * n."""
    one, zero = torch.ones(1), torch.zeros(1)
    at = torch.tensor([level])
    return float(scheduler.add_noise(one, zero, at)), float(scheduler.add_noise(zero, one, at))


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_the_unet_sees_unit_scale_inputs_from_the_first_step(pipe, family, scheduler):
    """With --blend-start the first step run is far below the schedule's top level, so
    the start is the source noised to that step by the sampler itself: its first UNet
    input has unit scale (Euler's noise * init_noise_sigma gave std ~4 here) and
    already holds the source, inside the mask as well, at that level's share."""
    pipe.scheduler = family.sampler(scheduler, pipe.scheduler.config)
    source = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(7))  # unit variance, as real latents
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 4:28, 4:28] = 1
    inputs = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    try:
        blended_latents(pipe, family, source, mask, "a photo of <asset1>", [3, 4], steps=8, blend_start=0.25)
    finally:
        hook.remove()
    assert len(inputs) == 6  # 8 steps, the first 2 skipped
    first, inside = inputs[0], (mask > 0).expand(4, 4, 32, 32)  # cond and uncond halves: 2 x 2 seeds
    assert 0.9 < first.std() < 1.1 and 0.9 < first[inside].std() < 1.1
    a, s = _signal_and_scale(pipe.scheduler, pipe.scheduler.timesteps[2].item())
    x0 = source.expand_as(first)[inside]
    share = float((first[inside] * x0).sum() / (x0 * x0).sum())  # least squares: input = share * x0 + noise
    assert share == pytest.approx(a / (a * a + s * s) ** 0.5, abs=0.05)


@pytest.mark.parametrize("fixed", [False, True, None])
def test_background_noise_is_one_per_sample_or_fresh_each_step(pipe, family, fixed):
    """The source is noised again after every step: with the starting noise of each
    sample every time (`fixed_noise`, the default: None), or with fresh noise (the
    reference's way)."""
    pipe.scheduler = family.sampler("dpm", pipe.scheduler.config)
    source = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(7))
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    seen = []
    chosen = {} if fixed is None else {"fixed_noise": fixed}
    blended_latents(pipe, family, source, mask, "a photo of <asset1>", [3, 4], steps=8, blend_start=0.25,
                    on_step=lambda i, level, z: seen.append((level, z.clone())), **chosen)
    outside = (mask == 0).expand(2, 4, 32, 32)
    noises = []
    for level, z in seen[:-1]:
        a, s = _signal_and_scale(pipe.scheduler, level)
        noises.append(((z - a * source) / s)[outside])
    start = torch.stack([torch.randn(4, 32, 32, generator=torch.Generator().manual_seed(seed)) for seed in (3, 4)])
    for n in noises:
        assert torch.allclose(n, start[outside], atol=1e-4) == (fixed is not False)
    assert not torch.allclose(noises[0][:noises[0].numel() // 2], noises[0][noises[0].numel() // 2:])  # per sample
