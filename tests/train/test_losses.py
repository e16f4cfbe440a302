import itertools
import random

import torch

from scenebreak.train.attention import AttentionStore
from scenebreak.train.losses import attention_loss, masked_diffusion_loss
from scenebreak.train.trainer import prompt_for, sample_handles


def test_union_sampling_covers_every_subset_uniformly_in_size():
    rng = random.Random(0)
    n = 3
    subsets, sizes = set(), {1: 0, 2: 0, 3: 0}
    for _ in range(3000):
        chosen = sample_handles(rng, n)
        assert len(set(chosen)) == len(chosen)
        subsets.add(frozenset(chosen))
        sizes[len(chosen)] += 1
    expected = {frozenset(c) for k in range(1, n + 1) for c in itertools.combinations(range(n), k)}
    assert subsets == expected
    assert all(800 < count < 1200 for count in sizes.values())  # k is uniform over 1..n


def test_prompt_joins_handles():
    assert prompt_for(["<asset1>"]) == "a photo of <asset1>"
    assert prompt_for(["<b>", "<a>"]) == "a photo of <b> and <a>"


def test_masked_loss_ignores_everything_outside_the_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    before = masked_diffusion_loss(pred, target, mask)
    outside = (1 - mask).bool().expand_as(pred)
    pred2, target2 = pred.clone(), target.clone()
    pred2[outside] = 100.0
    target2[outside] = -50.0
    assert torch.equal(masked_diffusion_loss(pred2, target2, mask), before)
    inside = mask.bool().expand_as(pred)
    pred2[inside] += 1.0
    assert masked_diffusion_loss(pred2, target2, mask) > before
    # the paper's reduction: mean over all elements, not over the mask area
    expected = ((mask * pred - mask * target) ** 2).sum() / pred.numel()
    assert torch.allclose(before, expected)


def test_target_follows_prediction_type():
    """The UNet families' training target: the noise (epsilon), or the velocity
    sqrt(a) noise - sqrt(1 - a) x0 (v-prediction) of the schedule at that timestep."""
    from scenebreak.families.unet import DiffusionSchedule

    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    latents, noise, t = torch.ones(1, 4, 2, 2), torch.full((1, 4, 2, 2), 2.0), torch.tensor([500])
    assert torch.equal(DiffusionSchedule(dict(config, prediction_type="epsilon")).target(latents, noise, t), noise)
    v = DiffusionSchedule(dict(config, prediction_type="v_prediction"))
    a = v.scheduler.alphas_cumprod[500]
    assert torch.allclose(v.target(latents, noise, t), a.sqrt() * noise - (1 - a).sqrt() * latents)


def test_attention_loss_is_zero_for_maps_equal_to_masks_and_scale_free():
    masks = torch.zeros(2, 4, 4)
    masks[0, :2, :2] = 1
    masks[1, 2:, 1:] = 1
    assert attention_loss(masks.clone(), masks).item() == 0.0
    assert attention_loss(masks * 0.03, masks).item() < 1e-12  # divided by its max first
    assert attention_loss(masks.flip(0), masks).item() > 0.3


def test_attention_loss_reads_the_handle_token_positions():
    side, tokens = 4, 77
    masks = torch.zeros(2, side, side)
    masks[0, :2] = 1
    masks[1, :, :2] = 1
    heads = 2
    probs = torch.rand(1, heads, side * side, tokens) * 0.01
    positions = [6, 9]
    for mask, pos in zip(masks, positions):
        probs[0, :, :, pos] = mask.flatten()
    store = AttentionStore(example=0)
    store.record("layer.a", probs[0])  # the kept example's maps: (heads, pixels, tokens)
    store.record("layer.b", probs[0])
    assert attention_loss(store.token_maps(positions), masks).item() < 1e-10
    assert attention_loss(store.token_maps([7, 8]), masks).item() > 0.2
    assert attention_loss(store.token_maps(positions[::-1]), masks).item() > 0.2
