"""A scene written under transformers 4 opens under 5 and the other way round
(families/versions.py): CLIPTextModel's weight names and the saved tokenizer files
changed between them. A scene written under 4.49 is kept in tests/data; elsewhere the
other version's names are made from the installed one's (the suite runs on 5; under 4
the same tests check the other direction)."""

import pytest
import torch
from PIL import Image

from helpers import DATA, craft
from scenebreak import GenerateConfig, generate, load_scene
from scenebreak.families.lora import add_lora, lora_settings, lora_state_dict, load_lora_state_dict
from scenebreak.families import family_named
from scenebreak.families.versions import CLIP_TEXT_PREFIX, tokenizer_class_for, with_model_key_names


def as_the_other_transformers(state: dict) -> dict:
    """CLIPTextModel's weights (or adapters) named as the other major version of
    transformers names them: with the `text_model.` prefix (4) or without (5)."""
    if all(key.startswith(CLIP_TEXT_PREFIX) for key in state):
        return {key.removeprefix(CLIP_TEXT_PREFIX): value for key, value in state.items()}
    return {CLIP_TEXT_PREFIX + key: value for key, value in state.items()}


def renamed_copy(scene_path, target):
    """A copy of a scene whose text encoder's weights carry the other version's names."""
    weights = load_scene(scene_path, weights=True).weights["text_encoder"]
    other = {f"text_encoder.{key}": value for key, value in as_the_other_transformers(weights).items()}
    return craft(scene_path, target, drop=[f"text_encoder.{key}" for key in weights], add=other)


def tiny_clip(cls_name="CLIPTextModel", seed=0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, projection_dim=16, bos_token_id=0, eos_token_id=1)
    return getattr(transformers, cls_name)(config)


def test_a_scene_written_under_transformers_4_opens_and_generates(tmp_path):
    """tests/data/transformers4-sd.scene: the tiny SD at 64 px, 2 + 2 steps, written
    under transformers 4.49 (its CLIP weights named `text_model.*`, its tokenizer
    saved as vocab.json + merges.txt by the slow class)."""
    old = DATA / "transformers4-sd.scene"
    scene = load_scene(old, weights=True)
    assert all(key.startswith(CLIP_TEXT_PREFIX) for key in scene.weights["text_encoder"])
    assert "file.tokenizer/vocab.json" not in scene.files and "tokenizer/vocab.json" in scene.files
    out = generate(old, "<asset1> and <asset2> on the moon", GenerateConfig(steps=2, seed=0), out_dir=tmp_path)
    with Image.open(out.images[0].path) as im:
        assert im.size == (64, 64)


def test_scene_weights_named_by_the_other_transformers_give_the_same_image(learned, tmp_path):
    """The session's scene with its CLIP weights named as the other version of
    transformers writes them samples exactly the same image."""
    other = renamed_copy(learned.path, tmp_path / "other.scene")
    config = GenerateConfig(steps=2, seed=3)
    images = [generate(path, "<asset1> on the moon", config, out_dir=tmp_path / path.stem).images[0].path
              for path in (learned.path, other)]
    with Image.open(images[0]) as a, Image.open(images[1]) as b:
        assert a.tobytes() == b.tobytes()


def test_clip_weights_load_whichever_transformers_named_them():
    source, target = tiny_clip(seed=1), tiny_clip(seed=2)
    own = source.state_dict()
    other = as_the_other_transformers(own)
    renamed = with_model_key_names(other, target.state_dict())
    assert set(renamed) == set(own) != set(other)
    target.load_state_dict(renamed, strict=True)
    assert all(torch.equal(target.state_dict()[key], own[key]) for key in own)


def test_names_that_differ_otherwise_are_left_for_the_caller_to_refuse():
    model_keys = {"encoder.layers.0.mlp.fc1.weight", "embeddings.token_embedding.weight"}
    with_projection = tiny_clip("CLIPTextModelWithProjection").state_dict()  # (named alike by 4 and 5)
    assert with_model_key_names(with_projection, with_projection) is with_projection
    for state in ({"text_model.encoder.layers.0.mlp.fc1.weight": 1, "embeddings.token_embedding.weight": 2},
                  {"something.else": 1}, {}):
        assert with_model_key_names(state, model_keys) is state
    same = {key: 0 for key in model_keys}
    assert with_model_key_names(same, model_keys) is same


def test_lora_adapters_saved_under_either_transformers_load():
    """A LoRA scene's text-encoder adapters (and a resumed learn's) saved under the
    other version of transformers load into the same layers."""
    settings = lora_settings(4, family_named("SD 2.x"))
    source, target = tiny_clip(seed=1), tiny_clip(seed=1)
    add_lora(torch.nn.Identity(), {"text_encoder": source}, {**settings, "unet_targets": []})
    add_lora(torch.nn.Identity(), {"text_encoder": target}, {**settings, "unet_targets": []})
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    saved = lora_state_dict(source)
    load_lora_state_dict(target, as_the_other_transformers(saved))
    assert all(torch.equal(lora_state_dict(target)[key], value) for key, value in saved.items())


def test_a_tokenizer_saved_as_tokenizer_json_alone_is_read_by_the_fast_class():
    """transformers 4's slow CLIPTokenizer cannot read what 5 saves (tokenizer.json
    alone); its fast twin can. With vocab.json there the family's class stays."""
    import transformers

    class CLIPTokenizer:  # transformers 4's slow class, by name
        pass

    assert tokenizer_class_for(CLIPTokenizer, {"tokenizer.json", "tokenizer_config.json"}) is transformers.CLIPTokenizerFast
    assert tokenizer_class_for(CLIPTokenizer, {"tokenizer.json", "vocab.json", "merges.txt"}) is CLIPTokenizer
    assert tokenizer_class_for(CLIPTokenizer, {"vocab.json", "merges.txt"}) is CLIPTokenizer
    assert tokenizer_class_for(transformers.T5TokenizerFast, {"tokenizer.json"}) is transformers.T5TokenizerFast


def test_a_full_scene_from_the_other_transformers_exports_the_same_lora(learned, tmp_path):
    """export -f a1111 takes a full scene's difference from its base, whose CLIP
    weights are named by the transformers that loads it: the other's names match them."""
    from safetensors.torch import load_file

    from scenebreak.exports.export import export

    other = renamed_copy(learned.path, tmp_path / "other.scene")
    loras = []
    for path in (learned.path, other):
        export(path, tmp_path / path.stem, "a1111")
        files = [f for f in (tmp_path / path.stem).rglob("*.safetensors") if "lora" in f.name.lower()]
        assert len(files) == 1, files
        loras.append(load_file(files[0]))
    assert any(key.startswith("lora_te") for key in loras[0]) and loras[0].keys() == loras[1].keys()
    assert all(torch.equal(loras[0][key], loras[1][key]) for key in loras[0])


def test_a_learn_checkpointed_under_the_other_transformers_resumes_to_the_same_scene(scene_files, tiny_model):
    """An upgrade between a Ctrl-C and --resume: the checkpoint's CLIP weights carry the
    other version's names, and the resumed scene is the one learned straight through."""
    from helpers import Killed, kill_at

    from scenebreak import LearnConfig, learn
    from scenebreak.paths import checkpoint_path

    config = LearnConfig(steps1=2, steps2=3, prior=False, checkpoint_every=1)
    args = (scene_files["image"], scene_files["masks"], config)
    whole = learn(*args, base_model=str(tiny_model), name="whole")
    with pytest.raises(Killed):
        learn(*args, base_model=str(tiny_model), name="cut", report=kill_at(2, 2))
    path = checkpoint_path("cut")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state["text_encoder"] = as_the_other_transformers(state["text_encoder"])
    torch.save(state, path)
    resumed = learn(*args, base_model=str(tiny_model), name="cut", resume=True)
    a, b = load_scene(whole.path, weights=True), load_scene(resumed.path, weights=True)
    assert torch.equal(a.embeddings, b.embeddings)
    for key, value in a.weights["text_encoder"].items():
        assert torch.equal(value, b.weights["text_encoder"][key]), key


# ComfyUI recognises a CLIP-L text encoder by this weight (comfy/sd.py, detect_te_model):
# a folder without it loads no text encoder there.
COMFYUI_CLIP_L_KEY = "text_model.encoder.layers.0.mlp.fc1.weight"


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux"])
def test_exported_diffusers_folders_name_clip_as_the_hub_does(family, learned, learned_sdxl, tmp_path):
    """`export -f diffusers` writes CLIP-L under the hub's names (`text_model.` first),
    whatever transformers saved it: ComfyUI's loader and transformers 4 read those, and
    transformers 5 too; the weights are the scene's."""
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from scenebreak.exports.export import export_scene

    if family == "flux":
        from tinymodels import build_tiny_flux
        from helpers import learn_once
        from scenebreak import LearnConfig

        source = learn_once(tmp_path / "flux", build_tiny_flux(tmp_path / "flux-base"),
                            LearnConfig(steps1=1, steps2=1, prior=False, tune="full")).path
    else:
        source = {"sd": learned, "sdxl": learned_sdxl}[family].path
    [folder] = export_scene(source, tmp_path / "pipe", "diffusers")
    stored = load_file(folder / "text_encoder" / "model.safetensors")
    assert COMFYUI_CLIP_L_KEY in stored and all(key.startswith(CLIP_TEXT_PREFIX) for key in stored)
    loaded = CLIPTextModel.from_pretrained(folder / "text_encoder").state_dict()
    stored = with_model_key_names(stored, loaded)
    assert all(torch.equal(value, stored[key].to(value.dtype)) for key, value in loaded.items())
    ours = with_model_key_names(load_scene(source, weights=True).weights["text_encoder"], loaded)
    assert all(torch.equal(stored[key], ours[key].to(stored[key].dtype)) for key in loaded)
    if family == "sdxl":  # (CLIPTextModelWithProjection: named so by every version)
        assert all(key.startswith(CLIP_TEXT_PREFIX) or key == "text_projection.weight"
                   for key in load_file(folder / "text_encoder_2" / "model.safetensors"))


def test_a_base_folder_saved_by_either_transformers_loads_its_clip_exactly(tmp_path):
    """A base-model folder whose CLIP weights carry the other version's names (a folder
    saved under 5, read under 4, where transformers alone leaves them at random) loads
    its own weights; so does one with the hub's names."""
    from safetensors.torch import load_file, save_file

    from scenebreak.families.base_model import load_components
    from tinymodels import build_tiny_model

    folder = build_tiny_model(tmp_path / "sd")
    file = folder / "text_encoder" / "model.safetensors"
    hub = {key: value.clone() for key, value in load_file(file).items()}  # (not views of a file rewritten below)
    assert COMFYUI_CLIP_L_KEY in hub  # (the tiny models are saved as the hub's folders are)
    for stored in (hub, {key.removeprefix(CLIP_TEXT_PREFIX): value for key, value in hub.items()}):
        save_file(stored, str(file.with_suffix(".new")), metadata={"format": "pt"})
        file.with_suffix(".new").replace(file)  # (a new file: the last load may still map the old one)
        loaded = load_components(str(folder)).text_encoders[0].state_dict()
        expected = with_model_key_names(stored, loaded)
        assert all(torch.equal(value, expected[key]) for key, value in loaded.items())


def test_a_flux_scene_written_under_transformers_5_opens_and_generates(tmp_path):
    """tests/data/transformers5-flux.scene: the tiny FLUX.1-dev at 64 px, 2 + 2 steps,
    written under transformers 5.25 (CLIP's weights without the prefix; tokenizers as
    tokenizer.json alone; T5's sentinels listed as `extra_special_tokens`, which 4 read
    as a dict and failed on). Under 4 (the floors pass) it opens too."""
    import json

    scene = load_scene(DATA / "transformers5-flux.scene", weights=True)
    assert not any(key.startswith(CLIP_TEXT_PREFIX) for key in scene.weights["text_encoder"])
    config = json.loads(scene.files["tokenizer_2/tokenizer_config.json"])
    assert isinstance(config["extra_special_tokens"], list) and "tokenizer_2/spiece.model" not in scene.files
    out = generate(scene.path, "<asset1> on the moon", GenerateConfig(steps=2, seed=0), out_dir=tmp_path)
    with Image.open(out.images[0].path) as im:
        assert im.size == (64, 64)


def test_a_t5_tokenizer_config_from_transformers_5_reads_under_4(monkeypatch):
    import transformers

    from scenebreak.families.versions import tokenizer_overrides

    written = {"extra_special_tokens": ["<extra_id_0>", "<extra_id_1>"], "eos_token": "</s>"}
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    assert tokenizer_overrides(written) == {}  # (5 reads its own)
    monkeypatch.setattr(transformers, "__version__", "4.49.0")
    assert tokenizer_overrides(written) == {"extra_special_tokens": {},
                                            "additional_special_tokens": ["<extra_id_0>", "<extra_id_1>"]}
    assert tokenizer_overrides({"extra_special_tokens": {"image_token": "<image>"}}) == {}  # (4's own form)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_exported_folders_name_tokenizers_either_transformers_reads(family, learned, tmp_path):
    """A tokenizer saved by transformers 5 is tokenizer.json alone: model_index.json then
    names the fast class (4's slow CLIPTokenizer cannot read it; both have the fast
    one), and T5's sentinels are written as 4 reads them; diffusers still loads it."""
    import json

    from scenebreak.exports.export import export_scene

    source = learned.path if family == "sd" else DATA / "transformers5-flux.scene"
    [folder] = export_scene(source, tmp_path / "pipe", "diffusers")
    index = json.loads((folder / "model_index.json").read_text())
    for name in ("tokenizer", "tokenizer_2") if family == "flux" else ("tokenizer",):
        files = {p.name for p in (folder / name).iterdir()}
        assert "vocab.json" in files or index[name][1].endswith("Fast"), (name, index[name], files)
        config = json.loads((folder / name / "tokenizer_config.json").read_text())
        assert not isinstance(config.get("extra_special_tokens"), list)
    if family == "flux":
        from diffusers import FluxPipeline

        pipe = FluxPipeline.from_pretrained(folder)
        assert pipe.tokenizer_2("a <extra_id_3>").input_ids[-2] == pipe.tokenizer_2.convert_tokens_to_ids("<extra_id_3>")
        assert len(pipe.tokenizer_2.additional_special_tokens if hasattr(pipe.tokenizer_2, "additional_special_tokens")
                   else pipe.tokenizer_2.extra_special_tokens) == 100
