"""Memory modes and LoRA tuning on the tiny model: same training where it should be,
small LoRA scenes that name their base, clear messages when an extra is missing."""

import shutil
import sys

import pytest
import torch
from click.testing import CliRunner

from scenebreak import GenerateConfig, LearnConfig, generate, learn, load_scene
from scenebreak.cli.commands import cli
from scenebreak.errors import BundleError, Interrupted, ModelNotAvailable, SceneBreakError
from scenebreak.train.optim import OptimizerInBackward

from helpers import stop_after_first_step


def _learn(scene_files, tiny_model, name, **settings):
    config = LearnConfig(**{**dict(steps1=3, steps2=3, prior=True, num_class_images=2, lr2=1e-3), **settings})
    return learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), name=name)


def test_optimizer_in_backward_steps_like_adamw_and_shares_its_checkpoint_layout():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    make = lambda groups: torch.optim.AdamW(groups, weight_decay=0.01)  # noqa: E731
    plain = make([{"params": list(models[0].parameters()), "lr": 1e-2}])
    hooked = OptimizerInBackward([{"params": list(models[1].parameters()), "lr": 1e-2}], make, max_norm=None)
    x = torch.randn(16, 4)
    for _ in range(3):
        models[0](x).square().mean().backward()
        plain.step()
        plain.zero_grad()
        models[1](x).square().mean().backward()  # steps inside
        assert all(p.grad is None for p in models[1].parameters())  # freed as it went
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)
    saved = hooked.state_dict()
    assert saved["state"].keys() == plain.state_dict()["state"].keys()
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(saved["state"][3][key], plain.state_dict()["state"][3][key])
    hooked.close()
    again = OptimizerInBackward([{"params": list(models[1].parameters()), "lr": 1e-2}], make, max_norm=None)
    again.load_state_dict(plain.state_dict())  # a checkpoint of one kind resumes the other
    torch.testing.assert_close(again.state_dict()["state"][0]["exp_avg"], plain.state_dict()["state"][0]["exp_avg"])
    again.close()


def test_low_memory_trains_like_fast(scene_files, tiny_model):
    """Phase 1 is the same either way. In phase 2 the low mode clips each tensor on its
    own: with clipping out of play the runs match; with it, the handles stay close."""
    fast = load_scene(_learn(scene_files, tiny_model, "fast", memory="fast", max_grad_norm=1e9).path, weights=True)
    low = load_scene(_learn(scene_files, tiny_model, "low", memory="low", max_grad_norm=1e9).path, weights=True)
    assert low.meta["memory"]["policy"] == "low" and low.meta["memory"]["optimizer_in_backward"]
    assert low.meta["memory"]["gradient_checkpointing"] and not fast.meta["memory"]["gradient_checkpointing"]
    assert low.meta["config"]["memory"] == "low"  # what was asked for, beside what was done
    torch.testing.assert_close(fast.embeddings, low.embeddings, atol=1e-5, rtol=1e-4)
    for key, value in fast.weights["unet"].items():
        torch.testing.assert_close(value.float(), low.weights["unet"][key].float(), atol=2e-3, rtol=1e-2, msg=key)

    phase1 = [load_scene(_learn(scene_files, tiny_model, f"p1-{m}", memory=m, steps2=0).path).embeddings for m in ("fast", "low")]
    torch.testing.assert_close(phase1[0], phase1[1], atol=1e-6, rtol=1e-5)
    clipped = [load_scene(_learn(scene_files, tiny_model, f"c-{m}", memory=m).path).embeddings for m in ("fast", "low")]
    assert (clipped[0] - clipped[1]).abs().max() < 0.05 * clipped[0].abs().max()


def test_low_memory_checkpoints_the_text_encoder_in_phase_1_too(scene_files, tiny_model, monkeypatch):
    """transformers checkpoints a layer only in training mode, and phase 1 put the text
    encoders in eval mode: under --memory low FLUX.1's T5 kept all its activations in
    phase 1 (some 2 GB). Each layer now runs again in the backward pass (a recompute),
    and phase 1 learns the same as with --memory fast."""
    from transformers.models.clip.modeling_clip import CLIPMLP

    calls = []
    real = CLIPMLP.forward  # (inside each layer: the layer's own forward is the checkpointing wrapper)

    def forward(self, *args, **kwargs):
        calls.append(self.training)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CLIPMLP, "forward", forward)
    scenes = {}
    for memory in ("fast", "low"):
        calls.clear()
        scenes[memory] = load_scene(_learn(scene_files, tiny_model, f"te-{memory}", memory=memory, steps1=2, steps2=0,
                                           prior=False).path)
        counted = len(calls)
        if memory == "fast":
            fast_calls = counted
    assert counted > fast_calls and all(calls)  # recomputed, in training mode
    torch.testing.assert_close(scenes["fast"].embeddings, scenes["low"].embeddings, atol=1e-6, rtol=1e-5)


def test_lora_scene_is_small_names_its_base_and_generates(scene_files, tiny_model, tmp_path):
    full = _learn(scene_files, tiny_model, "full")
    lora = _learn(scene_files, tiny_model, "lora", tune="lora", rank=4, lr_lora=1e-3)
    scene = load_scene(lora.path, weights=True)
    assert scene.needs_base_model and set(scene.weights) == {"unet_lora", "text_encoder_lora"}
    assert lora.path.stat().st_size < full.path.stat().st_size / 5
    base = scene.meta["base_model"]
    assert base["id"] == str(tiny_model.resolve()) and base["fingerprint"]
    assert scene.meta["lora"]["rank"] == 4
    assert any(v.abs().sum() > 0 for k, v in scene.weights["unet_lora"].items() if "lora_B" in k)  # trained
    image = generate(lora.path, "<asset1>", GenerateConfig(steps=2, seed=1), out_dir=tmp_path).images[0]
    assert image.path.exists()

    moved = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, moved)
    with pytest.raises(BundleError, match="another base model"):
        other = tmp_path / "other-model"
        from tinymodels import build_tiny_model

        build_tiny_model(other, seed=1)
        generate(lora.path, "<asset1>", GenerateConfig(steps=2, seed=1), out_dir=tmp_path, base_model=str(other))
    again = generate(lora.path, "<asset1>", GenerateConfig(steps=2, seed=1), out_dir=tmp_path / "b", base_model=str(moved))
    assert again.images[0].path.exists()

    # Exported as a plain diffusers pipeline: the adapters merged into ordinary weights.
    from diffusers import UNet2DConditionModel

    from scenebreak import export_scene

    [folder] = export_scene(lora.path, tmp_path / "exported", "diffusers")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    assert not any("lora" in k for k in unet.state_dict())
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    key = next(k for k in unet.state_dict() if k.endswith("attn2.to_k.weight"))
    assert not torch.allclose(unet.state_dict()[key].float(), base_unet.state_dict()[key].half().float(), atol=1e-4)


def test_lora_standalone_and_cli(scene_files, tiny_model, tmp_path):
    runner = CliRunner()
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    args = ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]), "--base-model", str(base),
            "--steps1", "1", "--steps2", "2", "--no-prior", "--tune", "lora", "--rank", "2"]
    result = runner.invoke(cli, [*args, "--name", "plain", "--memory", "low"])
    assert result.exit_code == 0, result.output
    assert "memory: low" in result.stderr
    standalone = runner.invoke(cli, [*args, "--name", "baked", "--standalone"])
    assert standalone.exit_code == 0, standalone.output
    assert load_scene("baked").meta["standalone"] and not load_scene("plain").meta["standalone"]
    assert "tuning: lora (rank 2, needs its base model)" in runner.invoke(cli, ["show", "plain"]).stdout
    shutil.rmtree(base)  # the base model is gone: only the standalone scene still generates
    ok = runner.invoke(cli, ["generate", "baked", "<asset1>", "--steps", "2", "--out-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    missing = runner.invoke(cli, ["generate", "plain", "<asset1>", "--steps", "2", "--out-dir", str(tmp_path)])
    # (exit 1, a model not available, as a hub model not downloaded: the scene's own record, not bad input)
    assert missing.exit_code == 1 and "needs its base model" in missing.stderr and "--base-model" in missing.stderr
    wrong = runner.invoke(cli, ["generate", "plain", "<asset1>", "--base-model", str(tmp_path / "nowhere")])
    assert wrong.exit_code == 2 and "base model folder not found" in wrong.stderr, wrong.output
    bad = runner.invoke(cli, [*args[:-4], "--tune", "full", "--standalone"])
    assert bad.exit_code == 2 and "--standalone only applies to --tune lora or auto" in bad.stderr


def test_resume_with_lora_and_the_optimizer_in_backward(scene_files, tiny_model):
    settings = dict(tune="lora", rank=4, lr_lora=1e-3, memory="low")
    straight = _learn(scene_files, tiny_model, "straight", **settings)
    steps = []
    config = LearnConfig(steps1=3, steps2=3, prior=True, num_class_images=2, lr2=1e-3, **settings)
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(Interrupted):
        learn(*args, base_model=str(tiny_model), name="resumed", should_stop=lambda: len(steps) >= 5,
              report=lambda e: steps.append(e) if getattr(e, "task", "").startswith("phase") and e.completed else None)
    resumed = learn(*args, base_model=str(tiny_model), name="resumed", resume=True)
    a, b = load_scene(straight.path, weights=True), load_scene(resumed.path, weights=True)
    torch.testing.assert_close(a.embeddings, b.embeddings, atol=1e-6, rtol=1e-5)
    for key, value in a.weights["unet_lora"].items():
        torch.testing.assert_close(value.float(), b.weights["unet_lora"][key].float(), atol=1e-3, rtol=1e-3, msg=key)


def test_missing_bitsandbytes_is_a_message_not_a_crash(scene_files, tiny_model, monkeypatch):
    from scenebreak.train import memory
    from scenebreak.device import Device
    from scenebreak.train.optim import adamw_factory

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    cuda = Device(type="cuda", name="cuda")
    with pytest.raises(SceneBreakError, match="pipx inject scenebreak bitsandbytes"):
        adamw_factory(LearnConfig(), cuda, eight_bit=True)
    # --memory low on a GPU without it: a warning with the fix, then fp32 AdamW.
    monkeypatch.setattr(memory, "available_bytes", lambda device: 80 * 2**30)
    from scenebreak.families.base_model import load_components

    components = load_components(str(tiny_model))
    plan = memory.choose(LearnConfig(memory="low"), components, cuda, 64, torch.bfloat16)
    assert plan.gradient_checkpointing and plan.optimizer_in_backward and not plan.adam_8bit
    assert any("bitsandbytes" in w for w in plan.warnings)
    # fp16 steps after the loss scaler has seen every gradient: never inside the backward pass.
    assert not memory.choose(LearnConfig(memory="low"), components, cuda, 64, torch.float16).optimizer_in_backward
    # Asked for explicitly on the CLI, on a machine without CUDA: exit 2 before any work.
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                      "--base-model", str(tiny_model), "--adam-8bit"])
    assert result.exit_code == 2 and "needs a CUDA device" in result.stderr


def test_auto_memory_picks_low_when_fast_does_not_fit(tiny_model, monkeypatch):
    from scenebreak.train import memory
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components

    components, cpu = load_components(str(tiny_model)), choose_device("cpu")
    need = memory.phase2_bytes(components, LearnConfig(), 64, autocast=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: need * 2)
    assert memory.choose(LearnConfig(), components, cpu, 64, None).policy == "fast"
    monkeypatch.setattr(memory, "available_bytes", lambda device: need // 2)
    plan = memory.choose(LearnConfig(tune="full"), components, cpu, 64, None)
    assert plan.policy == "low" and plan.gradient_checkpointing and not plan.offload_vae  # nowhere to offload on a CPU
    assert "fast needs about" in plan.describe()
    monkeypatch.setattr(memory, "available_bytes", lambda device: need * 100)
    assert memory.choose(LearnConfig(tune="lora"), components, cpu, 64, None).policy == "low"  # cheap there, measured
    # Explicit switches are kept on top of fast.
    plan = memory.choose(LearnConfig(memory="fast", gradient_checkpointing=True), components, cpu, 64, None)
    assert plan.policy == "fast" and plan.gradient_checkpointing and not plan.optimizer_in_backward


def test_tune_auto_is_full_where_low_memory_makes_it_fit_and_lora_otherwise(tiny_model, monkeypatch):
    from scenebreak.train import memory
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components

    components, cpu = load_components(str(tiny_model)), choose_device("cpu")
    full_low = memory.phase2_bytes(components, LearnConfig(tune="full"), 64, autocast=False, low=True)
    fast = memory.phase2_bytes(components, LearnConfig(tune="full"), 64, autocast=False)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(full_low / 0.85))  # only low fits
    plan = memory.choose(LearnConfig(), components, cpu, 64, None)
    assert plan.tune == "full" and plan.policy == "low" and "tuning: full (full tuning needs about" in plan.describe()
    assert memory.choose(LearnConfig(memory="fast"), components, cpu, 64, None).tune == "lora"  # fast cannot fit it
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(full_low / 2))
    plan = memory.choose(LearnConfig(), components, cpu, 64, None)
    assert plan.tune == "lora" and "tuning: lora (full tuning would need about" in plan.describe()
    # A resumed run keeps what it started with, and an explicit choice is never changed.
    assert memory.choose(LearnConfig(), components, cpu, 64, None, resumed_tuning="full").tune == "full"
    assert memory.choose(LearnConfig(tune="full"), components, cpu, 64, None).tune == "full"
    assert fast > full_low


def test_a_missing_base_for_a_lora_scene_names_the_fix(scene_files, tiny_model):
    from scenebreak.sample.scene_models import base_with_lora

    scene = load_scene(_learn(scene_files, tiny_model, "hubless", tune="lora", rank=2).path, weights=True)
    scene.meta["base_model"].update(id="someone/not-downloaded", commit=None)
    with pytest.raises(ModelNotAvailable, match="needs its base model.*hf download someone/not-downloaded"):
        base_with_lora(scene, None, [10])


def test_a_lora_scenes_base_is_found_in_the_cache_after_its_branch_moved_on(scene_files, tiny_model, tmp_path,
                                                                           monkeypatch):
    """The snapshot of the commit a LoRA scene was learned on has left the cache (`hf cache
    prune` after main moved on): the branch's cached snapshot is used, offline, where
    its weights are the same (the fingerprint); it was "not in the cache", exit 1."""
    import shutil

    import huggingface_hub.constants as constants

    from scenebreak.sample.scene_models import base_with_lora

    scene = load_scene(_learn(scene_files, tiny_model, "moved", tune="lora", rank=2).path, weights=True)
    scene.meta["base_model"].update(id="someone/tiny-sd", revision="main", commit="a" * 40)
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert base_with_lora(scene, None, [10]) is not None
    shutil.rmtree(repo / "snapshots" / ("b" * 40))  # neither cached: the commit's own message
    with pytest.raises(ModelNotAvailable, match="--revision a{40}"):
        base_with_lora(scene, None, [10])


def test_the_estimate_matches_the_measured_sd21_figures():
    """benchmarks/results/train_step-cpu.md: phase 2 at 512 with prior preservation
    peaks at 20.3 GiB (fast, fp32), 15.1 GiB (low, bf16) and 10.3 GiB (LoRA, bf16)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from scenebreak.train import memory
    from tinymodels import sd21_base_configs

    configs = sd21_base_configs()
    with init_empty_weights():  # parameter counts only
        sd21 = SimpleNamespace(denoiser=UNet2DConditionModel.from_config(configs["unet"]), vae=AutoencoderKL.from_config(configs["vae"]),
                               text_encoders=[CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))])
    gib = 2**30
    fast = memory.phase2_bytes(sd21, LearnConfig(), 512, autocast=False) / gib
    low = memory.phase2_bytes(sd21, LearnConfig(), 512, autocast=True, low=True) / gib
    lora = memory.phase2_bytes(sd21, LearnConfig(tune="lora"), 512, autocast=True) / gib
    assert abs(fast - 20.3) < 1.5 and abs(low - 15.1) < 1.5 and abs(lora - 10.3) < 1.5, (fast, low, lora)


def _sd21_counts():
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tinymodels import sd21_base_configs

    configs = sd21_base_configs()
    with init_empty_weights():  # parameter counts only
        return SimpleNamespace(denoiser=UNet2DConditionModel.from_config(configs["unet"]),
                               vae=AutoencoderKL.from_config(configs["vae"]),
                               text_encoders=[CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))],
                               family=SimpleNamespace(default_tune=None, name="SD 2.x"))


def test_on_a_gpu_the_estimates_count_what_the_step_holds(monkeypatch):
    """fp16 keeps every gradient for the loss scaler (the optimizer cannot step inside
    the backward pass): an 11 GB card was given full tuning estimated at 7.6 GiB that
    needs about 12. LoRA's frozen base waits in half precision, with no autocast copy:
    it was estimated at 9.4 GiB where the H200 measured 5.7 with the staging."""
    from scenebreak.device import Device
    from scenebreak.train import memory, optim

    sd21, gib = _sd21_counts(), 2**30
    monkeypatch.setattr(optim, "bitsandbytes_available", lambda: True)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(10.5 * gib))
    gpu = Device(type="cuda", name="cuda:0")
    assert memory.choose_tuning(LearnConfig(), sd21, gpu, 512, torch.bfloat16)[0] == "full"
    tune, why = memory.choose_tuning(LearnConfig(), sd21, gpu, 512, torch.float16)
    assert tune == "lora" and "about 12." in why, why
    lora = memory.phase2_bytes(sd21, LearnConfig(tune="lora"), 512, autocast=True, half_frozen=True) / gib
    assert 4.5 < lora < 5.7, lora


def test_flux_loads_its_transformer_in_half_precision_where_it_stays_frozen_there(cpu_precision, scene_files, tmp_path,
                                                                               monkeypatch):
    """FLUX under LoRA: the transformer is loaded straight in the training's bf16 (24 GB
    less RAM for FLUX.1's), the precision the plan keeps it in anyway; in fp32 where the
    training is fp32 or full tuning trains it."""
    import scenebreak.train.trainer as trainer
    from scenebreak.device import Device
    from scenebreak.families import family_named
    from scenebreak.train.memory import denoiser_load_dtype
    from tinymodels import build_tiny_flux

    seen, seen_t5 = [], []
    real_init = trainer.Trainer.__init__

    def init(self, *args, **kwargs):
        seen.append(next(args[0].denoiser.parameters()).dtype)
        seen_t5.append(args[0].text_encoders[1].dtype)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(trainer.Trainer, "__init__", init)
    flux = build_tiny_flux(tmp_path / "flux")
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                   base_model=str(flux), name="flux")
    assert seen == [torch.bfloat16 if cpu_precision == "bf16" else torch.float32]
    assert seen_t5 == [torch.float32]  # T5 saved in fp32: loaded so (the fingerprint hashes its table)
    assert load_scene(result.path).meta["tuning"] == "lora"
    # Full tuning trains it: fp32 (the master weights), and so for SD, which is not loaded otherwise.
    full = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="full"),
                 base_model=str(flux), name="full")
    assert seen[-1] == torch.float32 and load_scene(full.path).meta["tuning"] == "full"
    # T5 saved in bf16, as the real FLUX folders hold it: loaded in bf16 too where the
    # transformer is, and the scene still matches its base as sampling loads it (fp32).
    from scenebreak import GenerateConfig, generate
    from scenebreak.families.base_model import load_components

    bf16_t5 = build_tiny_flux(tmp_path / "flux-bf16-t5", t5_dtype=torch.bfloat16)
    scene = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                  base_model=str(bf16_t5), name="bf16-t5")
    assert seen_t5[-1] == (torch.bfloat16 if cpu_precision == "bf16" else torch.float32)
    assert load_scene(scene.path).meta["base_model"]["fingerprint"] == load_components(str(bf16_t5)).base.fingerprint
    images = generate(scene.path, "a photo of <asset1>", GenerateConfig(num_images=1, steps=2, seed=0),
                      out_dir=tmp_path / "out")
    assert len(images.images) == 1
    cuda, cpu = Device("cuda", "cuda"), Device("cpu", "cpu")
    dev, sd = family_named("FLUX.1 dev"), family_named("SD 2.x")
    assert denoiser_load_dtype(LearnConfig(), dev, cuda, torch.bfloat16) == torch.bfloat16
    assert denoiser_load_dtype(LearnConfig(), sd, cuda, torch.bfloat16) is None
    assert denoiser_load_dtype(LearnConfig(standalone=True), dev, cuda, torch.bfloat16) is None
    assert denoiser_load_dtype(LearnConfig(memory="fast"), dev, cpu, torch.bfloat16) is None
    assert denoiser_load_dtype(LearnConfig(), dev, cuda, None) is None


def test_the_stored_precision_is_read_from_a_header_never_from_a_fifo(tmp_path):
    import os

    from scenebreak.families.base_model import stored_dtype
    from tinymodels import build_tiny_flux

    flux = build_tiny_flux(tmp_path / "flux", t5_dtype=torch.bfloat16)
    assert stored_dtype(flux / "text_encoder_2") == "BF16" and stored_dtype(flux / "transformer") == "F32"
    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "model.safetensors")
    assert stored_dtype(tmp_path / "fifo") is None and stored_dtype(tmp_path / "missing") is None  # returns, no hang


def test_out_of_memory_names_the_next_thing_to_try_and_whether_resume_continues(scene_files, tiny_model, monkeypatch):
    """Was "try --tune lora (with --resume to continue)" under --memory low, also to a run
    already on LoRA, and --resume refuses a changed --tune (it is part of what the
    checkpoint was made with): only --memory continues a run."""
    from types import SimpleNamespace

    import scenebreak.train.trainer as trainer_module
    from scenebreak.device import Device
    from scenebreak.train.learn import out_of_memory_hint

    cuda, cpu = Device("cuda", "cuda:0"), Device("cpu", "cpu")
    plan = lambda **k: SimpleNamespace(**{"policy": "low", "tune": "lora", "quantize": "none", **k})  # noqa: E731
    assert out_of_memory_hint(plan(policy="fast"), cuda) == "try --memory low (with --resume to continue), or --device cpu"
    assert out_of_memory_hint(plan(tune="full"), cuda).startswith("try --tune lora, or a smaller --resolution (either "
                                                                  "starts over)")
    assert out_of_memory_hint(plan(), cuda).startswith("try --quantize nf4")
    assert out_of_memory_hint(plan(quantize="nf4"), cuda) == "try a smaller --resolution (it starts over), or --device cpu"
    assert out_of_memory_hint(plan(), cpu) == "try a smaller --resolution (it starts over)"

    def out_of_memory(self, phase, steps):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    monkeypatch.setattr(trainer_module.Trainer, "train_step", out_of_memory)
    for args, hint in ((["--memory", "fast"], "--memory low (with --resume to continue)"),
                       (["--memory", "low", "--tune", "lora"], "a smaller --resolution (it starts over)")):
        result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                          "--base-model", str(tiny_model), "--no-prior", "--steps1", "2", "--steps2", "2",
                                          "--device", "cpu", "--force", *args])
        assert result.exit_code == 1, result.output
        assert result.stderr.strip().splitlines()[-1] == f"Error: out of memory on cpu: try {hint}"


def test_a_resume_keeps_the_bases_quantisation_that_auto_chose(scene_files, tiny_model, monkeypatch):
    """--resume may change --memory (after running out of memory), and with --memory low
    --quantize auto could then pick a 4-bit base: another base than the run trained on
    (and other class images) in the middle of a run. The checkpoint records the choice
    and auto keeps it, as it keeps --tune auto's."""
    from scenebreak.device import Device
    from scenebreak.errors import Interrupted
    from scenebreak.families import quantized
    from scenebreak.train import memory

    cuda = Device("cuda", "cuda:0")
    lora = LearnConfig(tune="lora", quantize="auto")
    monkeypatch.setattr(quantized, "quantization_available", lambda: True)
    assert memory.choose_quantization(lora, None, cuda, 512, True, True, [], resumed="none") == ("none", "")
    assert memory.choose_quantization(lora, None, cuda, 512, True, True, [], resumed="nf4") == (
        "nf4", "as in the run being resumed")

    seen = []
    real_choose = memory.choose

    def choose(*args, **kwargs):
        seen.append(args[5:] + tuple(kwargs.values()))
        return real_choose(*args, **kwargs)

    monkeypatch.setattr(memory, "choose", choose)
    config = LearnConfig(steps1=3, steps2=2, prior=False, tune="lora", rank=2)
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(Interrupted):
        learn(*args, base_model=str(tiny_model), name="q", device="cpu", should_stop=stop_after_first_step())
    learn(*args, base_model=str(tiny_model), name="q", device="cpu", resume=True)
    assert seen == [(None, None), ("lora", "none")]


def test_a_resume_on_another_device_or_precision_says_the_result_differs(scene_files, tiny_model):
    """`--resume --device cpu` after running out of memory on the GPU is allowed (the
    fix the message names) but was not said to give another scene than the run begun."""
    from scenebreak.errors import Interrupted
    from scenebreak.events import Message
    from scenebreak.paths import checkpoint_path

    config = LearnConfig(steps1=3, steps2=2, prior=False, mixed_precision="no")
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(Interrupted):
        learn(*args, base_model=str(tiny_model), name="moved", device="cpu", should_stop=stop_after_first_step())
    state = torch.load(checkpoint_path("moved"), weights_only=True)
    assert (state["device"], state["precision"]) == ("cpu", "fp32")
    state["device"], state["precision"] = "cuda", "bf16"  # as if begun on a GPU
    torch.save(state, checkpoint_path("moved"))
    said = []
    learn(*args, base_model=str(tiny_model), name="moved", device="cpu", resume=True, report=said.append)
    warnings = [e.text for e in said if isinstance(e, Message) and e.level == "warning"]
    assert any("resuming on cpu in fp32 a run that began on cuda in bf16" in w for w in warnings), warnings


def test_quantize_auto_never_holds_a_standalone_scenes_base_in_4_bits(monkeypatch):
    """--quantize nf4 is refused with --standalone (its adapters are baked into full
    weights), but auto picked NF4 for it where memory was short, and a resume with
    --standalone kept a checkpoint's NF4."""
    from types import SimpleNamespace

    from scenebreak.device import Device
    from scenebreak.errors import InvalidInput
    from scenebreak.families import quantized
    from scenebreak.train import memory

    cuda = Device("cuda", "cuda:0")
    monkeypatch.setattr(quantized, "quantization_available", lambda: True)
    monkeypatch.setattr(memory, "phase2_bytes", lambda *args, **kwargs: 100 * memory.GiB)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * memory.GiB)
    components = SimpleNamespace(models=lambda: [])
    assert memory.choose_quantization(LearnConfig(tune="lora"), components, cuda, 512, True, True, [])[0] == "nf4"
    standalone, warnings = LearnConfig(tune="lora", standalone=True), []
    assert memory.choose_quantization(standalone, components, cuda, 512, True, True, warnings) == ("none", "")
    assert len(warnings) == 1 and "without --standalone it could" in warnings[0]  # what did not fit is said
    with pytest.raises(InvalidInput, match="--standalone cannot resume this run"):
        memory.choose_quantization(standalone, components, cuda, 512, True, True, [], resumed="nf4")


@pytest.mark.parametrize("kind", ["cpu", "mps"])
def test_lora_that_cannot_fit_on_a_cpu_or_a_mac_is_warned_about(monkeypatch, kind):
    """FLUX.1 on a 32 GB Mac loaded its 48 GB of fp32 weights and swapped, or was ended
    by the system, after a plan line that said nothing."""
    from scenebreak.device import Device
    from scenebreak.train import memory

    sd21 = _sd21_counts()
    device = Device(type=kind, name=kind)
    config = LearnConfig(tune="lora")
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 * memory.GiB)
    assert not memory.choose(config, sd21, device, 512, None).warnings
    monkeypatch.setattr(memory, "available_bytes", lambda device: 2 * memory.GiB)
    [warning] = memory.choose(config, sd21, device, 512, None).warnings
    assert "LoRA may not fit even so" in warning and "2.0 GiB of" in warning


def test_adamw_is_fused_on_every_device_torch_has_the_kernel_for():
    """MPS has torch's fused AdamW too (it was left to the slower foreach steps there)."""
    from scenebreak.device import Device
    from scenebreak.train.optim import adamw_factory, fused_adamw_devices

    assert {"cpu", "cuda", "mps"} <= fused_adamw_devices()  # (this torch has MPS's kernel)
    weight = torch.nn.Parameter(torch.zeros(3))
    for kind in ("cpu", "mps"):  # (the optimizer is only built: the CPU tensor runs on any machine)
        optimizer = adamw_factory(LearnConfig(), Device(type=kind, name=kind))([{"params": [weight]}])
        assert optimizer.defaults["fused"] is True, kind


def test_attention_overlap_of_a_lora_scene_takes_where_its_base_is_now(scene_files, tiny_model, tmp_path):
    """Its error said "pass --base-model", which the Python function did not take."""
    import shutil

    from scenebreak.errors import SceneBreakError
    from scenebreak.evaluation.diagnostics import attention_overlap

    shutil.copytree(tiny_model, tmp_path / "base")
    scene = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="lora",
                                                                           rank=2), base_model=str(tmp_path / "base"))
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(SceneBreakError, match="base"):
        attention_overlap(scene.path, device="cpu")
    handles = attention_overlap(scene.path, device="cpu", base_model=str(tmp_path / "moved"))["handles"]
    assert [h["handle"] for h in handles] == ["<asset1>", "<asset2>"]
