"""One process, many calls (a notebook's loop, the web page's Generate clicks): a scene's
models load once and serve every later call with it, which makes the very images a
fresh load makes; anything else (another scene, a scene learned again, a failed call,
learn) loads afresh or lets go."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from scenebreak import GenerateConfig, generate, kept
from scenebreak.sample import sampling

FAST = dict(steps=3, num_images=1)


@pytest.fixture
def loads(monkeypatch):
    """The scenes' pipelines loaded from their files, in order."""
    real, loaded = sampling.open_pipeline, []

    def counting(scene, *args, **kwargs):
        loaded.append(scene.name)
        return real(scene, *args, **kwargs)

    monkeypatch.setattr(sampling, "open_pipeline", counting)
    return loaded


def pixels(result):
    return [np.asarray(Image.open(i.path)) for i in result.images]


def test_a_second_generate_of_a_scene_loads_nothing_and_makes_what_a_fresh_load_makes(learned, tmp_path, loads):
    first = generate(learned.path, "<asset1> on the moon", GenerateConfig(seed=7, **FAST), out_dir=tmp_path / "a")
    again = generate(learned.path, "<asset1> on the moon", GenerateConfig(seed=7, **FAST), out_dir=tmp_path / "b")
    assert len(loads) == 1 and kept.holding()
    assert all(np.array_equal(a, b) for a, b in zip(pixels(first), pixels(again)))
    # Another sampler on the kept models: the images of that sampler on freshly loaded ones.
    euler = generate(learned.path, "<asset1>", GenerateConfig(seed=3, scheduler="euler", **FAST), out_dir=tmp_path / "c")
    ddim = generate(learned.path, "<asset1>", GenerateConfig(seed=3, scheduler="ddim", **FAST), out_dir=tmp_path / "d")
    assert len(loads) == 1
    kept.unload()
    assert not kept.holding()
    for scheduler, made in (("euler", euler), ("ddim", ddim)):
        fresh = generate(learned.path, "<asset1>", GenerateConfig(seed=3, scheduler=scheduler, **FAST),
                         out_dir=tmp_path / f"fresh-{scheduler}")
        assert np.array_equal(pixels(fresh)[0], pixels(made)[0]), scheduler
    assert len(loads) == 2  # (the first of those two loaded; the second used it)


def test_a_scene_learned_again_or_another_scene_loads_afresh(learned, learned_background, tmp_path, loads):
    copy = tmp_path / "copy.scene"
    shutil.copyfile(learned.path, copy)
    generate(copy, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    # On a CPU the weights are fp32 at any --precision (bf16 is an autocast per call): kept.
    generate(copy, "<asset1>", GenerateConfig(seed=1, precision="fp32", **FAST), out_dir=tmp_path)
    assert len(loads) == 1
    # The file replaced under the same name (as learn --force writes a new file in its place).
    replacement = tmp_path / "replacement.scene"
    shutil.copyfile(learned_background.path, replacement)
    os.replace(replacement, copy)
    generate(copy, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    generate(copy, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)  # (one scene is kept, the last)
    assert len(loads) == 4


def test_a_generate_that_fails_keeps_nothing_half_used(learned, tmp_path, loads, monkeypatch):
    import scenebreak.sample.pipeline as pipeline

    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert kept.holding()

    def broken(*args, **kwargs):
        raise RuntimeError("something broke mid-pass")

    with monkeypatch.context() as patched:
        patched.setattr(pipeline, "sample", broken)
        with pytest.raises(RuntimeError, match="mid-pass"):
            generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert not kept.holding()
    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert len(loads) == 2


def test_a_generate_stopped_between_passes_keeps_its_models(learned, tmp_path, loads):
    """The page's Cancel stops at the end of a pass, a clean point: the next prompt is quick."""
    from scenebreak.errors import Interrupted

    with pytest.raises(Interrupted):
        generate(learned.path, "<asset1>", GenerateConfig(seed=1, steps=2, num_images=2, batch_size=1),
                 out_dir=tmp_path, should_stop=lambda: True)
    assert kept.holding()
    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert len(loads) == 1


def test_learn_lets_the_kept_models_go_before_it_loads(learned, scene_files, tiny_model, tmp_path, monkeypatch):
    """Its memory plan measures what is free: the last scene's models waiting on the GPU
    would have made it choose --memory low, or LoRA under --tune auto."""
    import scenebreak.train.learn as learning
    from scenebreak import LearnConfig, learn

    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert kept.holding()
    held_at_load = []
    real = learning._load_inputs

    def load_inputs(*args, **kwargs):
        held_at_load.append(kept.holding())
        return real(*args, **kwargs)

    monkeypatch.setattr(learning, "_load_inputs", load_inputs)
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
          base_model=str(tiny_model), output=tmp_path / "new.scene")
    assert held_at_load == [False]


def test_unload_from_python_lets_the_models_go(learned, tmp_path, monkeypatch):
    import weakref

    import scenebreak

    real, made = sampling.open_pipeline, []

    def opening(*args, **kwargs):
        pipe = real(*args, **kwargs)
        made.append(weakref.ref(pipe.unet))
        return pipe

    monkeypatch.setattr(sampling, "open_pipeline", opening)
    generate(learned.path, "<asset1>", GenerateConfig(seed=1, **FAST), out_dir=tmp_path)
    assert kept.holding()
    scenebreak.unload()
    assert not kept.holding() and all(ref() is None for ref in made)
