"""SD 1.x and SD 2.x-768 verified, not assumed: tiny models of their shapes go through
learn, generate and edit like the default SD 2.x-base shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scenebreak import EditConfig, GenerateConfig, LearnConfig, edit, generate, learn, load_scene


@pytest.mark.parametrize("variant, resolution, family, prediction", [
    ("sd1", 64, "SD 1.x", "epsilon"),
    ("sd2-768", 96, "SD 2.x", "v_prediction"),
])
def test_learn_generate_and_edit_on_each_family_shape(variant, resolution, family, prediction, scene_files, tmp_path):
    from tinymodels import build_tiny_model

    model = build_tiny_model(tmp_path / variant, resolution=resolution, variant=variant)
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, num_class_images=1),
                   base_model=str(model), name=variant)
    scene = load_scene(result.path)
    assert scene.meta["base_model"]["family"] == family and scene.meta["prediction_type"] == prediction
    assert scene.resolution == resolution and np.isfinite(result.losses["phase2"]["loss_last"])
    images = generate(result.path, "<asset1> on the moon", GenerateConfig(steps=2, seed=1), out_dir=tmp_path / "gen")
    with Image.open(images.images[0].path) as im:
        assert im.size == (resolution, resolution)
    edited = edit(scene_files["image"], [(scene_files["masks"][0], "a photo of <asset2>")], result.path,
                  EditConfig(steps=4, seed=1), out_dir=tmp_path / "edit")
    with Image.open(edited.images[0].path) as im, Image.open(scene_files["image"]) as source:
        assert im.size == source.size
