"""SDXL as a base model: a tiny SDXL built in code goes through the real loading code
and every command (learn, generate, --variations, edit, extract-bg, export, show,
--resume), offline on the CPU."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner
from PIL import Image

from scenebreak import EditConfig, GenerateConfig, LearnConfig, edit, generate, learn, load_scene
from scenebreak.cli.commands import cli


def test_the_family_and_both_text_encoders_are_read_from_the_folder(tiny_sdxl):
    from transformers import CLIPTextModelWithProjection

    from scenebreak.families import detect_family
    from scenebreak.families.base_model import load_components, parameter_counts

    family = detect_family(tiny_sdxl, "it")
    assert family.name == "SDXL" and family.text_encoders == ("text_encoder", "text_encoder_2") and family.guidance == 5.0
    c = load_components(str(tiny_sdxl))
    assert c.family == family and c.native_resolution == 256 and len(c.tokenizers) == 2
    assert isinstance(c.text_encoders[1], CLIPTextModelWithProjection)
    assert [te.config.hidden_size for te in c.text_encoders] == [32, 48]
    assert parameter_counts(tiny_sdxl, c.family)["text_encoders"] == sum(p.numel() for te in c.text_encoders
                                                                         for p in te.parameters())


def test_training_conditions_the_unet_exactly_as_the_sdxl_pipeline_does(tiny_sdxl):
    """Penultimate hidden states of both encoders side by side, the second's pooled
    projection, and the six size/crop ids in the pipeline's order."""
    from scenebreak.families.sdxl import time_ids
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.pipeline import make_pipeline

    c = load_components(str(tiny_sdxl))
    pipe = make_pipeline(c.family, c.denoiser, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config)
    prompt = "a photo of a red bowl"
    ids = [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
           for tok in c.tokenizers]
    with torch.no_grad():
        hidden, added = c.family.encode_prompts(c.text_encoders, ids, time_ids((300, 200), (256, 256)))
        expected, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                    do_classifier_free_guidance=False)
    projection = c.text_encoders[1].config.projection_dim
    pipeline_ids = pipe._get_add_time_ids((300, 200), (0, 0), (256, 256), torch.float32, text_encoder_projection_dim=projection)
    assert hidden.shape[-1] == c.denoiser.config.cross_attention_dim == 80
    assert torch.allclose(hidden, expected) and torch.allclose(added["text_embeds"], pooled)
    assert torch.equal(added["time_ids"], pipeline_ids)


BEACH, SNOW = "a photo of <asset1> at the beach", "a photo of <asset1> in the snow"


def _pooled(pipe, prompt: str):
    with torch.no_grad():
        return pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[2]


def test_the_pooled_prompt_is_taken_at_the_end_of_text_not_at_a_handle(learned_sdxl, tiny_sdxl, tmp_path):
    """The real SDXL configs say eos_token_id 2 (so does the tiny one), with which
    transformers pools at the largest id: the handle. Every path must pool at the
    end of text, so that the words after a handle reach the pooled vector."""
    import json

    from diffusers import StableDiffusionXLPipeline

    from scenebreak.device import choose_device
    from scenebreak.exports.export import export_scene
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.pipeline import make_pipeline
    from scenebreak.sample.scene_models import scene_components
    from scenebreak.train.tokens import add_handles

    assert json.loads((tiny_sdxl / "text_encoder_2" / "config.json").read_text())["eos_token_id"] == 2
    # Training: the conditioning the trainer builds.
    c = load_components(str(tiny_sdxl))
    for tok, te in zip(c.tokenizers, c.text_encoders):
        add_handles(tok, te, ["<asset1>"], None)
    pooled = []
    for prompt in (BEACH, SNOW):
        ids = [tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
               for tok in c.tokenizers]
        with torch.no_grad():
            pooled.append(c.family.encode_prompts(c.text_encoders, ids, c.family.sampling_conditions((256, 256)))[1]["text_embeds"])
    assert not torch.allclose(*pooled)
    # Sampling, from a scene whose recorded configs still carry the legacy id.
    scene = load_scene(learned_sdxl.path, weights=True)
    for name in ("text_encoder", "text_encoder_2"):
        scene.meta["configs"][name]["eos_token_id"] = 2
    unet, vae, encoders, tokenizers = scene_components(scene, choose_device("cpu"))
    pipe = make_pipeline(scene.family, unet, vae, encoders, tokenizers, scene.meta["configs"]["scheduler"])
    sampled = [_pooled(pipe, prompt) for prompt in (BEACH, SNOW)]
    assert not torch.allclose(*sampled)
    # The exported folder, loaded by diffusers alone.
    [folder] = export_scene(learned_sdxl.path, tmp_path / "pipe", "diffusers")
    exported = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    for name in ("text_encoder", "text_encoder_2"):
        eos = json.loads((folder / name / "config.json").read_text())["eos_token_id"]
        assert eos == exported.tokenizer.eos_token_id != 2
    loaded = [_pooled(exported, prompt) for prompt in (BEACH, SNOW)]
    assert not torch.allclose(*loaded)
    assert torch.allclose(loaded[0], sampled[0], atol=1e-2)  # the folder stores fp16 weights


def test_an_sdxl_scene_learned_with_the_old_pooling_says_to_learn_it_again(learned_sdxl, tmp_path):
    from helpers import craft

    from scenebreak.events import Message

    old = craft(learned_sdxl.path, tmp_path / "old.scene", meta=lambda meta: {k: v for k, v in meta.items() if k != "pooled_at"})
    for path, warned in ((old, True), (learned_sdxl.path, False)):
        messages = []
        generate(path, "<asset1>", GenerateConfig(steps=1, seed=0), out_dir=tmp_path, report=messages.append)
        said = [m.text for m in messages if isinstance(m, Message) and m.level == "warning"]
        assert any("learn it again" in text for text in said) == warned, said


def test_prompts_without_handles_pool_exactly_as_before(tiny_sdxl):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from scenebreak.families.base_model import load_components

    c = load_components(str(tiny_sdxl))
    legacy = [CLIPTextModel.from_pretrained(tiny_sdxl / "text_encoder"),
              CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2")]
    for tok, fixed, old in zip(c.tokenizers, c.text_encoders, legacy):
        ids = tok(["a photo of a red bowl", "", "snow " * 90], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            assert torch.equal(fixed(ids)[0], old(ids)[0])


def test_learn_trains_a_row_per_handle_in_both_tables(learned_sdxl, tiny_sdxl):
    from scenebreak.scenes.bundle import read_metadata
    from scenebreak.families.base_model import load_components

    scene = load_scene(learned_sdxl.path, weights=True)
    meta = read_metadata(learned_sdxl.path)
    assert meta["format_version"] == 2 and meta["base_model"]["family"] == "SDXL" and scene.resolution == 256
    assert scene.embeddings.shape == (3, 32) and scene.embeddings_2.shape == (3, 48)
    assert set(scene.weights) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    assert {"tokenizer", "tokenizer_2"} == {name.partition("/")[0] for name in scene.files}
    assert set(meta["configs"]) >= {"text_encoder", "text_encoder_2"}
    # Both tables started from the same rule (rows V - 2N + i of each) and both moved.
    base = load_components(str(tiny_sdxl))
    for rows, te, tok in zip(scene.handle_embeddings, base.text_encoders, base.tokenizers):
        start = te.get_input_embeddings().weight[len(tok) - 6: len(tok) - 3]
        assert not torch.allclose(rows.float(), start.float(), atol=1e-6)
    assert np.isfinite(learned_sdxl.losses["phase2"]["loss_last"])


def test_the_handle_rows_start_by_the_same_rule_in_each_tokenizer(tiny_sdxl):
    from scenebreak.families.base_model import load_components
    from scenebreak.train.tokens import add_handles

    c = load_components(str(tiny_sdxl))
    for words in (None, ["cat", "bowl"]):
        c = load_components(str(tiny_sdxl))
        before = [te.get_input_embeddings().weight.detach().clone() for te in c.text_encoders]
        for tok, te, table in zip(c.tokenizers, c.text_encoders, before):
            ids = add_handles(tok, te, ["<a>", "<b>"], words)
            init = [tok(w, add_special_tokens=False).input_ids[0] for w in words] if words else [len(table) - 4, len(table) - 3]
            assert torch.equal(te.get_input_embeddings().weight[ids], table[init])


def test_generate_variations_edit_and_extract_bg_on_sdxl(learned_sdxl, scene_files, tmp_path):
    from scenebreak import extract_background

    images = generate(learned_sdxl.path, "<asset1> on the moon", GenerateConfig(steps=2, seed=1, num_images=2),
                      out_dir=tmp_path / "gen")
    arrays = []
    for image in images.images:
        with Image.open(image.path) as im:
            assert im.size == (256, 256)
            arrays.append(np.asarray(im))
    assert not np.array_equal(*arrays)  # two seeds, two images
    variations = generate(learned_sdxl.path, None, GenerateConfig(steps=2, seed=1), variations=True, out_dir=tmp_path / "var")
    assert "<asset1> and <asset2>" in variations.images[0].prompt
    edited = edit(scene_files["image"], [(scene_files["masks"][0], "a photo of <asset2>")], learned_sdxl.path,
                  EditConfig(steps=4, seed=1), out_dir=tmp_path / "edit")
    with Image.open(edited.images[0].path) as im, Image.open(scene_files["image"]) as source:
        assert im.size == source.size
        # Far from the mask the photo is kept bit for bit.
        assert np.array_equal(np.asarray(im)[70:, :40], np.asarray(source.convert("RGB"))[70:, :40])
        # An empty negative prompt is none, as in generate (SDXL: the unconditional row is zeros).
        blank = edit(scene_files["image"], [(scene_files["masks"][0], "a photo of <asset2>")], learned_sdxl.path,
                     EditConfig(steps=4, seed=1, negative=""), out_dir=tmp_path / "blank")
        with Image.open(blank.images[0].path) as other:
            assert np.array_equal(np.asarray(other), np.asarray(im))
    result = extract_background(learned_sdxl.path, variations=1, out_dir=tmp_path / "bg")
    assert [i.kind for i in result.images] == ["plate", "variation"]


def test_the_sdxl_defaults_are_its_own(learned_sdxl, monkeypatch, tmp_path):
    """generate's guidance defaults to SDXL's 5 (7.5 on SD); the resolution is the scene's."""
    from scenebreak.sample import sampling

    seen = {}
    real = sampling.sample_to_files

    def spy(run, prompts, config, *args, **kwargs):
        seen["guidance"] = config.guidance
        return real(run, prompts, config, *args, **kwargs)

    monkeypatch.setattr("scenebreak.sample.generate.sample_to_files", spy)
    generate(learned_sdxl.path, "<asset1>", GenerateConfig(steps=1, seed=0), out_dir=tmp_path)
    assert seen["guidance"] == 5.0
    generate(learned_sdxl.path, "<asset1>", GenerateConfig(steps=1, seed=0, guidance=3.0), out_dir=tmp_path)
    assert seen["guidance"] == 3.0


def test_both_exports_load_in_diffusers(learned_sdxl, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from scenebreak.exports.export import export_scene

    scene = load_scene(learned_sdxl.path)
    [folder] = export_scene(learned_sdxl.path, tmp_path / "pipe", "diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    for tok, te, rows in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), scene.handle_embeddings):
        ids = tok.convert_tokens_to_ids(scene.tokens)
        assert torch.allclose(te.get_input_embeddings().weight[ids].float(), rows.float(), atol=1e-2)

    files = export_scene(learned_sdxl.path, tmp_path / "emb", "embeddings")
    assert [f.name for f in files] == ["asset1.safetensors", "asset2.safetensors", "background.safetensors"]
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    state = load_file(files[1])
    assert set(state) == {"clip_l", "clip_g"} and state["clip_l"].shape == (1, 32) and state["clip_g"].shape == (1, 48)
    base.load_textual_inversion(state["clip_l"], token="<asset2>", text_encoder=base.text_encoder, tokenizer=base.tokenizer)
    base.load_textual_inversion(state["clip_g"], token="<asset2>", text_encoder=base.text_encoder_2, tokenizer=base.tokenizer_2)
    for tok, te, rows in zip((base.tokenizer, base.tokenizer_2), (base.text_encoder, base.text_encoder_2), scene.handle_embeddings):
        row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids("<asset2>")]
        assert torch.allclose(row, rows[1].float())


def test_a_lora_scene_on_sdxl_generates_on_its_base(scene_files, tiny_sdxl, tmp_path):
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=2, prior=False, tune="lora", rank=2),
                   base_model=str(tiny_sdxl), name="xl-lora")
    scene = load_scene(result.path, weights=True)
    assert scene.needs_base_model and set(scene.weights) == {"unet_lora", "text_encoder_lora", "text_encoder_2_lora"}
    assert scene.weights["text_encoder_2_lora"] and all(".lora_" in k for k in scene.weights["text_encoder_2_lora"])
    out = generate(result.path, "<asset1>", GenerateConfig(steps=2, seed=0), out_dir=tmp_path)
    assert out.images[0].path.exists()


def test_an_interrupted_sdxl_learn_resumes_to_the_same_scene(scene_files, tiny_sdxl, tmp_path):
    from helpers import learn_whole_and_resumed

    config = LearnConfig(steps1=2, steps2=3, prior=False, checkpoint_every=1)
    whole, resumed = learn_whole_and_resumed(scene_files, tiny_sdxl, config)
    a, b = load_scene(whole.path, weights=True), load_scene(resumed.path, weights=True)
    assert torch.equal(a.embeddings_2, b.embeddings_2) and torch.equal(a.embeddings, b.embeddings)
    for key, value in a.weights["text_encoder_2"].items():
        assert torch.equal(value, b.weights["text_encoder_2"][key]), key


def test_the_command_line_as_a_new_user_runs_it(scene_files, tiny_sdxl, tmp_path):
    runner = CliRunner()
    learned = runner.invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                  "--base-model", str(tiny_sdxl), "--steps1", "2", "--steps2", "1", "--no-prior",
                                  "--name", "xl"])
    assert learned.exit_code == 0, learned.output
    assert "tuning: full" in learned.stderr
    shown = runner.invoke(cli, ["show", "xl"])
    assert "(SDXL)" in shown.stdout
    assert "SDXL" in runner.invoke(cli, ["list"]).stdout
    made = runner.invoke(cli, ["generate", "xl", "<asset1> at the beach", "--steps", "2", "--seed", "3",
                               "--out-dir", str(tmp_path / "gen")])
    assert made.exit_code == 0 and made.stdout.strip().endswith(".png"), made.output


def test_a_format_1_scene_from_before_sdxl_still_loads_and_generates(tmp_path):
    from scenebreak.scenes.bundle import read_metadata

    from helpers import DATA

    old = DATA / "format1.scene"
    meta = read_metadata(old)
    assert meta["format_version"] == 1 and meta["base_model"]["family"] == "SD 2.x"
    scene = load_scene(old)
    assert scene.family.name == "SD 2.x" and scene.embeddings_2 is None
    out = generate(old, "<asset1> on the moon", GenerateConfig(steps=2, seed=0), out_dir=tmp_path)
    with Image.open(out.images[0].path) as im:
        assert im.size == (64, 64)


def test_a_format_2_scene_from_before_the_layout_move_still_loads_and_generates(tmp_path):
    """tests/data/format2-sdxl.scene: the tiny SDXL at 64 px, 2 + 2 steps, written by
    scenebreak just before its modules moved into subpackages."""
    from helpers import DATA

    from scenebreak.scenes.bundle import read_metadata

    old = DATA / "format2-sdxl.scene"
    meta = read_metadata(old)
    assert meta["format_version"] == 2 and meta["base_model"]["family"] == "SDXL"
    scene = load_scene(old)
    assert scene.family.name == "SDXL" and scene.embeddings_2 is not None
    out = generate(old, "<asset2> on the moon", GenerateConfig(steps=2, seed=0), out_dir=tmp_path)
    with Image.open(out.images[0].path) as im:
        assert im.size == (64, 64)


def test_a_base_that_encodes_the_empty_prompt_samples_and_exports_as_its_folder_says(scene_files, tiny_sdxl, tmp_path):
    """An SDXL folder may say `force_zeros_for_empty_prompt: false` (its unconditional
    half is the encoded empty prompt, not zeros): the pipeline was always built with
    zeros, 135/255 away from diffusers' image of the same base, and the export said true."""
    import json
    import shutil

    from helpers import craft

    from scenebreak.device import choose_device
    from scenebreak.exports.export import export_scene
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.scene_models import open_pipeline

    base = tmp_path / "encodes-empty"
    shutil.copytree(tiny_sdxl, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    assert load_components(str(base)).pipeline_options == {"force_zeros_for_empty_prompt": False}
    assert load_components(str(tiny_sdxl)).pipeline_options in ({}, {"force_zeros_for_empty_prompt": True})

    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                   base_model=str(base), name="xl-empty", output=tmp_path / "xl-empty.scene")
    scene = load_scene(result.path)
    assert scene.meta["configs"]["pipeline"] == {"force_zeros_for_empty_prompt": False}
    assert open_pipeline(scene, choose_device("cpu")).config.force_zeros_for_empty_prompt is False
    [folder] = export_scene(result.path, tmp_path / "pipe", "diffusers")
    assert json.loads((folder / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False

    # A scene's record is data from a stranger: only a true or false is taken.
    hostile = craft(result.path, tmp_path / "hostile.scene",
                    meta=lambda m: m["configs"].update(pipeline={"force_zeros_for_empty_prompt": "no",
                                                                 "_name_or_path": "/etc"}))
    assert open_pipeline(load_scene(hostile), choose_device("cpu")).config.force_zeros_for_empty_prompt is True


def test_class_images_of_a_base_that_encodes_the_empty_prompt_are_its_own(scene_files, tiny_sdxl, tmp_path):
    """The class-image cache was keyed by the weights alone: a copy of a base whose
    model_index.json says `force_zeros_for_empty_prompt: false` reused the images its
    twin made with zeros, though its own pipeline makes other ones."""
    import json
    import shutil

    from scenebreak.events import Message
    from scenebreak.families import family_named
    from scenebreak.train.classimages import cache_folder

    sdxl = family_named("SDXL")
    plain = cache_folder("f", "a photo", 64, sdxl)
    assert cache_folder("f", "a photo", 64, sdxl, options={"force_zeros_for_empty_prompt": True}) == plain
    assert cache_folder("f", "a photo", 64, sdxl, options={"force_zeros_for_empty_prompt": False}) != plain

    base = tmp_path / "encodes-empty"
    shutil.copytree(tiny_sdxl, base)
    index = json.loads((base / "model_index.json").read_text())
    (base / "model_index.json").write_text(json.dumps(dict(index, force_zeros_for_empty_prompt=False)))
    said = []
    config = LearnConfig(steps1=1, steps2=1, num_class_images=1)
    for model, name in ((tiny_sdxl, "zeros"), (base, "empty")):
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(model), name=name,
              output=tmp_path / f"{name}.scene", report=lambda e: said.append(e.text) if isinstance(e, Message) else None)
    assert sum(text.startswith("generating 1 class images") for text in said) == 2, said
