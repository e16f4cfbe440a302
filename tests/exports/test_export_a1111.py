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

from helpers import learn_once, craft
from scenebreak import LearnConfig, load_scene
from scenebreak.cli.commands import cli
from scenebreak.errors import BundleError
from scenebreak.events import Progress
from scenebreak.exports.export import export
from scenebreak.families import family_named
from scenebreak.exports.kohya import carried

FEW = dict(steps1=2, steps2=2, prior=False)


@pytest.fixture(scope="module")
def lora_scene(tmp_path_factory, tiny_model):
    """LoRA adapters trained hard enough (lr 1e-2) that they change the outputs."""
    return learn_once(tmp_path_factory.mktemp("a1111-lora"), tiny_model,
                       LearnConfig(**FEW, tune="lora", rank=4, lr_lora=1e-2)).path


@pytest.fixture(scope="module")
def full_scene(tmp_path_factory, tiny_model):
    """Fully tuned, stored in fp32, with a phase-2 learning rate that moves every weight."""
    return learn_once(tmp_path_factory.mktemp("a1111-full"), tiny_model,
                       LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32")).path


@pytest.fixture(scope="module")
def full_sd1(tmp_path_factory):
    """SD 1.x's shape: attention projected in and out by 1x1 convolutions."""
    from tinymodels import build_tiny_model

    root = tmp_path_factory.mktemp("a1111-sd1")
    base = build_tiny_model(root / "tiny-sd1", variant="sd1")
    return learn_once(root, base, LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32")).path, base


@pytest.fixture(scope="module")
def full_sdxl(tmp_path_factory, tiny_sdxl):
    return learn_once(tmp_path_factory.mktemp("a1111-sdxl"), tiny_sdxl,
                       LearnConfig(steps1=1, steps2=2, prior=False, tune="full", lr2=1e-3, save_dtype="fp32")).path


# -- helpers ---------------------------------------------------------------------------------------

def scene_models(path):
    """The scene's own UNet, text encoders and tokenizers, in fp32."""
    from scenebreak.device import choose_device
    from scenebreak.sample.scene_models import scene_components

    scene = load_scene(path)
    unet, _, text_encoders, tokenizers = scene_components(scene, choose_device("cpu"), dtype=torch.float32)
    return scene, unet, text_encoders, tokenizers


def without_what_a_lora_cannot_carry(scene, unet, text_encoders, base_folder):
    """The scene's models with every parameter a kohya LoRA cannot carry set back to the
    base model's: what base + a full-rank extraction must equal."""
    from scenebreak.families.base_model import load_components

    c = load_components(str(base_folder))
    pairs = [("unet", unet, c.denoiser), *zip(scene.family.text_encoders, text_encoders, c.text_encoders)]
    with torch.no_grad():
        for component, model, base in pairs:
            reference = base.state_dict()
            for key, param in model.state_dict().items():
                if not carried(component, key, param) and param.shape == reference[key].shape:
                    param.copy_(reference[key])
    return c


def embedding_paths(result):
    return [p for p in result.paths if p.parent.name == "embeddings"]


def exported_pipeline(scene, base_folder, result):
    """The base pipeline with the export's LoRA and embeddings loaded as a user would.
    Its text encoders pool at the end of text, as the scene's do (the tiny models carry
    the real configs' legacy eos_token_id, with which transformers pools at the largest
    id: a trigger's, in diffusers; A1111 and ComfyUI pool at the end of text)."""
    from scenebreak.families import pool_at_end_of_text

    pipe = scene.family.pipeline_class().from_pretrained(base_folder, dtype=torch.float32)
    lora = result.paths[0]
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    for path in embedding_paths(result):
        if len(scene.family.text_encoders) > 1:
            rows = load_file(path)
            pipe.load_textual_inversion(rows["clip_l"], token=path.stem, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(rows["clip_g"], token=path.stem, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        else:
            pipe.load_textual_inversion(str(path), token=path.stem)
    encoders = [getattr(pipe, name) for name in scene.family.text_encoders]
    tokenizers = [getattr(pipe, name) for name in scene.family.tokenizers]
    for encoder, tokenizer in zip(encoders, tokenizers):
        pool_at_end_of_text(encoder, tokenizer)
    return pipe, encoders, tokenizers


def encode(scene, text_encoders, tokenizers, prompt):
    ids = [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
           for t in tokenizers]
    r = scene.resolution
    with torch.no_grad():
        return scene.family.encode_prompts(text_encoders, ids, scene.family.sampling_conditions((r, r)))


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
    triggers = [p.stem for p in embedding_paths(result)]
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
    said = []
    result = export(full_scene, tmp_path / "a1111", "a1111", report=said.append)
    report = result.lora
    assert report.source == "svd" and report.kept > 0.9999 and report.worst[1] > 0.9999
    progress = [(e.completed, e.total) for e in said if isinstance(e, Progress)]
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1] > 0, progress  # the bar is up from the start
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
    from scenebreak.families.base_model import load_components

    base = load_components(str(tiny_model))
    assert with_lora < relative(unet_output(base.denoiser, hidden, added), expected)
    missed = difference = 0.0
    per_layer = {}
    tuned = {"unet": unet.state_dict(), "text_encoder": text_encoders[0].state_dict()}
    fused = {"unet": pipe.unet.state_dict(), "text_encoder": encoders[0].state_dict()}
    original = {"unet": base.denoiser.state_dict(), "text_encoder": base.text_encoder.state_dict()}
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


def test_an_extraction_is_repeatable_and_never_reseeds_the_gpus_random_numbers(full_scene, tmp_path, monkeypatch):
    """The randomized SVD is seeded for a repeatable file with torch.manual_seed, which
    reseeded every GPU's generator too (fork_rng gave back only the CPU's): a caller's
    own noise on the GPU after an export was seed 0's."""
    reseeded, randomized = [], []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    real_svd = torch.svd_lowrank
    monkeypatch.setattr(torch, "svd_lowrank", lambda *a, **k: randomized.append(1) or real_svd(*a, **k))
    torch.manual_seed(1234)
    follows = torch.rand(3)
    torch.manual_seed(1234)
    files = [load_file(export(full_scene, tmp_path / name, "a1111", rank=2).paths[0]) for name in ("a", "b")]
    assert randomized and reseeded == [1234, 1234]  # (the test's own seedings alone)
    assert torch.equal(torch.rand(3), follows)  # the CPU's generator given back
    assert files[0].keys() == files[1].keys() and all(torch.equal(files[0][k], files[1][k]) for k in files[0])


def test_a_full_sdxl_scene_round_trips_in_both_text_encoders(full_sdxl, tiny_sdxl, tmp_path):
    result = export(full_sdxl, tmp_path / "a1111", "a1111")
    assert result.lora.kept > 0.9999
    names = load_file(result.paths[0])
    assert any(k.startswith("lora_te1_") for k in names) and any(k.startswith("lora_te2_") for k in names)
    assert not any(k.startswith("lora_te_") for k in names)
    tensors = load_file(embedding_paths(result)[0])
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
    # One alpha for the whole file, also where a layer is narrower than the rank: diffusers
    # reads a single alpha for attention layers (their per-layer alpha keys match no
    # module), so per-layer alphas scaled a narrower attention layer by the wrong factor.
    wide = load_file(export(full_scene, tmp_path / "wide", "a1111", rank=64).paths[0])
    ranks = {t.shape[0] for k, t in wide.items() if k.endswith(".lora_down.weight")}
    assert len(ranks) > 1 and {float(t) for k, t in wide.items() if k.endswith(".alpha")} == {64.0}
    assert extracted["lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight"].ndim == 2
    assert not any("norm" in k or "bias" in k or "position_embedding" in k for k in extracted)


def test_embedding_files_and_readme(lora_scene, tmp_path):
    result = export(lora_scene, tmp_path / "a1111", "a1111")
    names = [p.relative_to(tmp_path / "a1111").as_posix() for p in result.paths]
    assert names == ["loras/photo-lora.safetensors", "loras/photo-lora.json", "embeddings/photo-asset1.safetensors",
                     "embeddings/photo-asset2.safetensors", "README.md"]
    scene = load_scene(lora_scene)
    tensors = load_file(embedding_paths(result)[0])
    assert list(tensors) == ["emb_params"] and torch.equal(tensors["emb_params"], scene.embeddings[:1])
    readme = result.paths[-1].read_text()
    for text in ("`photo-asset1`", "`photo-asset2`", "`<asset1>`", "<lora:photo-lora:1>", "embedding:photo-asset1",
                 "models/Lora/", "models/loras/", "models/embeddings/", "strength 1.0", "SD 2.x",
                 "photo-lora.json", f"`{Path(scene.meta['base_model']['id']).name}`"):
        assert text in readme, text
    assert json.loads((tmp_path / "a1111" / ".scenebreak-export").read_text())["format"] == "a1111"


# -- command line and hostile scenes --------------------------------------------------------------

def test_cli_prints_paths_and_the_report(learned, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(learned.path), "-f", "a1111", "-o", str(tmp_path / "a"), "--rank", "8"])
    assert result.exit_code == 0, result.output
    assert [Path(line).name for line in result.stdout.splitlines()] == [
        "photo-lora.safetensors", "photo-lora.json", "photo-asset1.safetensors", "photo-asset2.safetensors", "README.md"]
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
    assert len([line for line in full.stderr.splitlines() if line.startswith("Error")]) == 1
    assert not (tmp_path / "f").exists()
    lora = runner.invoke(cli, ["export", str(rehome(lora_scene, tmp_path / "lora.scene")), "-f", "a1111", "-o",
                               str(tmp_path / "l")])
    assert lora.exit_code == 0, lora.output


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
    from scenebreak.exports.a1111 import prepare

    scene = load_scene(lora_scene, weights=True)
    scene.meta["handles"][0]["token"] = "<../../escaped>"
    with pytest.raises(BundleError, match="cannot name a file"):
        prepare(scene)


def test_odd_scene_names(lora_scene, tmp_path):
    # A scene file may be called anything; without a recorded name its file name counts.
    odd = craft(lora_scene, tmp_path / "my photo (1)..scene", lambda meta: meta.pop("name", None))
    paths = export(odd, tmp_path / "odd", "a1111").paths
    assert paths[0].name == "my-photo-1-lora.safetensors" and paths[2].name == "my-photo-1-asset1.safetensors"
    assert all(p.resolve().is_relative_to((tmp_path / "odd").resolve()) for p in paths)


# -- SDXL's UNet in kohya's SGM names ---------------------------------------------------------------

def sgm_to_diffusers(names, unet_config):
    """Module names of `lora_unet_<SGM module>` keys as diffusers' `load_lora_weights`
    reads them (its own SGM -> diffusers mapping, independent of ours), one per name."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_unet_state_dict_to_peft

    one = torch.zeros(1, 1)
    state = {f"lora_unet_{name}.{part}": one for name in names for part in ("lora_down.weight", "lora_up.weight")}
    state, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(state, unet_config))
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    return [k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")]


def carried_unet_modules(unet, **kwargs):
    return sorted(k.removesuffix(".weight") for k, v in unet.state_dict().items() if carried("unet", k, v, **kwargs))


def unet_names(state):
    return {k.split(".")[0].removeprefix("lora_unet_") for k in state if k.startswith("lora_unet_")}


def test_the_sdxl_unet_keys_are_the_sgm_names_kohya_writes_on_sdxls_own_layout():
    """On the real SDXL base layout (built on the meta device): every carried UNet layer
    gets a distinct SGM name, diffusers' own SGM mapping leads each back to its layer,
    and the names the audit found missing in kohya's and A1111's loaders are there."""
    from diffusers import UNet2DConditionModel
    from tinymodels import sdxl_configs

    from scenebreak.exports.kohya import LoraLayer, kohya_state_dict

    with torch.device("meta"):
        unet = UNet2DConditionModel(**sdxl_configs()["unet"])
    modules = carried_unet_modules(unet)
    one = torch.zeros(1, 1)
    state = kohya_state_dict({f"unet.{m}": LoraLayer(one, one, 1.0) for m in modules}, family_named("SDXL"),
                             unet_config=unet.config)
    names = unet_names(state)
    assert len(names) == len(modules) == 792
    assert all(n.startswith(("input_blocks_", "middle_block_", "output_blocks_", "out_2", "time_embed_")) for n in names)
    for name in ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks_4_1_transformer_blocks_1_ff_net_0_proj",
                 "output_blocks_2_2_conv", "output_blocks_5_2_conv", "input_blocks_3_0_op", "input_blocks_6_0_op",
                 "input_blocks_1_0_in_layers_2", "input_blocks_4_0_skip_connection", "middle_block_2_emb_layers_1",
                 "middle_block_1_proj_out", "output_blocks_8_0_out_layers_3", "input_blocks_0_0", "out_2",
                 "time_embed_0", "time_embed_2"):
        assert name in names, name
    assert sorted(sgm_to_diffusers(names, unet.config)) == modules


def test_a_full_sdxl_scenes_lora_uses_sgm_names_and_loads_as_the_diffusers_named_one(full_sdxl, tiny_sdxl, tmp_path):
    """The tiny SDXL (one resnet per level): the file's UNet names are SGM ones that
    diffusers maps back onto exactly the carried layers, and `load_lora_weights` gives
    the same weights, to the bit, from it as from the same layers in diffusers names."""
    from scenebreak.exports.kohya import extract_layers, kohya_state_dict
    from scenebreak.families.base_model import load_components

    result = export(full_sdxl, tmp_path / "a1111", "a1111")
    state = load_file(result.paths[0])
    base = load_components(str(tiny_sdxl))
    names = unet_names(state)
    assert not any(n.startswith(("down_blocks", "mid_block", "up_blocks", "conv_", "time_embedding")) for n in names)
    assert sorted(sgm_to_diffusers(names, base.denoiser.config)) == carried_unet_modules(base.denoiser)

    scene = load_scene(full_sdxl, weights=True)
    components = {"unet": base.denoiser, "text_encoder": base.text_encoders[0], "text_encoder_2": base.text_encoders[1]}
    layers, _ = extract_layers({n: scene.weights[n] for n in components},
                               {n: m.state_dict() for n, m in components.items()}, 64, torch.float32)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    diffusers_named = {}
    for path, layer in layers.items():
        component, _, module = path.partition(".")
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        diffusers_named.update({f"{name}.lora_down.weight": layer.down, f"{name}.lora_up.weight": layer.up,
                                f"{name}.alpha": torch.tensor(layer.alpha)})
    sgm_named = kohya_state_dict(layers, family_named("SDXL"), unet_config=base.denoiser.config)
    assert unet_names(sgm_named) != unet_names(diffusers_named)
    fused = []
    for lora in (sgm_named, diffusers_named):
        pipe = scene.family.pipeline_class().from_pretrained(tiny_sdxl, dtype=torch.float32)
        pipe.load_lora_weights(dict(lora))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        fused.append({**pipe.unet.state_dict(), **{f"te2.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()}})
    assert fused[0].keys() == fused[1].keys()
    assert all(torch.equal(fused[0][k], fused[1][k]) for k in fused[0])
    assert not torch.equal(fused[0]["conv_in.weight"], base.denoiser.state_dict()["conv_in.weight"])  # it did load


def test_an_sdxl_lora_scene_round_trips_exactly_under_sgm_names(tmp_path_factory, tiny_sdxl, tmp_path):
    """A LoRA scene's adapters get their SGM names from the UNet layout the scene
    records (no base model is loaded to export it)."""
    path = learn_once(tmp_path_factory.mktemp("a1111-sdxl-lora"), tiny_sdxl,
                       LearnConfig(steps1=1, steps2=2, prior=False, tune="lora", rank=4, lr_lora=1e-2)).path
    result = export(path, tmp_path / "a1111", "a1111")
    assert result.lora.source == "adapters"
    names = unet_names(load_file(result.paths[0]))
    assert names and all(n.startswith(("input_blocks_", "middle_block_", "output_blocks_")) for n in names)
    assert "input_blocks_3_1_transformer_blocks_0_attn2_to_k" in names  # down_blocks.1.attentions.0 with one resnet a level
    scene, unet, text_encoders, tokenizers = scene_models(path)
    check_round_trip(scene, unet, text_encoders, tokenizers, tiny_sdxl, result, tolerance=1e-5)


def test_a_layer_outside_the_layout_is_a_bundle_error():
    from scenebreak.exports.kohya import sgm_module, unet_layout

    layout = unet_layout({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 2,
                          "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"]})
    assert sgm_module("up_blocks.0.upsamplers.0.conv", layout) == "output_blocks.2.2.conv"
    assert sgm_module("down_blocks.0.downsamplers.0.conv", layout) == "input_blocks.3.0.op"
    for module in ("down_blocks.0.attentions.0.proj_in", "down_blocks.1.downsamplers.0.conv", "up_blocks.1.upsamplers.0.conv",
                   "down_blocks.0.resnets.2.conv1", "down_blocks.0.resnets.0.norm1", "mid_block.resnets.2.conv1", "x.y"):
        with pytest.raises(BundleError, match="does not fit"):
            sgm_module(module, layout)
    for config in (None, {}, {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 10**9},
                   {"down_block_types": ["AttnDownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 1}):
        with pytest.raises(BundleError, match="cannot name the UNet's layers"):
            unet_layout(config)


# -- what the tools read: version, card, base model ------------------------------------------------

def a1111_sd_version(meta: dict) -> str:
    """AUTOMATIC1111's NetworkOnDisk.detect_version (extensions-builtin/Lora/network.py)."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


def forge_sd_version(meta: dict) -> str:
    """Forge's NetworkOnDisk.detect_version (extensions-builtin/sd_forge_lora/network.py)."""
    if meta.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora" or \
            str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta.get("modelspec.architecture") == "stable-diffusion-v1/lora" else "Unknown"


def lora_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize("family, prediction, version, architecture, tool", [
    ("SD 2.x", "epsilon", "sd_v2", "stable-diffusion-v2-512/lora", "SD2"),
    ("SD 2.x", "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", "SD2"),
    ("SD 1.x", "epsilon", "sd_v1", "stable-diffusion-v1/lora", "SD1"),
])
def test_the_lora_says_its_sd_version_as_a1111_and_forge_read_it(lora_scene, tmp_path, family, prediction, version,
                                                                   architecture, tool):
    def edit(meta):
        meta["base_model"]["family"], meta["prediction_type"] = family, prediction

    result = export(craft(lora_scene, tmp_path / "photo.scene", edit), tmp_path / "a1111", "a1111")
    meta = lora_metadata(result.paths[0])
    assert meta["ss_base_model_version"] == version and meta["modelspec.architecture"] == architecture
    assert meta["ss_v2"] == str(family == "SD 2.x") and meta["modelspec.prediction_type"] == prediction[0] + (
        "psilon" if prediction == "epsilon" else "")
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "64x64"
    assert a1111_sd_version(meta) == forge_sd_version(meta) == tool
    card = json.loads(result.paths[1].read_text())
    assert result.paths[1] == result.paths[0].with_suffix(".json")  # where A1111 and Forge look for it
    assert card["sd version"] == tool and card["preferred weight"] == 1.0
    assert card["activation text"] == "photo-asset1, photo-asset2" == meta["modelspec.trigger_phrase"]


def test_an_sdxl_lora_says_sdxl(full_sdxl, tmp_path):
    result = export(full_sdxl, tmp_path / "a1111", "a1111")
    meta = lora_metadata(result.paths[0])
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora" and meta["ss_v2"] == "False"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"  # SGM names
    assert a1111_sd_version(meta) == forge_sd_version(meta) == json.loads(result.paths[1].read_text())["sd version"] == "SDXL"


def test_no_local_path_goes_into_a_shared_file(full_scene, tiny_model, tmp_path):
    """The base model came from a local folder: the files name it by the folder's name."""
    for format in ("a1111", "embeddings", "diffusers"):
        export(full_scene, tmp_path / format, format)
        for path in (tmp_path / format).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert str(tiny_model).encode() not in data and str(tmp_path).encode() not in data, path
    meta = lora_metadata(tmp_path / "a1111" / "loras" / "photo-lora.safetensors")
    assert meta["ss_sd_model_name"] == meta["scenebreak_base_model"] == tiny_model.name
    with safe_open(str(tmp_path / "embeddings" / "asset1.safetensors"), "pt") as f:
        assert f.metadata()["base_model"] == tiny_model.name


@pytest.mark.parametrize("recorded, shared", [
    ("stabilityai/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base"),
    ("sd-base", "sd-base"),
    ("/home/someone/models/my-sd21/", "my-sd21"),
    ("~/models/sdxl", "sdxl"),
    ("./sd21", "sd21"),
    ("C:\\Users\\someone\\models\\sd15", "sd15"),
    ("/home/someone/.cache/huggingface/hub/models--stabilityai--stable-diffusion-2-1-base/snapshots/5ede9e4bf36e3c",
     "stabilityai/stable-diffusion-2-1-base"),
])
def test_base_model_names_in_shared_files(recorded, shared):
    from scenebreak.exports.a1111 import base_model_name

    assert base_model_name({"id": recorded}) == shared


# -- layers kohya's loaders skip -------------------------------------------------------------------

OUTER = ("conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2")


def test_the_report_says_what_kohya_skips_and_kohya_strict_leaves_it_out(full_scene, tiny_model, tmp_path):
    from scenebreak.exports.kohya import UNET_OUTER
    from scenebreak.families.base_model import load_components

    scene = load_scene(full_scene, weights=True)
    base = load_components(str(tiny_model))
    energy = {}
    for component, model in (("unet", base.denoiser), ("text_encoder", base.text_encoder)):
        for key, value in model.state_dict().items():
            tuned = scene.weights[component][key][: value.shape[0]]
            energy[component, key] = float((tuned.float() - value.float()).pow(2).sum()) if value.is_floating_point() else 0.0
    outer_share = sum(energy["unet", key] for key in UNET_OUTER) / sum(energy.values())
    assert outer_share > 0

    loose = export(full_scene, tmp_path / "loose", "a1111")
    assert {f"{m}" for m in OUTER} <= unet_names(load_file(loose.paths[0]))
    assert loose.lora.kohya_skipped == pytest.approx(outer_share, rel=1e-3) and not loose.lora.kohya_strict
    assert f"{outer_share:.2%} of the difference is in conv_in, conv_out and the time-embedding MLP" in loose.lora.summary()
    assert "kohya's sd-scripts" in loose.lora.summary() and "--kohya-strict" in loose.lora.summary()
    assert f"skip conv_in, conv_out and the time-embedding MLP, which hold {outer_share:.2%}" in loose.paths[-1].read_text()

    strict = export(full_scene, tmp_path / "strict", "a1111", kohya_strict=True)
    names = unet_names(load_file(strict.paths[0]))
    assert not set(OUTER) & names and names == unet_names(load_file(loose.paths[0])) - set(OUTER)
    report = strict.lora
    assert report.kohya_strict and report.layers == loose.lora.layers - 4
    assert report.left_out_parts["layers kohya skips"] == pytest.approx(outer_share, rel=1e-3)
    assert report.left_out == pytest.approx(loose.lora.left_out + outer_share, rel=1e-6)
    assert report.to_dict()["kohya_strict"] is True and "--kohya-strict" in strict.paths[-1].read_text()


def test_kohya_strict_on_the_command_line(lora_scene, learned, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["export", str(learned.path), "-f", "a1111", "-o", str(tmp_path / "a"), "--kohya-strict",
                                 "--json", "-q"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["lora"]["kohya_strict"] is True and data["lora"]["kohya_skipped"] > 0
    assert not set(OUTER) & unet_names(load_file(tmp_path / "a" / "loras" / "photo-lora.safetensors"))
    wrong = runner.invoke(cli, ["export", str(lora_scene), "-f", "embeddings", "-o", str(tmp_path / "e"), "--kohya-strict"])
    assert wrong.exit_code == 2 and wrong.stderr.startswith("Error: --kohya-strict applies only to -f a1111")


def test_a_base_with_the_same_vocabulary_and_other_weights_is_warned_about(lora_scene, full_scene, tiny_model, tmp_path):
    """A fine-tune of the base (its configs and token table, other weights) passed the
    fingerprint check silently: a LoRA scene's adapters went onto it, and a fully tuned
    scene's LoRA was its difference to it. Scenes record a print of the base's stored
    weights now, and such a base is warned about."""
    from helpers import tuned_copy

    from scenebreak import GenerateConfig, generate
    from scenebreak.events import Message

    assert load_scene(lora_scene).meta["base_model"]["weights"]
    tuned = tuned_copy(tiny_model, tmp_path / "tuned")

    def warnings(call):
        heard = []
        call(lambda event: heard.append(event.text) if isinstance(event, Message) and event.level == "warning" else None)
        return [text for text in heard if "other weights" in text]

    config = GenerateConfig(steps=1, seed=0)
    assert not warnings(lambda report: generate(lora_scene, "a photo of <asset1>", config, out_dir=tmp_path / "same",
                                                base_model=str(tiny_model), device="cpu", report=report))
    assert warnings(lambda report: generate(lora_scene, "a photo of <asset1>", config, out_dir=tmp_path / "other",
                                            base_model=str(tuned), device="cpu", report=report))
    assert warnings(lambda report: export(full_scene, tmp_path / "a1111", "a1111", base_model=str(tuned), report=report))
    assert warnings(lambda report: export(lora_scene, tmp_path / "diffusers", "diffusers", base_model=str(tuned),
                                          report=report))
