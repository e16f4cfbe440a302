from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from scenebreak import load_scene
from scenebreak.cli.commands import cli
from scenebreak.errors import InvalidInput
from scenebreak.exports.export import export_scene


def test_diffusers_folder_loads_as_a_standard_pipeline(learned, tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = tmp_path / "exported"
    assert export_scene(learned.path, folder) == [folder]
    pipe = StableDiffusionPipeline.from_pretrained(folder)  # as the docs show it: no dtype given
    # One precision, fp32 as diffusers loads a UNet: the text encoder's config said float16,
    # which transformers 5 loaded, and the first step failed (Half and Float).
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    ids = pipe.tokenizer.convert_tokens_to_ids(["<asset1>", "<asset2>"])
    rows = pipe.text_encoder.get_input_embeddings().weight[ids]
    # the folder keeps the scene's storage precision (fp16 by default)
    assert torch.allclose(rows, load_scene(learned.path).embeddings, atol=1e-3)
    image = pipe("<asset1> on the moon", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    with pytest.raises(InvalidInput, match="--force"):
        export_scene(learned.path, folder)
    (folder / "stale.txt").write_text("old")
    assert export_scene(learned.path, folder, force=True) == [folder]
    assert not (folder / "stale.txt").exists() and (folder / "model_index.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temp folder left


def test_the_diffusers_export_and_a_scene_kept_open_follow_windows_file_rules(learned, tmp_path, monkeypatch):
    """On Windows a file cannot be replaced or deleted while mapped: every `-f diffusers`
    export failed ("Access is denied": CLIP's weights renamed in place while still mapped),
    and a scene a notebook had opened could be neither learned again with --force nor
    removed (its embeddings, photo and masks were views of the file)."""
    from helpers import windows_file_rules

    from scenebreak import remove_scenes
    from scenebreak.scenes.bundle import save_scene

    windows_file_rules(monkeypatch)
    assert export_scene(learned.path, tmp_path / "exported") == [tmp_path / "exported"]
    copy = tmp_path / "copy.scene"
    copy.write_bytes(Path(learned.path).read_bytes())
    shown = load_scene(copy)  # (kept, as a notebook's Out[] keeps it)
    save_scene(load_scene(learned.path, weights=True), copy, replace=True)  # learn --force writes over it
    assert remove_scenes([copy]) == [copy] and not copy.exists()
    assert shown.embeddings.shape[0] == 2


def test_embeddings_load_as_textual_inversion_into_the_base_model(learned, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    paths = export_scene(learned.path, tmp_path / "emb", format="embeddings")
    assert [p.name for p in paths] == ["asset1.safetensors", "asset2.safetensors"]
    scene = load_scene(learned.path)
    assert torch.equal(load_file(paths[0])["<asset1>"], scene.embeddings[0])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(paths[1]))
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<asset2>")]
    assert torch.allclose(row, scene.embeddings[1])


def test_export_cli(learned, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(learned.path), "-f", "embeddings", "-o", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2
    result = CliRunner().invoke(cli, ["export", str(learned.path), "-f", "embeddings", "-o", str(tmp_path / "j"), "--json"])
    data = __import__("json").loads(result.stdout)
    assert data["scene_path"] == str(learned.path) and data["format"] == "embeddings" and len(data["paths"]) == 2
    result = CliRunner().invoke(cli, ["export", "no-such-scene", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "scene not found" in result.stderr
