"""`learn --quantize nf4|int8`: the frozen base of LoRA held in 4 or 8 bits
(families/quantized.py), on the tiny FLUX: what is quantised, that the adapters and both
handle tables still train through it, that a run resumes; what the memory plan picks with
auto; and the one-line refusals. bitsandbytes runs these layers on the CPU too (>= 0.48);
the tests install it (`scenebreak[test]`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from scenebreak import LearnConfig, learn, load_scene
from scenebreak.errors import InvalidInput, SceneBreakError

bnb = pytest.importorskip("bitsandbytes", reason="the quantised layers are bitsandbytes' (pip install 'scenebreak[test]')")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from tinymodels import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_quantised_base_trains_the_adapters_and_both_handle_tables(kind, flux, scene_files, monkeypatch):
    import scenebreak.train.classimages as classimages
    import scenebreak.train.trainer as trainer

    seen = {}
    real_init, real_make = trainer.Trainer.__init__, classimages._make

    def make(components, *args, **kwargs):  # the class images come from the base as it is held for training:
        seen["class_to_q"] = type(components.denoiser.transformer_blocks[0].attn.to_q).__name__  # on a 24 GB card
        seen["class_t5"] = {type(m).__name__ for n, m in components.text_encoders[1].named_modules()
                            if "Linear" in type(m).__name__ and not n.endswith(".wo")}
        seen["class_t5_wo"] = {type(m).__name__ for n, m in components.text_encoders[1].named_modules() if n.endswith(".wo")}
        return real_make(components, *args, **kwargs)  # FLUX.1 fits only so

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen["trainer"] = self
        blocks = self.c.denoiser.transformer_blocks[0]
        seen["to_q"] = type(blocks.attn.to_q.base_layer).__name__  # wrapped by its adapter
        seen["t5"] = {type(m).__name__ for n, m in self.c.text_encoders[1].named_modules()
                      if "Linear" in type(m).__name__ and not n.endswith(".wo")}
        seen["clip"] = {type(m).__name__ for m in self.c.text_encoders[0].modules() if "Linear" in type(m).__name__}
        seen["proj_out"] = type(self.c.denoiser.proj_out).__name__
        seen["t5_rows"] = self.embeddings[1].handles.detach().clone()

    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    monkeypatch.setattr(classimages, "_make", make)
    result = learn(scene_files["image"], scene_files["masks"],
                   LearnConfig(steps1=2, steps2=2, num_class_images=1, quantize=kind), base_model=str(flux), name=kind)
    expected = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}[kind]
    assert seen["class_to_q"] == expected and seen["class_t5"] == {expected}
    assert seen["class_t5_wo"] == {"Linear"}  # T5's wo, as transformers leaves it: see test_t5s_wo_is_never_quantised
    assert seen["to_q"] == expected
    assert seen["t5"] == {expected}  # T5 gets no adapters: all of it quantised, but wo
    assert "Linear4bit" not in seen["clip"] and "Linear8bitLt" not in seen["clip"]  # CLIP has adapters: kept
    assert seen["proj_out"] == "Linear"  # the output projection every token goes through stays exact
    scene = load_scene(result.path, weights=True)
    assert scene.meta["memory"]["quantize"] == kind and scene.meta["tuning"] == "lora"
    assert set(scene.weights) == {"transformer_lora", "text_encoder_lora"}
    ups = [v for k, v in scene.weights["transformer_lora"].items() if "lora_B" in k]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # the adapters learned through the quantised layers
    assert not torch.equal(scene.embeddings_2.float(), seen["t5_rows"].float())  # and T5's handle rows did too
    assert all(torch.isfinite(torch.tensor(v)) for phase in result.losses.values() for v in phase.values())


def test_a_quantised_run_resumes_after_a_kill_to_the_uninterrupted_runs_scene(flux, scene_files, monkeypatch):
    """Under bf16 autocast the frozen base waits in bf16: the quantised layers' weights,
    still float until the move packs them, were cast first where the class images were
    cached (packed from bf16 values) but not where sampling them had packed them already
    (from fp32). The resumed run, its class images cached, trained on other weights."""
    from helpers import Killed, kill_at

    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")
    config = LearnConfig(steps1=2, steps2=2, num_class_images=1, quantize="nf4", checkpoint_every=1,
                         class_prompt="a photo of a quantised thing")
    with pytest.raises(Killed):  # (this run makes the class images)
        learn(scene_files["image"], scene_files["masks"], config, base_model=str(flux), name="killed",
              report=kill_at(2, 1))
    resumed = learn(scene_files["image"], scene_files["masks"], config, base_model=str(flux), name="killed", resume=True)
    assert resumed.resumed and load_scene(resumed.path).meta["memory"]["quantize"] == "nf4"
    whole = learn(scene_files["image"], scene_files["masks"], config, base_model=str(flux), name="whole")
    a, b = load_scene(whole.path, weights=True), load_scene(resumed.path, weights=True)
    assert torch.equal(a.embeddings, b.embeddings) and torch.equal(a.embeddings_2, b.embeddings_2)
    for part, state in a.weights.items():
        assert all(torch.equal(value, b.weights[part][key]) for key, value in state.items()), part


def test_auto_quantises_on_a_gpu_where_lora_would_not_fit(flux, monkeypatch):
    from scenebreak.device import Device
    from scenebreak.families.base_model import load_components
    from scenebreak.families import quantized
    from scenebreak.train import memory

    components, cuda = load_components(str(flux)), Device(type="cuda", name="cuda")
    config = LearnConfig(tune="lora", memory="low")
    need = memory.phase2_bytes(components, config, 64, True, low=True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need * 10)
    assert memory.choose(config, components, cuda, 64, torch.bfloat16).quantize == "none"  # it fits: nothing rounded
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 10)
    plan = memory.choose(config, components, cuda, 64, torch.bfloat16)
    assert plan.quantize == "nf4" and "frozen base in nf4, LoRA in half precision needs about" in plan.describe()
    assert memory.choose(LearnConfig(tune="lora", memory="low", quantize="none"), components, cuda, 64,
                         torch.bfloat16).quantize == "none"  # never when told not to
    assert memory.choose(config, components, Device("cpu", "cpu"), 64, None).quantize == "none"  # auto: GPUs only
    monkeypatch.setattr(quantized, "quantization_available", lambda: False)
    plan = memory.choose(config, components, cuda, 64, torch.bfloat16)
    assert plan.quantize == "none" and any("pip install 'scenebreak[quantize]'" in w for w in plan.warnings)
    # Asked for: --tune auto becomes LoRA (the base must be frozen), and a missing library is exit 1 with the fix.
    with pytest.raises(SceneBreakError, match=r"bitsandbytes: pipx inject scenebreak bitsandbytes"):
        memory.choose(LearnConfig(quantize="nf4"), components, cuda, 64, torch.bfloat16)


def test_quantising_what_cannot_be_quantised_is_refused_in_one_line(tiny_model, scene_files):
    from scenebreak.cli.commands import cli

    with pytest.raises(InvalidInput, match="full tuning trains every weight"):
        LearnConfig(quantize="nf4", tune="full").validate(2)
    with pytest.raises(InvalidInput, match="cannot make a --standalone scene"):
        LearnConfig(quantize="int8", standalone=True).validate(2)
    args = ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]), "--base-model",
            str(tiny_model)]
    result = CliRunner().invoke(cli, args + ["--quantize", "nf4", "--tune", "full"])
    assert result.exit_code == 2 and "full tuning trains every weight" in result.stderr
    assert "Traceback" not in result.stderr
    result = CliRunner().invoke(cli, args + ["--quantize", "fp3"])
    assert result.exit_code == 2


# -- sampling a LoRA scene with its base quantised (generate, edit, extract-bg) -------------


@pytest.fixture(scope="module")
def flux_lora_scene(tmp_path_factory, flux):
    from helpers import learn_once

    return learn_once(tmp_path_factory.mktemp("flux-lora"), flux,
                       LearnConfig(steps1=1, steps2=2, prior=False, lr_lora=1e-2)).path


def test_a_lora_scene_samples_with_its_base_in_nf4_and_the_adapters_beside_it(flux_lora_scene):
    """Where FLUX.1's base does not fit the GPU in bf16 (34 GB: a 24 GB card), sampling
    holds it in NF4 with the scene's adapters beside the packed layers, as training did;
    the images come out, close to the full-precision ones (4 bits move them a little)."""
    from scenebreak.device import choose_device
    from scenebreak.sample.pipeline import make_pipeline, sample
    from scenebreak.sample.scene_models import scene_components

    scene, cpu = load_scene(flux_lora_scene), choose_device("cpu")
    images = {}
    for kind in ("none", "nf4"):
        denoiser, vae, encoders, tokenizers = scene_components(scene, cpu, dtype=torch.float32, quantize=kind)
        for module in (m for model in (denoiser, *encoders) for m in model.modules()):
            if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' AVX512-BF16 inference kernel packs
                module.support_avx512bf16_for_cpu = False  # blocks of 64 inputs: the tiny model's layers have 32
        to_q = denoiser.transformer_blocks[0].attn.to_q
        if kind == "nf4":
            assert type(to_q.base_layer).__name__ == "Linear4bit" and to_q.lora_A["default"].weight.dtype == torch.float32
            assert {type(m).__name__ for n, m in encoders[1].named_modules()
                    if "Linear" in type(m).__name__ and not n.endswith(".wo")} == {"Linear4bit"}
        else:
            assert type(to_q) is torch.nn.Linear  # merged: plain layers
        pipe = make_pipeline(scene.family, denoiser, vae, encoders, tokenizers, scene.meta["configs"]["scheduler"], "flow")
        images[kind] = np.asarray(sample(pipe, scene.family, "a photo of <asset1>", [0], steps=3, guidance=3.5,
                                         resolution=64)[0], dtype=np.float32)
    assert np.isfinite(images["nf4"]).all() and images["nf4"].std() > 1
    assert np.abs(images["nf4"] - images["none"]).mean() < 25  # of 255: the same picture, rounded weights


def test_auto_samples_in_nf4_only_on_a_gpu_the_weights_would_not_fit(flux, tiny_model, monkeypatch):
    from scenebreak.device import Device
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.scene_models import sampling_quantization

    flux_parts, sd_parts = load_components(str(flux)), load_components(str(tiny_model))
    weights = 2 * sum(p.numel() for m in flux_parts.models() for p in m.parameters())  # bytes in bf16
    gpu, cpu = Device("cuda", "cuda:0"), Device("cpu", "cpu")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights // 2, 24 * 2**30))
    kind, why = sampling_quantization(flux_parts, gpu, torch.bfloat16, "auto")
    assert kind == "nf4" and why.startswith("sampling with the base in nf4: its weights need about")
    assert sampling_quantization(sd_parts, gpu, torch.float16, "auto") == ("none", "")  # SD, SDXL: never
    assert sampling_quantization(flux_parts, cpu, torch.float32, "auto") == ("none", "")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * weights, 80 * 2**30))
    assert sampling_quantization(flux_parts, gpu, torch.bfloat16, "auto") == ("none", "")
    import scenebreak.families.quantized as quantized

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (weights // 2, 24 * 2**30))
    monkeypatch.setattr(quantized, "quantization_available", lambda: False)
    kind, why = sampling_quantization(flux_parts, gpu, torch.bfloat16, "auto")
    assert kind == "none" and "bitsandbytes" in why and "4 bits" in why


def test_t5s_wo_is_never_quantised_so_its_prompt_states_stay_close(flux):
    """T5's feed-forward casts its input to `wo.weight.dtype`, which for a 4-bit layer is
    uint8: with `wo` in NF4 every prompt state was garbage (finite, so nothing failed).
    transformers keeps `wo` out of quantisation; so does scenebreak now."""
    from scenebreak.families.base_model import load_components
    from scenebreak.families.quantized import quantize_adapterless_encoders

    c = load_components(str(flux))
    t5, tokenizer = c.text_encoders[1], c.tokenizers[1]
    ids = tokenizer("a photo of a cat on a mat", padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        full = t5(ids)[0]
    quantize_adapterless_encoders(c, "nf4", torch.float32)
    t5.to("cpu")  # (bitsandbytes packs the weights when they move)
    for module in t5.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # its AVX512-BF16 kernel packs blocks of 64 inputs
            module.support_avx512bf16_for_cpu = False
    assert all(type(m) is torch.nn.Linear for n, m in t5.named_modules() if n.endswith(".wo"))
    with torch.no_grad():
        packed = t5(ids)[0]
    assert torch.isfinite(packed).all()
    # 4-bit rounding of a tiny random T5 moves them by about 0.3 of their norm; wo in 4 bits, 1.3
    assert float((packed - full).norm() / full.norm()) < 0.6
