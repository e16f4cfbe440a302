"""FLUX's T5 loads after the memory plan (load_components' `defer`, load_deferred), so
that `learn` can move the frozen transformer to a CUDA GPU first and the host never
holds both (24 + 9.5 GB in bf16): the fingerprint and the loaded weights are those of
an ordinary load, the plan sees T5's sizes, and the transformer moves before T5 loads
where it goes to a GPU as it is."""

from __future__ import annotations

import pytest
import torch

from scenebreak import LearnConfig, learn


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    from tinymodels import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "dev")


def test_a_deferred_text_encoder_loads_as_an_ordinary_load_does(flux, tmp_path):
    from scenebreak.families.base_model import load_components, load_deferred
    from tinymodels import build_tiny_flux

    ordinary = load_components(str(flux))
    deferred = load_components(str(flux), defer=("text_encoder_2",))
    t5 = deferred.text_encoders[1]
    assert t5.device.type == "meta" and set(deferred.deferred) == {"text_encoder_2"}
    assert sum(p.numel() for p in t5.parameters()) == sum(p.numel() for p in ordinary.text_encoders[1].parameters())
    # The fingerprint, which scenes and checkpoints match by, read from T5's files.
    assert deferred.base.fingerprint == ordinary.base.fingerprint

    load_deferred(deferred)
    loaded, expected = deferred.text_encoders[1], ordinary.text_encoders[1]
    assert deferred.deferred == {} and loaded is not t5 and not loaded.training
    assert loaded.get_input_embeddings().weight.shape[0] > len(deferred.tokenizers[1])  # T5's spare rows kept
    assert loaded.config.eos_token_id == expected.config.eos_token_id
    for (name, a), (_, b) in zip(expected.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b) and not b.requires_grad, name

    # T5 stored in bf16, as the real folders hold it: in bf16 where asked, in fp32 where the
    # plan tunes it or keeps frozen weights in fp32 (transformers 5 would load the files' bf16).
    bf16_t5 = str(build_tiny_flux(tmp_path / "bf16-t5", t5_dtype=torch.bfloat16))
    for widen, dtype in ((False, torch.bfloat16), (True, torch.float32)):
        components = load_components(bf16_t5, text_encoder_dtypes={"text_encoder_2": torch.bfloat16}, defer=("text_encoder_2",))
        assert components.base.fingerprint == load_components(bf16_t5).base.fingerprint
        load_deferred(components, widen=widen)
        assert components.text_encoders[1].dtype == dtype


def test_learn_plans_with_t5_unloaded_and_loads_it_after_making_room(flux, scene_files, monkeypatch):
    import scenebreak.train.learn as learn_module
    import scenebreak.train.memory as memory

    seen = []
    real_choose, real_room = memory.choose, learn_module._make_room_for_deferred

    def choose(config, components, *args, **kwargs):
        seen.append(("plan", components.text_encoders[1].device.type))
        return real_choose(config, components, *args, **kwargs)

    def room(components, *args):
        seen.append(("room", components.text_encoders[1].device.type))
        return real_room(components, *args)

    monkeypatch.setattr(memory, "choose", choose)
    monkeypatch.setattr(learn_module, "_make_room_for_deferred", room)
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                   base_model=str(flux), name="deferred", device="cpu")
    assert seen == [("plan", "meta"), ("room", "meta")] and result.path.is_file()


@pytest.mark.parametrize("tune, half_frozen, quantize, moves", [
    ("lora", True, "none", True), ("lora", True, "nf4", True),
    ("lora", False, "none", False),  # frozen weights kept in fp32: they widen first, on the host
    ("full", False, "none", False),
])
def test_the_frozen_transformer_leaves_the_host_for_a_gpu_before_t5_loads(flux, monkeypatch, tune, half_frozen,
                                                                         quantize, moves):
    from dataclasses import replace

    from scenebreak.device import Device
    from scenebreak.errors import OutOfMemory
    from scenebreak.families.base_model import load_components
    from scenebreak.train.learn import _make_room_for_deferred
    from scenebreak.train.memory import choose

    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    components = load_components(str(flux), defer=("text_encoder_2",))
    cuda = Device(type="cuda", name="cuda")
    plan = replace(choose(LearnConfig(tune="lora"), components, Device("cpu", "cpu"), 64, None), tune=tune,
                   half_frozen=half_frozen, quantize=quantize)
    moved = []
    monkeypatch.setattr(components.denoiser, "to", lambda *args, **kwargs: moved.append(args))  # (no GPU here)
    _make_room_for_deferred(components, plan, cuda, torch.bfloat16)
    assert moved == ([(cuda.torch,)] if moves else [])
    packed = any(type(m).__module__.startswith("bitsandbytes") for m in components.denoiser.modules())
    assert packed == (quantize != "none")  # quantised before the move, which packs it
    assert components.text_encoders[1].device.type == "meta"  # T5 is still to load
    _make_room_for_deferred(components, plan, Device("cpu", "cpu"), torch.bfloat16)  # on the CPU nothing moves early
    assert len(moved) == (1 if moves else 0)

    if moves:  # a GPU too small for it: learn's out-of-memory line, not a traceback
        def too_big(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

        monkeypatch.setattr(components.denoiser, "to", too_big)
        with pytest.raises(OutOfMemory, match="out of memory on cuda: try"):
            _make_room_for_deferred(components, plan, cuda, torch.bfloat16)


@pytest.fixture(scope="module")
def flux_lora_scene(tmp_path_factory, flux):
    from helpers import learn_once

    return learn_once(tmp_path_factory.mktemp("flux-lora"), flux, LearnConfig(steps1=1, steps2=1, prior=False, lr_lora=1e-2)).path


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_sampling_a_lora_scene_on_a_gpu_loads_t5_after_the_transformer_left_the_host(flux_lora_scene, monkeypatch,
                                                                                    quantize):
    from scenebreak import load_scene
    from scenebreak.device import Device
    from scenebreak.families import base_model
    from scenebreak.sample import scene_models

    if quantize != "none":
        pytest.importorskip("bitsandbytes")
    scene = load_scene(flux_lora_scene, weights=True, device="cpu")
    vocabularies = [len(t) for t in scene_models.scene_tokenizers(scene)]
    plain = scene_models.base_with_lora(scene, None, vocabularies, torch.bfloat16)  # no device: nothing deferred
    events, real_load = [], base_model.load_deferred

    def load_deferred(components, *args):
        events.append("T5 loads")
        return real_load(components, *args)

    monkeypatch.setattr(base_model, "load_deferred", load_deferred)
    monkeypatch.setattr(scene_models, "to_device", lambda model, device, dtype: events.append(type(model).__name__) or model)
    denoiser, _, encoders = scene_models.base_with_lora(scene, None, vocabularies, torch.bfloat16, quantize=quantize,
                                                        device=Device(type="cuda", name="cuda"))  # (the move is faked)
    assert events == ["FluxTransformer2DModel", "T5 loads"]
    assert [e.get_input_embeddings().weight.shape for e in encoders] == [e.get_input_embeddings().weight.shape
                                                                         for e in plain[2]]  # resized for the handles
    if quantize == "none":  # the same merged weights as without deferring (the handles' new rows are the caller's)
        handles = len(scene.tokens)
        for a, b in zip((plain[0], *plain[2]), (denoiser, *encoders)):
            for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
                new_rows = x.shape[0] in vocabularies and x.ndim == 2
                assert torch.equal(x[:-handles], y[:-handles]) if new_rows else torch.equal(x, y), name
    else:  # T5 quantised once loaded; the adapters beside the packed layers are never quantised themselves
        assert {type(m).__name__ for n, m in encoders[1].named_modules()
                if "Linear" in type(m).__name__ and not n.endswith(".wo")} == {"Linear4bit"}  # (wo: never)
        to_q = denoiser.transformer_blocks[0].attn.to_q
        assert type(to_q.base_layer).__name__ == "Linear4bit" and type(to_q.lora_A["default"]) is torch.nn.Linear


@pytest.mark.parametrize("damage", ["garbled", "other config"])
def test_a_damaged_t5_is_one_line_before_anything_loads_after_it(flux, scene_files, tmp_path, damage):
    """T5's files are read for the fingerprint before the plan (a garbled file), or load
    after it (a config from another model): either way the one line of a base model that
    does not load, naming the fix."""
    import json
    import shutil

    from scenebreak.errors import ModelNotAvailable

    model = tmp_path / "flux"
    shutil.copytree(flux, model)
    t5 = model / "text_encoder_2"
    if damage == "garbled":
        for path in t5.glob("*.safetensors"):
            path.write_bytes(b"not a safetensors file" * 10)
    else:
        config = json.loads((t5 / "config.json").read_text())
        config["d_ff"] += 8
        (t5 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotAvailable, match=f"cannot load the base model from {model}.*Fix: copy the model there again"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
              base_model=str(model), name=f"damaged-{damage.split()[0]}", device="cpu")
