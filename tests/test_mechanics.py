"""The attention loss does its job: handles look at their own objects.

The slow test uses the same setting as benchmarks/attention_iou.py (which runs more
seeds and keeps the figures), one seed here; run it with `python -m pytest -m slow`.
The fast test runs in the default suite: a short phase 2 (the UNet and the handles
learn together) with a stronger attention loss and a higher learning rate, so the
loss has moved the maps after 120 steps."""

import pytest

from scenebreak import LearnConfig, learn
from scenebreak.diagnostics import attention_overlap

SETTINGS = dict(steps1=400, steps2=400, lr2=1e-4, prior=False, seed=0)

# Measured on the tiny model (own - other IoU per handle with lambda 0.3, and the mean
# margin's gain over lambda 0): seed 0 +0.38/+0.51 and +0.47; seeds 1, 3, 4 also pass
# (smallest per-handle margin +0.07), seed 2 does not (one handle lands on the other
# square). With lambda 0.01, 100-150 steps were within seed-to-seed noise.
FAST_SETTINGS = dict(steps1=0, steps2=120, lr2=1e-3, prior=False, seed=0)
FAST_LAMBDA = 0.3


def _overlap(scene_files, tiny_model, lam, settings):
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(lambda_attn=lam, **settings),
                   base_model=str(tiny_model), name=f"lam{lam}")
    return attention_overlap(result.path)["handles"]


def test_attention_loss_moves_each_handle_onto_its_own_mask_quickly(scene_files, tiny_model):
    with_loss = _overlap(scene_files, tiny_model, FAST_LAMBDA, FAST_SETTINGS)
    without = _overlap(scene_files, tiny_model, 0.0, FAST_SETTINGS)
    for h in with_loss:
        assert h["own"] > h["other"] + 0.1, h
    mean = {key: sum(h["own"] - h["other"] for h in rows) / len(rows) for key, rows in (("with", with_loss), ("without", without))}
    assert mean["with"] > mean["without"] + 0.2, (mean, with_loss, without)


@pytest.mark.slow
def test_attention_loss_puts_each_handle_on_its_own_mask(scene_files, tiny_model):
    margins = {}
    for lam in (0.01, 0.0):
        result = learn(scene_files["image"], scene_files["masks"], LearnConfig(lambda_attn=lam, **SETTINGS),
                       base_model=str(tiny_model), name=f"lam{lam}")
        handles = attention_overlap(result.path)["handles"]
        if lam:
            for h in handles:
                assert h["own"] > h["other"], h
        margins[lam] = sum(h["own"] - h["other"] for h in handles) / len(handles)
    assert margins[0.01] > margins[0.0] + 0.1, margins
