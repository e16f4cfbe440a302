"""`export -f a1111`: textual-inversion files and one kohya LoRA, loaded back the way
other tools load them (diffusers' `load_textual_inversion` and `load_lora_weights`
read the same layouts as AUTOMATIC1111 and ComfyUI) on top of the tiny base model,
must reproduce the scene's own text encoders and UNet: exactly for a LoRA scene, and
for a fully tuned scene as closely as the export reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import _learn_once
from scenebreak import LearnConfig, load_scene
from scenebreak.cli import cli
from scenebreak.errors import BundleError, InvalidInput
from scenebreak.export import export
from scenebreak.kohya import carried

FEW = dict(steps1=2, steps2=2, prior=False)


@pytest.fixture(scope="module")
def lora_scene(tmp_path_factory, tiny_model):
    """LoRA adapters trained hard enough (lr 1e-2) that they change the outputs."""
    return _learn_once(tmp_path_factory.mktemp("a1111-lora"), tiny_model,
                       LearnConfig(**FEW, tune="lora", rank=4, lr_lora=1e-2)).path


@pytest.fixture(scope="module")
def full_scene(tmp_path_factory, tiny_model):
    """Fully tuned, stored in fp32, with a phase-2 learning rate that moves every weight."""
    return _learn_once(tmp_path_factory.mktemp("a1111-full"), tiny_model,
                       LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32")).path


@pytest.fixture(scope="module")
def full_sd1(tmp_path_factory):
    """SD 1.x's shape: attention projected in and out by 1x1 convolutions."""
    from tinymodels import build_tiny_model

    root = tmp_path_factory.mktemp("a1111-sd1")
    base = build_tiny_model(root / "tiny-sd1", variant="sd1")
    return _learn_once(root, base, LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32")).path, base


@pytest.fixture(scope="module")
def full_sdxl(tmp_path_factory, tiny_sdxl):
    return _learn_once(tmp_path_factory.mktemp("a1111-sdxl"), tiny_sdxl,
                       LearnConfig(steps1=1, steps2=2, prior=False, tune="full", lr2=1e-3, save_dtype="fp32")).path


# -- helpers ---------------------------------------------------------------------------------------

def scene_models(path):
    """The scene's own UNet, text encoders and tokenizers, in fp32."""
    from scenebreak.device import choose_device
    from scenebreak.scene_models import scene_components

    scene = load_scene(path)
    unet, _, text_encoders, tokenizers = scene_components(scene, choose_device("cpu"), dtype=torch.float32)
    return scene, unet, text_encoders, tokenizers


def without_what_a_lora_cannot_carry(scene, unet, text_encoders, base_folder):
    """The scene's models with every parameter a kohya LoRA cannot carry set back to the
    base model's: what base + a full-rank extraction must equal."""
    from scenebreak.models import load_components

    c = load_components(str(base_folder))
    pairs = [("unet", unet, c.unet), *zip(scene.family.text_encoders, text_encoders, c.text_encoders)]
    with torch.no_grad():
        for component, model, base in pairs:
            reference = base.state_dict()
            for key, param in model.state_dict().items():
                if not carried(component, key, param) and param.shape == reference[key].shape:
                    param.copy_(reference[key])
    return c


def exported_pipeline(scene, base_folder, result):
    """The base pipeline with the export's LoRA and embeddings loaded as a user would."""
    from scenebreak.families import pipeline_class

    pipe = pipeline_class(scene.family).from_pretrained(base_folder, dtype=torch.float32)
    lora = result.paths[0]
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    for path in result.paths[1:-1]:
        if scene.family.is_xl:
            rows = load_file(path)
            pipe.load_textual_inversion(rows["clip_l"], token=path.stem, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(rows["clip_g"], token=path.stem, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path), token=path.stem)
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if scene.family.is_xl else [pipe.text_encoder]
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if scene.family.is_xl else [pipe.tokenizer]
    return pipe, encoders, tokenizers


def encode(scene, text_encoders, tokenizers, prompt):
    from scenebreak.families import encode_prompts, time_ids

    ids = [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
           for t in tokenizers]
    r = scene.resolution
    with torch.no_grad():
        return encode_prompts(scene.family, text_encoders, ids, time_ids((r, r), (r, r)) if scene.family.is_xl else None)


def unet_output(unet, hidden, added):
    generator = torch.Generator().manual_seed(0)
    size = unet.config.sample_size
    latents = torch.randn(1, unet.config.in_channels, size, size, generator=generator)
    with torch.no_grad():
        return unet(latents, 500, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def prompts(scene, triggers):
    """The same prompt with the scene's handles and with the export's trigger words."""
    return "a photo of " + " and ".join(scene.tokens), "a photo of " + " and ".join(triggers)


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def check_round_trip(scene, unet, text_encoders, tokenizers, base_folder, result, tolerance):
    """Handle rows, text-encoder outputs and the UNet's output of base + export against
    the given models' (the scene's own, or what a LoRA can carry of it), within
    `tolerance` relative error; returns the exported pipeline."""
    pipe, encoders, pipe_tokenizers = exported_pipeline(scene, base_folder, result)
    triggers = [p.stem for p in result.paths[1:-1]]
    for i, trigger in enumerate(triggers):
        for rows, encoder, tokenizer in zip(scene.handle_embeddings, encoders, pipe_tokenizers):
            row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(trigger)]
            assert torch.equal(row, rows[i])
    ours, theirs = prompts(scene, triggers)
    hidden, added = encode(scene, text_encoders, tokenizers, ours)
    exported_hidden, exported_added = encode(scene, encoders, pipe_tokenizers, theirs)
    assert relative(exported_hidden, hidden) < tolerance
    if added:
        assert relative(exported_added["text_embeds"], added["text_embeds"]) < tolerance
    assert relative(unet_output(pipe.unet, hidden, added), unet_output(unet, hidden, added)) < tolerance
    return pipe


# -- round trips -----------------------------------------------------------------------------------

def test_a_lora_scene_round_trips_exactly(lora_scene, tiny_model, tmp_path):
    result = export(lora_scene, tmp_path / "a1111", "a1111")
    assert result.lora.source == "adapters" and result.lora.rank == 4
    scene, unet, text_encoders, tokenizers = scene_models(lora_scene)
    pipe = check_round_trip(scene, unet, text_encoders, tokenizers, tiny_model, result, tolerance=1e-5)
    # ...and the adapters matter: without them the base UNet is far from the scene's.
    pipe.unload_lora_weights()
    hidden, added = encode(scene, text_encoders, tokenizers, prompts(scene, [])[0])
    assert relative(unet_output(pipe.unet, hidden, added), unet_output(unet, hidden, added)) > 1e-3


def test_a_full_scene_extracted_at_full_rank_is_near_exact(full_scene, tiny_model, tmp_path):
    """Rank 64 is full rank for every layer of the tiny model: base + LoRA is the scene,
    except for the biases and norms no LoRA carries (reset in the reference)."""
    result = export(full_scene, tmp_path / "a1111", "a1111")
    report = result.lora
    assert report.source == "svd" and report.kept > 0.9999 and report.worst[1] > 0.9999
    assert 0 < report.left_out < 0.2 and set(report.left_out_parts) <= {"biases", "norms", "other layers"}
    scene, unet, text_encoders, tokenizers = scene_models(full_scene)
    without_what_a_lora_cannot_carry(scene, unet, text_encoders, tiny_model)
    check_round_trip(scene, unet, text_encoders, tokenizers, tiny_model, result, tolerance=1e-4)


def test_an_sd1_scene_with_1x1_convolutions_round_trips(full_sd1, tmp_path):
    path, base = full_sd1
    result = export(path, tmp_path / "a1111", "a1111")
    assert "lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight" in load_file(result.paths[0])
    scene, unet, text_encoders, tokenizers = scene_models(path)
    assert scene.family.name == "SD 1.x" and isinstance(unet.down_blocks[1].attentions[0].proj_in, torch.nn.Conv2d)
    without_what_a_lora_cannot_carry(scene, unet, text_encoders, base)
    check_round_trip(scene, unet, text_encoders, tokenizers, base, result, tolerance=1e-4)


def test_a_lossy_extraction_reports_what_diffusers_then_loads(full_scene, tiny_model, tmp_path):
    """At rank 2 the file keeps what the report says: the carried layers' weights, fused
    by diffusers, miss exactly (1 - kept) of the difference's energy, and the worst
    layer keeps what the report names. The UNet still moves toward the scene's."""
    result = export(full_scene, tmp_path / "a1111", "a1111", rank=2)
    report = result.lora
    assert report.rank == 2 and 0.05 < report.kept < 0.95 and report.worst[1] < report.kept
    scene, unet, text_encoders, tokenizers = scene_models(full_scene)
    pipe, encoders, _ = exported_pipeline(scene, tiny_model, result)
    hidden, added = encode(scene, text_encoders, tokenizers, prompts(scene, [])[0])
    expected = unet_output(unet, hidden, added)
    with_lora = relative(unet_output(pipe.unet, hidden, added), expected)
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # keeps the fused weights, plain layers again
    from scenebreak.models import load_components

    base = load_components(str(tiny_model))
    assert with_lora < relative(unet_output(base.unet, hidden, added), expected)
    missed = difference = 0.0
    per_layer = {}
    tuned = {"unet": unet.state_dict(), "text_encoder": text_encoders[0].state_dict()}
    fused = {"unet": pipe.unet.state_dict(), "text_encoder": encoders[0].state_dict()}
    original = {"unet": base.unet.state_dict(), "text_encoder": base.text_encoder.state_dict()}
    for component, state in tuned.items():
        for key, value in state.items():
            if carried(component, key, value):
                d = float((value - original[component][key]).pow(2).sum())
                m = float((value - fused[component][key]).pow(2).sum())
                difference, missed = difference + d, missed + m
                per_layer[key] = 1 - m / d
    assert missed / difference == pytest.approx(1 - report.kept, rel=1e-3)
    worst_key = report.worst[0].split(".", 1)[1] + ".weight"
    assert per_layer[worst_key] == pytest.approx(report.worst[1], abs=1e-4)


def test_a_full_sdxl_scene_round_trips_in_both_text_encoders(full_sdxl, tiny_sdxl, tmp_path):
    result = export(full_sdxl, tmp_path / "a1111", "a1111")
    assert result.lora.kept > 0.9999
    names = load_file(result.paths[0])
    assert any(k.startswith("lora_te1_") for k in names) and any(k.startswith("lora_te2_") for k in names)
    assert not any(k.startswith("lora_te_") for k in names)
    tensors = load_file(result.paths[1])
    assert set(tensors) == {"clip_l", "clip_g"} and tensors["clip_l"].shape == (1, 32) and tensors["clip_g"].shape == (1, 48)
    scene, unet, text_encoders, tokenizers = scene_models(full_sdxl)
    without_what_a_lora_cannot_carry(scene, unet, text_encoders, tiny_sdxl)
    check_round_trip(scene, unet, text_encoders, tokenizers, tiny_sdxl, result, tolerance=1e-4)


# -- the files -------------------------------------------------------------------------------------

def test_the_lora_file_has_the_kohya_layout(lora_scene, full_scene, tmp_path):
    adapters = export(lora_scene, tmp_path / "lora", "a1111")
    state = load_file(adapters.paths[0])
    modules = {k.split(".", 1)[0] for k in state}
    assert {k.split(".", 1)[1] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}
    for module in modules:
        assert module.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")), module
        assert {f"{module}.lora_down.weight", f"{module}.lora_up.weight", f"{module}.alpha"} <= state.keys()
        assert float(state[f"{module}.alpha"]) == 4.0 and state[f"{module}.lora_down.weight"].shape[0] == 4
        assert state[f"{module}.lora_up.weight"].shape[1] == 4
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in modules
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2" in modules
    with safe_open(str(adapters.paths[0]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sd_v2" and meta["ss_network_dim"] == "4"

    extracted = load_file(export(full_scene, tmp_path / "full", "a1111", rank=3).paths[0])
    down = extracted["lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight"]
    up = extracted["lora_unet_up_blocks_1_resnets_0_conv1.lora_up.weight"]
    assert down.shape[0] == 3 and down.shape[2:] == (3, 3) and up.shape[1:] == (3, 1, 1)  # a 3x3 conv, as LoCon
    assert float(extracted["lora_unet_up_blocks_1_resnets_0_conv1.alpha"]) == 3.0
    assert extracted["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].ndim == 2
    assert not any("norm" in k or "bias" in k or "position_embedding" in k for k in extracted)


def test_embedding_files_and_readme(lora_scene, tmp_path):
    result = export(lora_scene, tmp_path / "a1111", "a1111")
    names = [p.relative_to(tmp_path / "a1111").as_posix() for p in result.paths]
    assert names == ["loras/photo-lora.safetensors", "embeddings/photo-asset1.safetensors",
                     "embeddings/photo-asset2.safetensors", "README.md"]
    scene = load_scene(lora_scene)
    tensors = load_file(result.paths[1])
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], scene.embeddings[:1])
    readme = result.paths[-1].read_text()
    for text in ("`photo-asset1`", "`photo-asset2`", "`<asset1>`", "<lora:photo-lora:1>", "embedding:photo-asset1",
                 "models/Lora/", "models/loras/", "models/embeddings/", "strength 1.0", "SD 2.x",
                 str(scene.meta["base_model"]["id"])):
        assert text in readme, text
    assert json.loads((tmp_path / "a1111" / ".scenebreak-export").read_text())["format"] == "a1111"


# -- command line and hostile scenes --------------------------------------------------------------

def test_cli_prints_paths_and_the_report(learned, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(learned.path), "-f", "a1111", "-o", str(tmp_path / "a"), "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert [Path(line).name for line in result.stdout.splitlines()] == [
        "photo-lora.safetensors", "photo-asset1.safetensors", "photo-asset2.safetensors", "README.md"]
    assert re.search(r"LoRA extracted at rank 8 .* keep \d+\.\d+% .*relative error", result.stderr)
    document = runner.invoke(cli, ["export", str(learned.path), "-f", "a1111", "-o", str(tmp_path / "a"), "--force",
                                   "--json", "-q"])
    assert document.exit_code == 0, document.output
    data = json.loads(document.stdout)
    assert data["format"] == "a1111" and 0 <= data["lora"]["kept"] <= 1 and data["lora"]["rank"] == 64


@pytest.mark.parametrize("args, message", [
    (["--rank", "0"], "--rank must be a whole number between 1 and 1024"),
    (["--rank", "1025"], "--rank must be a whole number between 1 and 1024"),
    (["--rank", "-3"], "--rank must be a whole number between 1 and 1024"),
    (["-f", "embeddings", "--rank", "8"], "--rank applies only to -f a1111"),
])
def test_bad_rank_is_one_line_and_exit_2(lora_scene, tmp_path, args, message):
    format = [] if "-f" in args else ["-f", "a1111"]
    result = CliRunner().invoke(cli, ["export", str(lora_scene), "-o", str(tmp_path / "x"), *format, *args])
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_a_missing_base_model_names_the_fix_and_a_lora_scene_needs_none(full_scene, lora_scene, tmp_path):
    def rehome(source, target):
        with safe_open(str(source), "pt") as f:
            header, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header["scenebreak"])
        meta["base_model"].update(id="someone/not-downloaded", commit=None)
        save_file(data, str(target), metadata={"format": header["format"], "scenebreak": json.dumps(meta)})
        return target

    runner = CliRunner()
    full = runner.invoke(cli, ["export", str(rehome(full_scene, tmp_path / "full.scene")), "-f", "a1111", "-o",
                               str(tmp_path / "f")])
    assert full.exit_code == 1 and "needs its base model" in full.stderr and "--base-model" in full.stderr
    assert len(full.stderr.strip().splitlines()) == 1 and not (tmp_path / "f").exists()
    lora = runner.invoke(cli, ["export", str(rehome(lora_scene, tmp_path / "lora.scene")), "-f", "a1111", "-o",
                               str(tmp_path / "l")])
    assert lora.exit_code == 0, lora.output


def craft(source, target, edit):
    with safe_open(str(source), "pt") as f:
        header, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["scenebreak"])
    edit(meta)
    save_file(data, str(target), metadata={"format": header["format"], "scenebreak": json.dumps(meta)})
    return target


@pytest.mark.parametrize("token", ["<../../escaped>", "</abs/escaped>", "<..>", "<a\\b>", "<.hidden>"])
def test_a_hostile_handle_name_writes_nothing(lora_scene, tmp_path, token):
    def edit(meta):
        meta["handles"][0]["token"] = token

    hostile = craft(lora_scene, tmp_path / "hostile.scene", edit)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(BundleError, match="not a valid handle name"):
        export(hostile, tmp_path / "out" / "a1111", "a1111")
    assert sorted(tmp_path.rglob("*")) == before


def test_the_export_checks_handle_names_itself(lora_scene):
    """Whatever lets a bad name through (a Scene built in Python), no file is named by it."""
    from scenebreak.a1111 import prepare

    scene = load_scene(lora_scene, weights=True)
    scene.meta["handles"][0]["token"] = "<../../escaped>"
    with pytest.raises(BundleError, match="cannot name a file"):
        prepare(scene)


def test_odd_scene_names_and_names_differing_in_case(lora_scene, tmp_path):
    # A scene file may be called anything; without a recorded name its file name counts.
    odd = craft(lora_scene, tmp_path / "my photo (1)..scene", lambda meta: meta.pop("name", None))
    paths = export(odd, tmp_path / "odd", "a1111").paths
    assert paths[0].name == "my-photo-1-lora.safetensors" and paths[1].name == "my-photo-1-asset1.safetensors"
    assert all(p.resolve().is_relative_to((tmp_path / "odd").resolve()) for p in paths)

    def same_but_case(meta):
        meta["handles"][0]["token"], meta["handles"][1]["token"] = "<Cat>", "<cat>"

    clash = craft(lora_scene, tmp_path / "clash.scene", same_but_case)
    with pytest.raises(InvalidInput, match="differ only in letter case"):
        export(clash, tmp_path / "clash", "a1111")
    assert not (tmp_path / "clash").exists()
