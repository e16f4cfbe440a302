"""The attention loss does its job: handles look at their own objects.

The slow test uses the same setting as benchmarks/attention_iou.py (which runs more
seeds and keeps the figures), one seed here, on the tiny SDXL; run it with
`python -m pytest -m slow`. On the tiny SD 2.x the square a handle ends up on after
800 steps flips with the seed (and with bf16 rounding: the block output of the loss
layers changed from fp32 softmax times values to fused attention, the same loss in
fp32 to 1e-6, and seed 0 then lands <asset1> on the other square), so one seed there
says little; the benchmark's tables give several.

The fast test runs in the default suite. Which square a handle ends up on after a
short run is chaotic on a random model (it flips with the seed, and even with the
number of CPU threads), so it checks what the loss itself must do, robustly: after 60
phase-2 steps with the attention loss, each handle's cross-attention map (averaged
over noise levels, as `scenebreak.diagnostics` measures it) is much closer to its own
mask than after the same run without it. Measured (mean MSE with / without, seeds
0-3, 1 and 2 threads): 0.08-0.16 vs 0.20-0.43, the worst ratio 0.69; seed 0: 0.12 vs
0.30 and 0.11 vs 0.43."""

import pytest
import torch

from scenebreak import LearnConfig, learn, load_scene
from scenebreak.diagnostics import attention_overlap, handle_attention_maps
from scenebreak.losses import downsample_masks

SETTINGS = dict(steps1=400, steps2=400, lr2=1e-4, prior=False, seed=0)
FAST_SETTINGS = dict(steps1=0, steps2=60, lr2=1e-3, prior=False, seed=0)
FAST_LAMBDA = 0.3


def _distance_to_own_masks(path) -> float:
    """Mean squared difference between each handle's attention map and its own mask."""
    scene = load_scene(path)
    maps = torch.from_numpy(handle_attention_maps(scene))
    masks = downsample_masks(torch.from_numpy(scene.masks), maps.shape[-1]).float()
    return float(sum(((maps[i] - masks[h.mask_index]) ** 2).mean() for i, h in enumerate(scene.handles)) / len(maps))


def test_attention_loss_pulls_each_handles_map_towards_its_mask(scene_files, tiny_model):
    distance = {}
    for lam in (FAST_LAMBDA, 0.0):
        result = learn(scene_files["image"], scene_files["masks"], LearnConfig(lambda_attn=lam, **FAST_SETTINGS),
                       base_model=str(tiny_model), name=f"fast{lam}")
        distance[lam] = _distance_to_own_masks(result.path)
    assert distance[FAST_LAMBDA] < 0.7 * distance[0.0], distance


@pytest.mark.slow
def test_attention_loss_puts_each_handle_on_its_own_mask(scene_files, tiny_sdxl):
    margins = {}
    for lam in (0.01, 0.0):
        result = learn(scene_files["image"], scene_files["masks"], LearnConfig(lambda_attn=lam, **SETTINGS),
                       base_model=str(tiny_sdxl), name=f"lam{lam}")
        handles = attention_overlap(result.path)["handles"]
        if lam:
            for h in handles:
                assert h["own"] > h["other"], h
        margins[lam] = sum(h["own"] - h["other"] for h in handles) / len(handles)
    assert margins[0.01] > margins[0.0] + 0.1, margins
