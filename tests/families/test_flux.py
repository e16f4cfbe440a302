"""FLUX.1 as a family: a tiny FLUX.1 dev and schnell built in code (with the real
folders' quirks: CLIP's legacy eos_token_id 2, and a T5 table with more rows than its
tokenizer has tokens) load in FluxPipeline; the family recognises them from their
configs alone, refuses the variants it cannot train in one line, and conditions,
packs and positions exactly as FluxPipeline does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from scenebreak.errors import InvalidInput
from scenebreak.families import pool_at_end_of_text
from scenebreak.families.flux import (FLUX_DEV, FLUX_SCHNELL, Flux, denormalise_latents, guidance_input, image_ids,
                                      normalise_latents, pack_latents, text_ids, unpack_latents)
from scenebreak.train.tokens import add_handles

CONFIG_FILES = ["model_index.json", "transformer/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                "vae/config.json", "scheduler/scheduler_config.json"]


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    from tinymodels import build_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {variant: build_tiny_flux(root / variant, variant=variant) for variant in ("dev", "schnell")}


def load_pipeline(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder)


def tokenize(family, tokenizers, prompt):
    return [tok(prompt, padding="max_length", max_length=family.tokenizer_class(name)[1], truncation=True,
                return_tensors="pt").input_ids for tok, name in zip(tokenizers, family.tokenizers)]


def configs_only(source, target, edits=None, drop=()):
    """A copy of a FLUX folder's configs and no weights, with `edits` {file: {key: value}}."""
    for name in CONFIG_FILES:
        if name in drop:
            continue
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        config = json.loads((source / name).read_text())
        config.update((edits or {}).get(name, {}))
        (target / name).write_text(json.dumps(config))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(source / name, target / name)
    return target


# -- the tiny model ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_the_tiny_flux_loads_in_flux_pipeline_with_the_real_quirks_and_samples(flux_folders, variant):
    pipe = load_pipeline(flux_folders[variant])
    assert pipe.transformer.config.guidance_embeds == (variant == "dev")
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert pipe.transformer.config.in_channels == 4 * pipe.vae.config.latent_channels == 64
    assert sum(pipe.transformer.config.axes_dims_rope) == pipe.transformer.config.attention_head_dim
    # The quirks: 28 T5 rows no token reaches (32128 for 32100), CLIP's legacy end of text.
    assert pipe.text_encoder_2.get_input_embeddings().weight.shape[0] == len(pipe.tokenizer_2) + 28
    assert pipe.text_encoder.config.eos_token_id == 2 != pipe.tokenizer.eos_token_id
    assert pipe.tokenizer_2.model_max_length == {"dev": 512, "schnell": 256}[variant]
    assert pipe.tokenizer_2("a photo").input_ids[-1] == pipe.tokenizer_2.eos_token_id == 1
    assert pipe.scheduler.config.use_dynamic_shifting == (variant == "dev")
    assert pipe.scheduler.config.shift == {"dev": 3.0, "schnell": 1.0}[variant]

    image = pipe("a photo of a red bowl", height=64, width=64, num_inference_steps=1, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_the_tiny_vae_gives_latents_of_zero_mean_and_unit_variance(flux_folders):
    """Calibrated (shift and scale) on one random image, checked on others and on a photo."""
    pipe = load_pipeline(flux_folders["dev"])
    photo = torch.full((1, 3, 64, 64), 0.8)
    photo[:, :, 8:32, 8:32] = torch.tensor([0.7, -0.8, -0.8])[:, None, None]
    noise = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        for pixels in (noise, photo):
            posterior = pipe.vae.encode(pixels).latent_dist
            latents = normalise_latents(posterior.mean, pipe.vae.config)
            assert abs(latents.mean().item()) < 0.2 and 0.5 < latents.std().item() < 2.0
            assert posterior.std.max().item() < 0.01  # near-deterministic, as a trained VAE
            assert torch.allclose(denormalise_latents(latents, pipe.vae.config), posterior.mean, atol=1e-5)


# -- which folders are FLUX.1 -----------------------------------------------------------------------------
def test_dev_and_schnell_are_recognised_from_their_configs_alone(flux_folders, tmp_path):
    dev = configs_only(flux_folders["dev"], tmp_path / "dev")
    schnell = configs_only(flux_folders["schnell"], tmp_path / "schnell")
    assert not list(dev.rglob("*.safetensors"))  # no weight needed
    assert Flux.recognise_folder(dev, "it") == Flux(FLUX_DEV)
    assert Flux.recognise_folder(schnell, "it") == Flux(FLUX_SCHNELL)
    # A derivative: the same architecture under another name, sized differently.
    derivative = configs_only(flux_folders["dev"], tmp_path / "derivative",
                              {"transformer/config.json": {"num_layers": 2, "_name_or_path": "someone/flux-finetune"}})
    assert Flux.recognise_folder(derivative, "it") == Flux(FLUX_DEV)
    # A transformer config without the key is built by diffusers without a guidance input.
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    del config["guidance_embeds"]
    (schnell / "transformer" / "config.json").write_text(json.dumps(config))
    assert Flux.recognise_folder(schnell, "it") == Flux(FLUX_SCHNELL)
    # What is not FLUX is left to the other families.
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (sd / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    assert Flux.recognise_folder(sd, "it") is None


@pytest.mark.parametrize("pipeline, transformer, named", [
    ("FluxKontextPipeline", {}, "FLUX.1 Kontext"),
    ("FluxFillPipeline", {"in_channels": 384}, "FLUX.1 Fill"),
    ("FluxPipeline", {"in_channels": 384}, "FLUX.1 Fill"),
    ("FluxControlPipeline", {"in_channels": 128}, "FLUX.1 Depth or Canny"),
    ("FluxPipeline", {"in_channels": 128}, "FLUX.1 Depth or Canny"),
    ("FluxPriorReduxPipeline", None, "FLUX.1 Redux"),
    ("Flux2Pipeline", {"_class_name": "Flux2Transformer2DModel", "in_channels": 128}, "FLUX.2"),
    ("FluxPipeline", {"_class_name": "Flux2Transformer2DModel", "in_channels": 128}, "Flux2Transformer2DModel"),
])
def test_variants_it_cannot_train_are_refused_in_one_line_naming_them(flux_folders, tmp_path, pipeline, transformer,
                                                                     named):
    """From the configs alone (the copies hold no weights): refused before any loads."""
    edits = {"model_index.json": {"_class_name": pipeline}, "transformer/config.json": transformer or {}}
    folder = configs_only(flux_folders["dev"], tmp_path / "variant", edits,
                          drop=("transformer/config.json",) if transformer is None else ())
    with pytest.raises(InvalidInput) as caught:
        Flux.recognise_folder(folder, "the base model x")
    message = str(caught.value)
    assert named in message and message.startswith("the base model x is ") and "\n" not in message
    assert caught.value.exit_code == 2


def test_a_flux_folder_without_its_transformer_config_is_called_incomplete(flux_folders, tmp_path):
    folder = configs_only(flux_folders["dev"], tmp_path / "partial", drop=("transformer/config.json",))
    with pytest.raises(InvalidInput, match="incomplete FLUX.1 folder: it has no transformer/config.json"):
        Flux.recognise_folder(folder, "it")


# -- the family's parts -------------------------------------------------------------------------------------
def test_each_member_names_its_models_tokens_and_sampling_defaults():
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    dev, schnell = Flux(FLUX_DEV), Flux(FLUX_SCHNELL)
    assert dev.text_encoders == ("text_encoder", "text_encoder_2") and dev.tokenizers == ("tokenizer", "tokenizer_2")
    assert dev.text_encoder_class("text_encoder") is CLIPTextModel
    assert dev.text_encoder_class("text_encoder_2") is T5EncoderModel
    assert dev.tokenizer_class("tokenizer") == (CLIPTokenizer, 77)
    assert dev.tokenizer_class("tokenizer_2") == (T5TokenizerFast, 512)
    assert schnell.tokenizer_class("tokenizer_2") == (T5TokenizerFast, 256)
    assert (dev.guidance, dev.sampling_steps, schnell.guidance, schnell.sampling_steps) == (3.5, 28, 0.0, 4)
    assert dev.pipeline_name == "FluxPipeline" and dev.pooled_text and dev.denoiser == "transformer"
    assert (dev.modelspec_architecture, schnell.modelspec_architecture) == ("flux-1-dev", "flux-1-schnell")
    # dev is trained at guidance 1 and sampled at 3.5, per example; schnell embeds none.
    assert torch.equal(dev.training_conditions((40, 30), 64), torch.tensor([1.0, 1.0]))
    assert torch.equal(dev.sampling_conditions((64, 64)), torch.tensor([3.5]))
    assert schnell.training_conditions(None, 64) is None and schnell.sampling_conditions((64, 64)) is None
    from types import SimpleNamespace

    flux_vae = SimpleNamespace(config=SimpleNamespace(sample_size=1024, block_out_channels=[128, 256, 512, 512]))
    assert (dev.native_resolution(None, flux_vae), dev.resolution_step(None, flux_vae)) == (1024, 16)
    rows = [torch.ones(32), torch.full((48,), 2.0)]
    layout = dev.textual_inversion("<asset1>", rows)
    assert {k: tuple(v.shape) for k, v in layout.items()} == {"clip_l": (1, 32), "t5xxl": (1, 48)}
    assert dev.a1111_embedding(rows).keys() == layout.keys()


# -- handles in T5 ----------------------------------------------------------------------------------------
def test_t5_handles_get_fresh_rows_after_the_whole_table(flux_folders, tmp_path):
    """T5's table has 28 rows past its tokenizer (32128 for 32100): resizing to the
    tokenizer's length shrank it, and the handles took rows that were there before."""
    from transformers import T5EncoderModel, T5TokenizerFast

    from scenebreak.train.tokens import install_handle_embedding

    folder = flux_folders["dev"]
    tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    before = t5.get_input_embeddings().weight.detach().clone()
    vocabulary = len(tokenizer)
    assert before.shape[0] == vocabulary + 28

    ids = add_handles(tokenizer, t5, ["<asset1>", "<asset2>"])
    after = t5.get_input_embeddings().weight.detach()
    assert ids == [before.shape[0], before.shape[0] + 1]  # fresh rows, after the existing ones
    assert after.shape[0] == before.shape[0] + 2 == len(tokenizer)
    assert torch.equal(after[: before.shape[0]], before)  # every old row kept exactly
    # Each starts from its base row by the usual rule (vocabulary - 2N + i) ...
    assert torch.equal(after[ids], before[[vocabulary - 4, vocabulary - 3]])
    # ... and a prompt with a handle embeds that handle's row.
    prompt_ids = tokenizer("a photo of <asset2> on the moon", return_tensors="pt").input_ids
    position = prompt_ids[0].tolist().index(ids[1])
    assert torch.equal(t5.get_input_embeddings()(prompt_ids)[0, position], after[ids[1]])
    # The ids survive the tokenizer's files (what a scene stores) ...
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = T5TokenizerFast.from_pretrained(tmp_path / "saved")
    assert reloaded.convert_tokens_to_ids(["<asset1>", "<asset2>"]) == ids
    assert reloaded("a photo of <asset2>").input_ids == tokenizer("a photo of <asset2>").input_ids
    # ... and training sees exactly the handles' rows as the trainable ones.
    module = install_handle_embedding(t5, 2)
    assert module.num_base == before.shape[0] and torch.equal(module.handles.detach(), after[ids])


def test_init_words_start_t5_handles_from_a_piece_of_the_word_not_the_word_boundary(flux_folders):
    """T5 starts a word it has no piece for with a bare "▁" (and may give <unk>): every
    such init word started its handle from that one row."""
    from transformers import T5EncoderModel, T5TokenizerFast

    from scenebreak.errors import InvalidInput

    folder = flux_folders["dev"]
    tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2")
    before = t5.get_input_embeddings().weight.detach().clone()
    pieces = tokenizer.convert_ids_to_tokens(tokenizer("corgi", add_special_tokens=False).input_ids)
    assert pieces[:2] == ["\u2581", "c"]
    ids = add_handles(tokenizer, t5, ["<asset1>", "<asset2>"], init_words=["cat", "corgi"])
    after = t5.get_input_embeddings().weight.detach()
    assert torch.equal(after[ids[0]], before[tokenizer.convert_tokens_to_ids("\u2581cat")])  # a word it has whole
    assert torch.equal(after[ids[1]], before[tokenizer.convert_tokens_to_ids("c")])  # not "▁"'s row
    with pytest.raises(InvalidInput, match="gives no token this model knows"):
        add_handles(T5TokenizerFast.from_pretrained(folder / "tokenizer_2"), t5, ["<b>"], init_words=["\u2603"])


def test_an_init_word_no_tokenizer_knows_is_refused_before_the_base_loads(flux_folders, scene_files, monkeypatch):
    """It was refused once the model had loaded and every class image was made (hours
    of them on a CPU by default): the tokenizers alone settle it."""
    from scenebreak import LearnConfig, learn
    from scenebreak.families import base_model

    monkeypatch.setattr(base_model, "load_components", lambda *a, **k: pytest.fail("the base model loaded"))
    with pytest.raises(InvalidInput, match="--init-words: '\u2603' gives no token this model knows"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(init_words=("\u2603", "red")),
              base_model=str(flux_folders["dev"]), name="snowman")


def test_clip_handles_are_added_as_before(flux_folders):
    """A table as long as its tokenizer (CLIP's) gets no spare-row tokens."""
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = flux_folders["dev"]
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder")
    vocabulary = len(tokenizer)
    assert clip.get_input_embeddings().weight.shape[0] == vocabulary
    assert add_handles(tokenizer, clip, ["<asset1>"]) == [vocabulary]
    assert len(tokenizer) == vocabulary + 1 == clip.get_input_embeddings().weight.shape[0]


# -- conditioning, packing and positions as FluxPipeline's ------------------------------------------------------------
def with_handles(pipe, family):
    """The pipeline's models with <asset1> in both vocabularies, CLIP pooling at the end of text."""
    for tokenizer, encoder in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)):
        add_handles(tokenizer, encoder, ["<asset1>"])
    pool_at_end_of_text(pipe.text_encoder, pipe.tokenizer)
    return family.pipeline(pipe.transformer, pipe.vae, [pipe.text_encoder, pipe.text_encoder_2],
                           [pipe.tokenizer, pipe.tokenizer_2], pipe.scheduler)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_conditioning_equals_flux_pipeline_encode_prompt_with_and_without_a_handle(flux_folders, variant):
    family = Flux(FLUX_DEV if variant == "dev" else FLUX_SCHNELL)
    pipe = with_handles(load_pipeline(flux_folders[variant]), family)
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    for prompt in ("a photo of a red bowl", "a photo of <asset1> at the beach"):
        ids = tokenize(family, tokenizers, prompt)
        with torch.no_grad():
            hidden, added = family.encode_prompts(encoders, ids, family.sampling_conditions((64, 64)))
            expected, pooled, expected_ids = pipe.encode_prompt(prompt, device="cpu",
                                                                max_sequence_length=family.text_tokens)
            piped, piped_added = family.pipeline_conditioning(pipe, prompt, 2, False, None, (64, 64))
        assert hidden.shape == (1, family.text_tokens, pipe.transformer.config.joint_attention_dim)
        assert torch.equal(hidden, expected) and torch.equal(added["pooled_projections"], pooled)
        assert torch.equal(added["txt_ids"], expected_ids)
        assert torch.equal(piped, expected.repeat(2, 1, 1)) and torch.equal(piped_added["txt_ids"], expected_ids)
        assert torch.equal(piped_added["pooled_projections"], pooled.repeat(2, 1))
    with torch.no_grad():  # edit's --guidance reaches the transformer, as generate's guidance_scale does
        asked = family.pipeline_conditioning(pipe, prompt, 2, False, None, (64, 64), embedded_guidance=5.0)[1]["guidance"]
    if variant == "dev":
        assert torch.equal(added["guidance"], torch.tensor([3.5])) and torch.equal(piped_added["guidance"],
                                                                                   torch.tensor([3.5, 3.5]))
        assert torch.equal(asked, torch.tensor([5.0, 5.0]))
    else:
        assert added["guidance"] is None and piped_added["guidance"] is None and asked is None
    # Edits work at the pipeline's pixel multiple: 2x2 latent patches make it twice the VAE's.
    assert pipe.image_processor.config.vae_scale_factor == 2 * pipe.vae_scale_factor
    with torch.no_grad():
        cfg, cfg_added = family.pipeline_conditioning(pipe, prompt, 1, True, "blurry", (64, 64))
        uncond = pipe.encode_prompt("blurry", device="cpu", max_sequence_length=family.text_tokens)[0]
    assert torch.equal(cfg, torch.cat([uncond, expected])) and cfg_added["pooled_projections"].shape[0] == 2


def test_the_pooled_vector_is_taken_at_the_end_of_text_not_at_a_handle(flux_folders):
    """The tiny CLIP's config says eos_token_id 2, as FLUX's real one does: transformers
    then pools at the largest id, the handle, and the words after it never reach the
    pooled vector."""
    family = Flux(FLUX_DEV)
    pipe = load_pipeline(flux_folders["dev"])
    for tokenizer, encoder in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2)):
        add_handles(tokenizer, encoder, ["<asset1>"])
    encoders, tokenizers = [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2]
    beach, snow = (tokenize(family, tokenizers, f"a photo of <asset1> {where}")
                   for where in ("at the beach", "in the snow"))

    def pooled(ids):
        with torch.no_grad():
            return family.encode_prompts(encoders, ids)[1]["pooled_projections"]

    assert torch.equal(pooled(beach), pooled(snow))  # the quirk, as loaded
    pool_at_end_of_text(pipe.text_encoder, pipe.tokenizer)
    assert not torch.allclose(pooled(beach), pooled(snow))
    end = beach[0][0].tolist().index(pipe.tokenizer.eos_token_id)
    with torch.no_grad():
        states = pipe.text_encoder(beach[0]).last_hidden_state
    assert torch.allclose(pooled(beach)[0], states[0, end])


def test_packing_positions_and_guidance_equal_what_flux_pipeline_gives_its_transformer(flux_folders):
    """The transformer's inputs of one pipeline step, captured, against the helpers: the
    packed noise, image and text positions, the guidance, and the timestep, which the
    transformer takes divided by 1000 (the flow's sigma)."""
    from diffusers import FluxPipeline

    family = Flux(FLUX_DEV)
    pipe = load_pipeline(flux_folders["dev"])
    seen = {}
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    pipe("a photo of a red bowl", height=64, width=96, num_inference_steps=1, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 16, 32, 48, generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["hidden_states"], pack_latents(noise))
    assert torch.equal(pack_latents(noise), FluxPipeline._pack_latents(noise, 1, 16, 32, 48))
    assert torch.equal(unpack_latents(pack_latents(noise), (32, 48)), noise)
    assert torch.equal(unpack_latents(pack_latents(noise), (32, 48)),
                       FluxPipeline._unpack_latents(pack_latents(noise), 64, 96, pipe.vae_scale_factor))
    assert torch.equal(seen["img_ids"], image_ids((32, 48)))
    assert torch.equal(image_ids((32, 48)), FluxPipeline._prepare_latent_image_ids(1, 16, 24, "cpu", torch.float32))
    assert torch.equal(seen["txt_ids"], text_ids(family.text_tokens))
    assert torch.equal(seen["guidance"], guidance_input(pipe.transformer.config, 3.5, 1))
    assert torch.equal(seen["timestep"], pipe.scheduler.timesteps[:1] / 1000)
    assert guidance_input(load_pipeline(flux_folders["schnell"]).transformer.config, 3.5, 1) is None


def test_latents_reach_the_vae_denormalised_as_the_helpers_do(flux_folders):
    pipe = load_pipeline(flux_folders["dev"])
    latents = pipe("a photo", height=64, width=64, num_inference_steps=1, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    decoded, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, **kwargs: decoded.append(z) or decode(z, **kwargs)
    pipe("a photo", height=64, width=64, num_inference_steps=1, output_type="np",
         generator=torch.Generator().manual_seed(0))
    assert torch.equal(decoded[0], denormalise_latents(unpack_latents(latents, (32, 32)), pipe.vae.config))
