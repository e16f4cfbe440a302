"""The attention loss does its job: handles look at their own objects.

Same setting as benchmarks/attention_iou.py (which runs more seeds and keeps the
figures), one seed here."""


from scenebreak import LearnConfig, learn
from scenebreak.diagnostics import attention_overlap

SETTINGS = dict(steps1=400, steps2=400, lr2=1e-4, prior=False, seed=0)


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
