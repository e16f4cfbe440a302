"""`export -f a1111` on FLUX.1: the LoRA in the layout kohya's FLUX LoRA has (BFL's module
names, q/k/v fused), which ComfyUI, Forge, kohya and diffusers' `load_lora_weights` all
load, and the embeddings in ComfyUI's layout plus CLIP-only copies for Forge. Loaded back
by diffusers' own code onto the tiny FLUX base, the LoRA must give the scene's transformer
and CLIP weights: exactly for a LoRA scene, and at full rank for a fully tuned one."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import learn_once, craft, set_meta
from scenebreak import LearnConfig, load_scene
from scenebreak.errors import BundleError
from scenebreak.exports.export import export
from scenebreak.exports.kohya import LoraLayer, carried

FEW = dict(steps1=1, steps2=2, prior=False)
DOUBLE = 19, 38  # FLUX.1's double- and single-stream blocks


@pytest.fixture(scope="module")
def flux_base(tmp_path_factory):
    from tinymodels import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux-export") / "tiny-flux-dev")


@pytest.fixture(scope="module")
def lora_scene(tmp_path_factory, flux_base):
    """Adapters trained hard enough (lr 1e-2) to move every adapted weight."""
    return learn_once(tmp_path_factory.mktemp("flux-lora"), flux_base,
                       LearnConfig(**FEW, tune="lora", rank=4, lr_lora=1e-2)).path


@pytest.fixture(scope="module")
def full_scene(tmp_path_factory, flux_base):
    return learn_once(tmp_path_factory.mktemp("flux-full"), flux_base,
                       LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32")).path


# -- loading as diffusers does -----------------------------------------------------------------------

def tiny_width_converter(width: int):
    """diffusers' kohya FLUX converter with the one width it spells out, FLUX.1's split of
    the single-stream blocks' linear1 (3072, 3072, 3072, 12288), set to the tiny model's
    (it cannot load any FLUX of another width). Everything else is its own code."""
    from diffusers.loaders import lora_conversion_utils

    widths, swapped = {3072: width, 12288: 4 * width}, []

    def swap(code):
        consts = []
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                const = swap(const)
            elif isinstance(const, tuple) and const and all(type(c) is int and c in widths for c in const):
                swapped.append(const)
                const = tuple(widths[c] for c in const)
            consts.append(const)
        return code.replace(co_consts=tuple(consts))

    original = lora_conversion_utils._convert_kohya_flux_lora_to_diffusers
    converter = types.FunctionType(swap(original.__code__), original.__globals__, original.__name__,
                                   original.__defaults__, original.__closure__)
    assert swapped == [(3072, 3072, 3072, 12288)], swapped  # diffusers changed: look again
    return converter


def with_lora(base_folder, lora_path, monkeypatch):
    """The base FluxPipeline with the exported LoRA loaded by `load_lora_weights` and fused."""
    import diffusers.loaders.lora_pipeline
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(base_folder, dtype=torch.float32)
    config = pipe.transformer.config
    monkeypatch.setattr(diffusers.loaders.lora_pipeline, "_convert_kohya_flux_lora_to_diffusers",
                        tiny_width_converter(config.num_attention_heads * config.attention_head_dim))
    pipe.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    pipe.fuse_lora(components=["transformer", "text_encoder"])  # FLUX's default fuses the transformer alone
    pipe.unload_lora_weights()  # keeps the fused weights, plain layers again
    return pipe


def scene_models(path):
    """The scene's own transformer and text encoders, in fp32 (a LoRA scene's merged)."""
    from scenebreak.device import choose_device
    from scenebreak.sample.scene_models import scene_components

    transformer, _, text_encoders, _ = scene_components(load_scene(path), choose_device("cpu"), dtype=torch.float32)
    return transformer, text_encoders


def worst(a: dict, b: dict, keys) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in keys)


# -- round trips -------------------------------------------------------------------------------------

def test_a_lora_scene_loads_in_diffusers_as_the_scene_exactly(lora_scene, flux_base, tmp_path, monkeypatch):
    result = export(lora_scene, tmp_path / "a1111", "a1111")
    assert result.lora.source == "adapters"
    pipe = with_lora(flux_base, result.paths[0], monkeypatch)
    transformer, (clip, _) = scene_models(lora_scene)
    ours, theirs = transformer.state_dict(), pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys() and worst(ours, theirs, ours) < 1e-5
    clip_ours, clip_theirs = clip.state_dict(), pipe.text_encoder.state_dict()
    layers = [k for k in clip_ours if ".layers." in k]
    assert worst(clip_ours, clip_theirs, layers) < 1e-5
    # ...and the LoRA matters: the base is far from the scene in the fused layers.
    from scenebreak.families.base_model import load_components

    base = load_components(str(flux_base)).denoiser.state_dict()
    for key in ("transformer_blocks.0.attn.add_k_proj.weight", "single_transformer_blocks.0.attn.to_v.weight"):
        assert float((ours[key] - base[key]).abs().max()) > 1e-3 and float((theirs[key] - ours[key]).abs().max()) < 1e-5


def test_a_full_scene_at_full_rank_loads_in_diffusers_as_its_blocks(full_scene, flux_base, tmp_path, monkeypatch):
    """Rank 64 is full rank for the tiny FLUX: base + LoRA is the scene in every layer the
    file carries (the blocks' linear layers, the modulations and single-stream MLPs too),
    and the base in the rest, which the report counts as left out."""
    result = export(full_scene, tmp_path / "a1111", "a1111")
    report = result.lora
    assert report.source == "svd" and report.kept > 0.9999 and report.worst[1] > 0.9999
    assert 0 < report.left_out < 1 and set(report.left_out_parts) <= {"biases", "norms", "other layers"}
    state = load_file(result.paths[0])
    assert {"lora_unet_double_blocks_0_img_mod_lin.alpha", "lora_unet_single_blocks_0_linear2.alpha",
            "lora_unet_single_blocks_0_modulation_lin.alpha"} <= state.keys()
    pipe = with_lora(flux_base, result.paths[0], monkeypatch)
    transformer, (clip, t5) = scene_models(full_scene)
    from scenebreak.families.base_model import load_components

    base = load_components(str(flux_base))
    ours, theirs, before = transformer.state_dict(), pipe.transformer.state_dict(), base.denoiser.state_dict()
    kept = [k for k, v in ours.items() if carried("transformer", k, v, bfl="transformer")]
    assert len(kept) == 14 + 6  # the double block's linear layers (q/k/v twice, 8 more), the single block's
    assert worst(ours, theirs, kept) < 1e-5
    assert worst(before, theirs, [k for k in ours if k not in kept]) == 0.0
    assert worst(ours, before, kept) > 1e-4  # it did learn
    clip_layers = [k for k, v in clip.state_dict().items() if carried("text_encoder", k, v)]
    assert worst(clip.state_dict(), pipe.text_encoder.state_dict(), clip_layers) < 1e-5
    # T5, which full tuning changes (a LoRA scene leaves it frozen), as kohya's FLUX LoRA
    # names it: lora_te3_ and T5's module, the names ComfyUI and Forge map onto T5
    # ("lora_te3_" + the key, "." as "_"). diffusers skips them, so they are checked by
    # kohya's formula: base + alpha / rank * up @ down is the scene's weight.
    t5_before = base.text_encoders[1].state_dict()
    t5_layers = [k for k, v in t5.state_dict().items() if carried("text_encoder_2", k, v)]
    assert t5_layers and all(".SelfAttention." in k or ".DenseReluDense." in k for k in t5_layers)
    assert worst(t5.state_dict(), t5_before, t5_layers) > 1e-4  # full tuning changed them
    for key in t5_layers:
        name = "lora_te3_" + key.removesuffix(".weight").replace(".", "_")
        down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
        merged = t5_before[key].float() + float(state[f"{name}.alpha"]) / down.shape[0] * (up @ down)
        assert float((merged - t5.state_dict()[key].float()).abs().max()) < 1e-5, key
    readme = (tmp_path / "a1111" / "README.md").read_text()
    assert "T5's (`lora_te3_`) too; diffusers' `load_lora_weights` skips T5's layers" in readme


# -- the names -----------------------------------------------------------------------------------------

def kohya_flux_names(double: int, single: int) -> set[str]:
    """What kohya's FLUX LoRA (sd-scripts networks/lora_flux.py) names: "lora_unet_" and,
    `.` as `_`, every Linear inside BFL's DoubleStreamBlock (img_/txt_: attn.qkv,
    attn.proj, mlp.0, mlp.2, mod.lin) and SingleStreamBlock (linear1, linear2,
    modulation.lin), as BFL's flux/model.py names them."""
    names = {f"double_blocks.{i}.{side}_{layer}" for i in range(double) for side in ("img", "txt")
             for layer in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2", "mod.lin")}
    names |= {f"single_blocks.{i}.{layer}" for i in range(single) for layer in ("linear1", "linear2", "modulation.lin")}
    return {"lora_unet_" + name.replace(".", "_") for name in names}


def test_on_flux1_devs_own_layout_the_keys_are_kohyas_and_diffusers_reads_each_adapter_back():
    """On the real FLUX.1-dev transformer (built on the meta device): a LoRA on the
    scene's targets gets kohya's names, and diffusers' own converter (at FLUX.1's widths,
    unchanged) turns every fused layer back into exactly the adapters it came from (the
    single blocks' proj_mlp, never trained, into zeros), their scale alpha / rank kept."""
    import peft
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from peft.tuners.tuners_utils import check_target_module_exists
    from tinymodels import flux_dev_configs

    from scenebreak.families import family_named
    from scenebreak.families.flux import LORA_TARGETS
    from scenebreak.exports.kohya import kohya_state_dict

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**flux_dev_configs()["transformer"])
    config = peft.LoraConfig(r=2, lora_alpha=1, target_modules=LORA_TARGETS)
    modules = {name: module for name, module in transformer.named_modules()
               if isinstance(module, torch.nn.Linear) and check_target_module_exists(config, name)}
    assert len(modules) == 12 * DOUBLE[0] + 3 * DOUBLE[1]
    generator = torch.Generator().manual_seed(0)
    layers = {f"transformer.{name}": LoraLayer(torch.randn(2, m.in_features, generator=generator),
                                               torch.randn(m.out_features, 2, generator=generator), 1.0)
              for name, m in modules.items()}
    state = kohya_state_dict(layers, family_named("FLUX.1 dev"))
    names = {key.split(".")[0] for key in state}
    everything = kohya_flux_names(*DOUBLE)
    assert names <= everything
    assert names == {n for n in everything if n.endswith(("_qkv", "_attn_proj", "_mlp_0", "_mlp_2", "_linear1"))}
    assert {k.split(".", 1)[1] for k in state} == {"lora_down.weight", "lora_up.weight", "alpha"}

    back = FluxPipeline.lora_state_dict(dict(state))
    assert {k.rsplit(".", 2)[0] for k in back} == set(layers) | {
        f"transformer.single_transformer_blocks.{i}.proj_mlp" for i in range(DOUBLE[1])}
    for path, layer in layers.items():  # the same linear map: compared on random vectors, not 12288 x 3072 products
        a, b = back[f"{path}.lora_A.weight"], back[f"{path}.lora_B.weight"]
        probe = torch.randn(a.shape[1], 3, generator=generator)
        assert torch.allclose(b @ (a @ probe), layer.up @ (layer.down @ probe) * (layer.alpha / 2), atol=1e-4), path
    assert all(not back[f"transformer.single_transformer_blocks.{i}.proj_mlp.lora_B.weight"].any()
               for i in range(DOUBLE[1]))


def test_fused_parts_keep_their_own_scale_and_hostile_layers_are_refused():
    """Parts of different ranks and scales, a part missing: each part's change survives
    the fusion exactly (not kohya's split_qkv alpha, which loaders divide by the fused
    rank); a layer kohya's FLUX LoRA cannot name, a part twice or of the wrong shape is a
    BundleError."""
    from scenebreak.exports.kohya import bfl_layers

    generator = torch.Generator().manual_seed(1)

    def layer(out, rank, alpha, width=8):
        return LoraLayer(torch.randn(rank, width, generator=generator), torch.randn(out, rank, generator=generator), alpha)

    parts = {"transformer.single_transformer_blocks.2.attn.to_q": layer(8, 2, 1.0),
             "transformer.single_transformer_blocks.2.attn.to_v": layer(8, 3, 6.0),
             "transformer.single_transformer_blocks.2.proj_mlp": layer(32, 1, 1.0),
             "text_encoder.text_model.encoder.layers.0.mlp.fc1": layer(16, 2, 2.0)}
    fused = bfl_layers(parts, "transformer")
    assert fused["text_encoder.text_model.encoder.layers.0.mlp.fc1"] is parts[
        "text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    linear1 = fused["transformer.single_blocks.2.linear1"]
    assert linear1.down.shape == (12, 8) and linear1.up.shape == (56, 12)  # 4 parts of rank 3; rows q, k, v, mlp
    delta = linear1.up @ linear1.down * (linear1.alpha / 12)

    def change(name):
        part = parts[f"transformer.single_transformer_blocks.2.{name}"]
        return part.up @ part.down * (part.alpha / part.down.shape[0])

    assert torch.allclose(delta[:8], change("attn.to_q"), atol=1e-5)
    assert not delta[8:16].any()  # to_k not trained
    assert torch.allclose(delta[16:24], change("attn.to_v"), atol=1e-5)
    assert torch.allclose(delta[24:], change("proj_mlp"), atol=1e-5)

    same = bfl_layers({f"transformer.transformer_blocks.0.attn.{p}": layer(8, 4, 2.0) for p in ("to_q", "to_k")},
                      "transformer")["transformer.double_blocks.0.img_attn.qkv"]
    assert same.alpha == 12 * 0.5 and same.down.shape == (12, 8)  # one scale: kept, times the fused rank

    for bad, message in [({"transformer.x_embedder": layer(8, 2, 1.0)}, "cannot name"),
                         ({"transformer.transformer_blocks.0.attn.to_q": layer(8, 2, 1.0),
                           "transformer.transformer_blocks.00.attn.to_q": layer(8, 2, 1.0)}, "twice"),
                         ({"transformer.transformer_blocks.0.attn.to_q": layer(9, 2, 1.0)}, "do not fit"),
                         ({"transformer.transformer_blocks.0.attn.to_q": LoraLayer(torch.zeros(()), torch.zeros(()), 1.0)},
                          "do not fit")]:
        with pytest.raises(BundleError, match=message):
            bfl_layers(bad, "transformer")


# -- what the tools read: metadata, card, embeddings, README ------------------------------------------

def forge_sd_version(meta: dict) -> str:
    """Forge's NetworkOnDisk.detect_version (extensions-builtin/sd_forge_lora/network.py)."""
    if meta.get("modelspec.implementation") == "https://github.com/black-forest-labs/flux" or \
            meta.get("modelspec.architecture") == "flux-1-dev/lora":
        return "Flux"
    if meta.get("modelspec.architecture") == "stable-diffusion-xl-v1-base/lora" or \
            str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    return "SD2" if str(meta.get("ss_v2", "")) == "True" else "Unknown"


def forge_embedding_width(data: dict) -> int:
    """What Forge's create_embedding_from_data (backend/text_processing/textual_inversion.py)
    makes of a file with neither string_to_param nor SDXL's clip_g: one key, or an error."""
    assert len(data) == 1, "embedding file has multiple terms in it"
    return next(iter(data.values())).shape[-1]


@pytest.mark.parametrize("member, architecture", [("FLUX.1 dev", "flux-1-dev/lora"),
                                                  ("FLUX.1 schnell", "flux-1-schnell/lora")])
def test_the_files_say_flux_as_kohya_and_forge_read_it(lora_scene, tmp_path, member, architecture):
    scene_path = craft(lora_scene, tmp_path / "photo.scene", meta=set_meta("base_model.family", member))
    result = export(scene_path, tmp_path / "a1111", "a1111")
    with safe_open(str(result.paths[0]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == architecture
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_v2"] == "False"
    assert "modelspec.prediction_type" not in meta  # a flow model: kohya writes none for FLUX
    assert meta["ss_network_dim"] == "4" and meta["modelspec.trigger_phrase"] == "photo-asset1, photo-asset2"
    card = json.loads(result.paths[1].read_text())
    assert forge_sd_version(meta) == card["sd version"] == "Flux"  # Forge's SdVersion.Flux
    assert str(tmp_path) not in json.dumps(meta) + json.dumps(card)

    scene = load_scene(scene_path)
    names = [p.relative_to(tmp_path / "a1111").as_posix() for p in result.paths]
    assert names == ["loras/photo-lora.safetensors", "loras/photo-lora.json", "embeddings/photo-asset1.safetensors",
                     "embeddings/photo-asset2.safetensors", "embeddings-forge/photo-asset1.safetensors",
                     "embeddings-forge/photo-asset2.safetensors", "README.md"]
    comfy, forge = load_file(result.paths[2]), load_file(result.paths[4])
    assert set(comfy) == {"clip_l", "t5xxl"}  # ComfyUI's keys for FLUX's CLIP-L and T5-XXL
    assert torch.equal(comfy["clip_l"], scene.embeddings[:1].float())
    assert torch.equal(comfy["t5xxl"], scene.embeddings_2[:1].float())
    assert list(forge) == ["clip_l"] and torch.equal(forge["clip_l"], comfy["clip_l"])
    assert forge_embedding_width(forge) == scene.embeddings.shape[1]
    with pytest.raises(AssertionError, match="multiple terms"):
        forge_embedding_width(comfy)

    readme = result.paths[-1].read_text()
    assert "AUTOMATIC1111 / Forge" not in readme and "for Forge and ComfyUI" in readme
    for text in ("ComfyUI takes both", "Forge takes CLIP-L embeddings only", "AUTOMATIC1111 has no FLUX.1",
                 "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2", "embeddings-forge/", "CFG 1",
                 "--dim_from_weights", "<lora:photo-lora:1>", "embedding:photo-asset1"):
        assert text in readme, text
    assert ("guidance 3.5" in readme) == (member == "FLUX.1 dev")


def test_diffusers_loads_both_rows_of_an_embedding(lora_scene, flux_base, tmp_path):
    """The README's diffusers recipe: each row into its encoder, the trigger then one token
    in both vocabularies with the scene's rows."""
    from diffusers import FluxPipeline

    result = export(lora_scene, tmp_path / "a1111", "a1111")
    scene = load_scene(lora_scene)
    pipe = FluxPipeline.from_pretrained(flux_base, dtype=torch.float32)
    for i, path in enumerate(p for p in result.paths if p.parent.name == "embeddings"):
        rows = load_file(path)
        pipe.load_textual_inversion(rows["clip_l"], token=path.stem, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(rows["t5xxl"], token=path.stem, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
        for tokenizer, encoder, table in ((pipe.tokenizer, pipe.text_encoder, scene.embeddings),
                                          (pipe.tokenizer_2, pipe.text_encoder_2, scene.embeddings_2)):
            ids = tokenizer(path.stem, add_special_tokens=False).input_ids
            assert len(ids) == 1 and torch.equal(encoder.get_input_embeddings().weight[ids[0]], table[i].float())
