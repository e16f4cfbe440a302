"""FLUX.1 scenes, end to end on a tiny FLUX built in code (tinymodels.build_tiny_flux):
learn (LoRA by default, full when asked; class images by the base; handles in both
vocabularies, the T5 row shaped by the attention loss over the joint attention),
generate, edit, extract-bg, export, resume, the command line, and hostile scenes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from helpers import craft, learn_whole_and_resumed, set_meta
from scenebreak import (BackgroundConfig, EditConfig, GenerateConfig, LearnConfig, edit, export_scene, extract_background,
                        generate, learn, load_scene)
from scenebreak.cli.commands import cli


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from tinymodels import build_tiny_flux

    root = tmp_path_factory.mktemp("flux-models")
    return {variant: build_tiny_flux(root / variant, variant=variant) for variant in ("dev", "schnell")}


@pytest.fixture(scope="module")
def dev_scene(tmp_path_factory, flux):
    """The synthetic scene learned on the tiny FLUX.1 dev as a user would: --tune auto,
    prior preservation with two class images, a <background> handle."""
    from helpers import learn_once

    config = LearnConfig(steps1=2, steps2=2, num_class_images=2, background=True)
    return learn_once(tmp_path_factory.mktemp("flux-dev"), flux["dev"], config)


def test_learn_chooses_lora_trains_both_handle_tables_and_records_the_family(dev_scene, flux):
    from scenebreak.families.base_model import load_components

    scene = load_scene(dev_scene.path, weights=True)
    meta = scene.meta
    assert meta["base_model"]["family"] == "FLUX.1 dev" and meta["format_version"] == 3 and meta["tuning"] == "lora"
    assert meta["prediction_type"] == "flow" and scene.family.prediction_type == "flow"  # flow matching, not epsilon
    assert meta["config"]["lambda_attn"] == 0.1  # the family's weight of the attention loss (--lambda-attn unset)
    # LoRA on the transformer and CLIP; FLUX's T5 gets none, only its handle rows train.
    assert set(scene.weights) == {"transformer_lora", "text_encoder_lora"}
    assert meta["lora"]["text_encoder_2_targets"] == [] and "attn.add_q_proj" in meta["lora"]["unet_targets"]
    base = load_components(str(flux["dev"]))
    for rows, te, tok in zip(scene.handle_embeddings, base.text_encoders, base.tokenizers):
        assert rows.shape == (3, te.get_input_embeddings().weight.shape[1])
    clip, t5 = base.tokenizers
    assert not torch.allclose(scene.embeddings.float(), base.text_encoders[0].get_input_embeddings().weight[-6:-3])
    assert scene.embeddings_2.abs().sum() > 0 and torch.isfinite(scene.embeddings_2).all()
    assert np.isfinite(dev_scene.losses["phase2"]["loss_last"]) and dev_scene.losses["phase2"]["attn_last"] > 0


def test_generate_edit_and_extract_bg_on_flux(dev_scene, scene_files, tmp_path):
    images = generate(dev_scene.path, "a photo of <asset1> on the moon", GenerateConfig(seed=1, num_images=2, steps=2),
                      out_dir=tmp_path / "gen")
    arrays = []
    for image in images.images:
        with Image.open(image.path) as im:
            assert im.size == (64, 64)
            arrays.append(np.asarray(im))
            # As Forge writes FLUX.1 dev's embedded guidance (its CFG scale is real, two-pass guidance).
            assert "Steps: 2, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 3.5, Seed: " in im.info["parameters"]
    assert not np.array_equal(*arrays)
    edited = edit(scene_files["image"], [(scene_files["masks"][0], "a photo of <asset2>")], dev_scene.path,
                  EditConfig(steps=4, seed=1), out_dir=tmp_path / "edit")
    with Image.open(edited.images[0].path) as im, Image.open(scene_files["image"]) as source:
        assert im.size == source.size
        assert np.array_equal(np.asarray(im)[70:, :40], np.asarray(source.convert("RGB"))[70:, :40])
    result = extract_background(dev_scene.path, BackgroundConfig(steps=4, seed=1), variations=1, out_dir=tmp_path / "bg")
    assert [i.kind for i in result.images] == ["plate", "variation"]


def test_flux_samples_with_its_own_sampler_and_steps(dev_scene):
    from scenebreak.errors import InvalidInput
    from scenebreak.sample.sampling import start

    run = start(dev_scene.path, ["<asset1>"], GenerateConfig(seed=0), device="cpu")
    assert (run.config.scheduler, run.config.steps, run.config.guidance) == ("flow", 28, 3.5)
    assert type(run.pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    with pytest.raises(InvalidInput, match="FLUX.1 dev samples with flow"):
        start(dev_scene.path, ["<asset1>"], GenerateConfig(seed=0, scheduler="ddim"), device="cpu")


def test_a_full_schnell_scene_is_self_contained_and_ignores_guidance(flux, scene_files, tmp_path):
    import shutil

    from scenebreak.events import Message

    base = tmp_path / "schnell"
    shutil.copytree(flux["schnell"], base)
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=2, prior=False, tune="full"),
                   base_model=str(base), name="schnell")
    scene = load_scene(result.path, weights=True)
    assert scene.meta["tuning"] == "full" and set(scene.weights) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    # T5's token table, as CLIP's, keeps full precision (ordinary words exactly the base's),
    # stored once though the model holds it under two names; reading ties it again.
    from safetensors import safe_open

    with safe_open(str(result.path), "pt") as f:
        stored = {key: f.get_slice(key).get_dtype() for key in f.keys() if key.startswith("text_encoder_2.")}
    assert stored["text_encoder_2.shared.weight"] == "F32" and "text_encoder_2.encoder.embed_tokens.weight" not in stored
    assert scene.meta["tied"] == {"text_encoder_2": {"encoder.embed_tokens.weight": "shared.weight"}}
    t5 = scene.weights["text_encoder_2"]
    assert t5["encoder.embed_tokens.weight"] is t5["shared.weight"]
    assert "F16" in stored.values()  # (the rest as --save-dtype says)
    shutil.rmtree(base)  # the scene generates without its base model
    said = []
    out = generate(result.path, "<asset1>", GenerateConfig(seed=0, guidance=7.0, negative="blurry"), out_dir=tmp_path / "out",
                   report=said.append)
    assert out.images[0].path.is_file()
    assert any("takes no guidance" in m.text for m in said if isinstance(m, Message))
    assert any("--negative is ignored" in m.text for m in said if isinstance(m, Message))  # (was silently)


def test_the_exported_diffusers_folder_and_embeddings_load_in_flux_pipeline(dev_scene, flux, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    scene = load_scene(dev_scene.path)
    [folder] = export_scene(dev_scene.path, tmp_path / "pipe", "diffusers")
    pipe = FluxPipeline.from_pretrained(folder)  # as the docs show it: one precision for all
    assert {m.dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    for tok, te, rows in zip((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2),
                             scene.handle_embeddings):
        ids = tok.convert_tokens_to_ids(scene.tokens)
        assert torch.allclose(te.get_input_embeddings().weight[ids].float(), rows.float(), atol=1e-2)
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["eos_token_id"] == pipe.tokenizer.eos_token_id
    image = pipe("a photo of <asset1>", num_inference_steps=1, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    files = export_scene(dev_scene.path, tmp_path / "emb", "embeddings")
    state = load_file(files[0])
    assert set(state) == {"clip_l", "t5xxl"} and state["t5xxl"].shape == (1, scene.embeddings_2.shape[1])


def test_an_interrupted_flux_learn_resumes_to_the_same_scene(flux, scene_files):
    config = LearnConfig(steps1=2, steps2=3, prior=False, checkpoint_every=1)
    whole, resumed = learn_whole_and_resumed(scene_files, flux["dev"], config)
    a, b = load_scene(whole.path, weights=True), load_scene(resumed.path, weights=True)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.embeddings_2, b.embeddings_2)
    for key, value in a.weights["transformer_lora"].items():
        assert torch.equal(value, b.weights["transformer_lora"][key]), key


def test_the_command_line_on_flux(flux, scene_files, tmp_path):
    runner = CliRunner()
    learned = runner.invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                  "--base-model", str(flux["dev"]), "--steps1", "1", "--steps2", "1", "--no-prior",
                                  "--name", "fx"])
    assert learned.exit_code == 0, learned.output
    assert "tuning: lora (the usual on FLUX.1 dev" in learned.stderr
    assert "(FLUX.1 dev)" in runner.invoke(cli, ["show", "fx"]).stdout
    made = runner.invoke(cli, ["generate", "fx", "<asset1> at the beach", "--steps", "1", "--seed", "3",
                               "--out-dir", str(tmp_path / "gen")])
    assert made.exit_code == 0 and made.stdout.strip().endswith(".png"), made.output
    bad = runner.invoke(cli, ["generate", "fx", "<asset1>", "--scheduler", "dpm", "--out-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "samples with flow" in bad.stderr and "Traceback" not in bad.output


def test_hostile_flux_scenes_are_refused_in_one_line(dev_scene, tiny_model, tmp_path):
    """A FLUX scene that says it is SD 2.x, or one given an SD base model for its LoRA."""
    runner = CliRunner()
    mislabelled = craft(dev_scene.path, tmp_path / "as-sd.scene", meta=set_meta("base_model.family", "SD 2.x"))
    result = runner.invoke(cli, ["show", str(mislabelled)])
    assert result.exit_code == 2 and "not a valid scene" in result.stderr and "Traceback" not in result.output
    other_base = runner.invoke(cli, ["generate", str(dev_scene.path), "<asset1>", "--steps", "1", "--base-model",
                                     str(tiny_model), "--out-dir", str(tmp_path / "out")])
    assert other_base.exit_code == 2 and "was learned on FLUX.1 dev, but" in other_base.stderr, other_base.output
    assert "is SD 2.x" in other_base.stderr  # (said from its configs, before its weights load)


def test_a_handle_past_the_t5_limit_is_refused(dev_scene, tmp_path):
    filler = " ".join(["photo"] * 600)
    result = CliRunner().invoke(cli, ["generate", str(dev_scene.path), f"{filler} <asset1>", "--steps", "1",
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 2 and "<asset1> falls past" in result.stderr and "512" in result.stderr, result.output


def test_a_handle_past_clips_77_tokens_but_within_t5s_is_warned_about(dev_scene, tmp_path):
    """It reaches T5 (the image) but not CLIP-L's pooled vector: a warning, not a refusal."""
    filler = " ".join(["photo"] * 100)
    result = CliRunner().invoke(cli, ["generate", str(dev_scene.path), f"{filler} <asset1>", "--steps", "1",
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "<asset1> falls past CLIP's 77 tokens" in result.stderr
    early = CliRunner().invoke(cli, ["generate", str(dev_scene.path), f"<asset1> {filler}", "--steps", "1",
                                     "--out-dir", str(tmp_path / "out2")])
    assert early.exit_code == 0 and "falls past" not in early.stderr, early.output


def test_lora_adapters_train_in_fp32_over_a_base_loaded_in_bf16(flux, scene_files, monkeypatch):
    """Under LoRA FLUX's transformer loads in the training's bf16; peft would make the
    adapters bf16 too, where AdamW's small updates round away. They are fp32."""
    import scenebreak.train.trainer as trainer

    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")  # bf16 training on any CPU
    seen = {}
    real_init = trainer.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["base"] = self.c.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight.dtype
        seen["adapters"] = {p.dtype for p in self.lora_params}

    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, memory="low"),
          base_model=str(flux["dev"]), name="bf16-base", device="cpu")
    assert seen == {"base": torch.bfloat16, "adapters": {torch.float32}}


def test_a_lora_scene_samples_from_its_base_loaded_in_half_precision_with_the_same_weights(tmp_path, monkeypatch):
    """To sample in bf16, a FLUX LoRA scene's base loads straight in bf16 (the
    transformer, and T5 whose files hold bf16): 34 GB of RAM for FLUX.1 instead of 67.
    Its weights being published in bf16, the adapters merged into it give exactly the
    weights of an fp32 load, merge and cast. SD and SDXL load as before."""
    from diffusers import FluxTransformer2DModel

    import scenebreak.sample.scene_models as scene_models
    from helpers import learn_once
    from scenebreak.device import choose_device
    from tinymodels import build_tiny_flux

    base = build_tiny_flux(tmp_path / "flux-bf16", t5_dtype=torch.bfloat16)  # as published: bf16 files
    FluxTransformer2DModel.from_pretrained(base / "transformer").to(torch.bfloat16).save_pretrained(base / "transformer")
    path = learn_once(tmp_path / "scene", base, LearnConfig(steps1=1, steps2=2, prior=False, lr_lora=1e-2)).path
    import scenebreak.families.base_model as base_model

    loads, real_load = [], base_model.load_components
    monkeypatch.setattr(base_model, "load_components",
                        lambda *args, **kwargs: loads.append(kwargs) or real_load(*args, **kwargs))
    cpu = choose_device("cpu")
    full, *_ = scene_models.scene_components(load_scene(path), cpu, dtype=torch.float32)
    half, _, (clip, t5), _ = scene_models.scene_components(load_scene(path), cpu, dtype=torch.bfloat16)
    assert loads[0]["denoiser_dtype"] is None and not loads[0]["text_encoder_dtypes"]
    assert loads[1]["denoiser_dtype"] == torch.bfloat16 and loads[1]["text_encoder_dtypes"] == {"text_encoder_2": torch.bfloat16}
    expected, got = full.state_dict(), half.state_dict()
    assert expected.keys() == got.keys() and all(v.dtype == torch.bfloat16 for v in got.values())
    assert all(torch.equal(got[k], expected[k].to(torch.bfloat16)) for k in expected)
    assert any(not torch.equal(got[k], v.to(torch.bfloat16)) for k, v in
               FluxTransformer2DModel.from_pretrained(base / "transformer").state_dict().items())  # the adapters are in


def test_frozen_t5_encodes_the_class_prompt_once_per_phase_not_every_step(flux, scene_files, monkeypatch):
    """Under LoRA, T5 gets no adapters and is frozen in phase 2, and the class prompt has
    no handle: its states for the class example were computed (and back-propagated to
    nothing) every step. They are now computed once, and the losses stay the same."""
    import scenebreak.train.trainer as trainer_module
    from scenebreak import learn
    from scenebreak.families.flux import Flux

    def run(name, cached):
        rows, losses = [], []
        monkeypatch.setattr(Flux, "class_state_encoders", (1,) if cached else ())
        real_step = trainer_module.Trainer.train_step

        def step(self, phase, steps):
            t5 = self.c.text_encoders[1]
            hook = t5.register_forward_pre_hook(lambda module, args, kwargs: rows.append((phase, len(args[0]))),
                                                with_kwargs=True)
            try:
                record = real_step(self, phase, steps)
            finally:
                hook.remove()
            losses.append(record.losses.tolist())
            return record

        monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
        config = LearnConfig(steps1=1, steps2=3, num_class_images=1, seed=4, tune="lora", rank=2, mixed_precision="no")
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(flux["dev"]), name=name, device="cpu")
        monkeypatch.setattr(trainer_module.Trainer, "train_step", real_step)
        return rows, losses

    rows, cached = run("cached", True)
    assert [r for r in rows if r[0] == 2] == [(2, 1)] * 3  # the instance row alone, every phase-2 step
    rows, every_step = run("every-step", False)
    assert [r for r in rows if r[0] == 2] == [(2, 2)] * 3
    for a, b in zip(cached, every_step):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


def test_fp16_training_runs_t5s_fp32_layers_in_fp32_as_sampling_does(flux, scene_files, monkeypatch):
    """On cards without bf16 (V100, T4) training autocasts to fp16, and the frozen base
    was cast whole to fp16: T5's `wo` layers, which transformers keeps in fp32 because
    they overflow in fp16, multiplied in fp16 (sampling keeps them in fp32), so the
    handles learned against prompt states that sampling does not make. Run here on the
    CPU with fp16 autocast and the half-precision frozen base of `--memory low`."""
    import scenebreak.train.trainer as trainer_module
    from scenebreak import learn
    from scenebreak.device import Device

    monkeypatch.setattr(Device, "train_dtype", lambda self, mixed_precision="auto": torch.float16)
    seen, real_step = [], trainer_module.Trainer.train_step

    def step(self, phase, steps):
        t5 = self.c.text_encoders[1]
        wo = [m for name, m in t5.named_modules() if name.endswith(".wo")]
        hooks = [m.register_forward_hook(lambda module, args, out: seen.append((module.weight.dtype, out.dtype,
                                                                                bool(torch.isfinite(out).all()))))
                 for m in wo]
        try:
            record = real_step(self, phase, steps)
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.isfinite(record.losses).all()
        return record

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    config = LearnConfig(steps1=1, steps2=1, prior=False, tune="lora", rank=2, memory="low")
    learn(scene_files["image"], scene_files["masks"], config, base_model=str(flux["dev"]), name="fp16", device="cpu")
    assert seen and set(seen) == {(torch.float32, torch.float32, True)}
    # The frozen rest did train in fp16 (what the test is about).
    assert load_scene("fp16").meta["precision"] == "fp16"


def test_t5_loaded_in_its_files_bf16_runs_its_fp32_layers_in_fp32_under_fp16(tmp_path):
    """On a GPU FLUX's T5 loads in its files' bf16, where transformers keeps `wo` in bf16
    (it keeps it in fp32 for fp16 loads only): under fp16 training its layers must be
    made fp32 before they run in fp32, or the fp32 input meets a bf16 weight."""
    from transformers import T5EncoderModel

    from scenebreak.device import hold_in_fp32
    from scenebreak.families.versions import transformers_dtype
    from tinymodels import build_tiny_flux

    folder = build_tiny_flux(tmp_path / "flux", variant="dev", t5_dtype=torch.bfloat16)
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2", **transformers_dtype(torch.bfloat16))
    assert t5.dtype == torch.bfloat16
    reference = T5EncoderModel.from_pretrained(folder / "text_encoder_2", **transformers_dtype(torch.float32))
    ids = torch.tensor([[5, 9, 13, 1]])
    layers = hold_in_fp32([t5], torch.float16, "cpu")
    assert layers and all(p.dtype == torch.float32 for layer in layers for p in layer.parameters())
    assert hold_in_fp32([t5], torch.float16, "cpu") == layers  # a second call changes nothing
    kept = {id(p) for layer in layers for p in layer.parameters()}
    for param in t5.parameters():  # the rest as the fp16 training holds it (its cast skips those layers)
        if id(param) not in kept:
            param.data = param.data.half()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        states = t5(ids)[0]
    with torch.no_grad():
        expected = reference(ids)[0]
    assert torch.isfinite(states).all()
    assert float((states.float() - expected).norm() / expected.norm()) < 0.05


def test_the_latent_grid_read_from_a_flux_scene_is_the_pipelines(dev_scene):
    """FLUX.1 packs 2x2 latent cells into a token: edit's early check of a thin mask
    works on sides of twice the VAE's factor, as FluxPipeline's image processor does."""
    from scenebreak.device import choose_device
    from scenebreak.sample.blending import vae_factor
    from scenebreak.sample.scene_models import open_pipeline

    scene = load_scene(dev_scene.path)
    pipe = open_pipeline(scene, choose_device("cpu"))
    factor = vae_factor(scene.meta["configs"]["vae"])
    assert factor == pipe.vae_scale_factor and scene.family.latent_patch == 2
    assert factor * scene.family.latent_patch == pipe.image_processor.config.vae_scale_factor
