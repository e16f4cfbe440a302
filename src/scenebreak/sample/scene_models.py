"""A learned scene's models, ready to sample: rebuilt from the scene's own weights,
or for a LoRA scene, its base model with the adapters merged in; and the pipeline
of its family over them."""

from __future__ import annotations

import os
import re

from ..config import MAX_HANDLES
from ..device import Device
from ..errors import BundleError, InvalidInput, ModelNotAvailable
from ..families.versions import with_model_key_names
from ..kept import one_builder_at_a_time
from ..scenes.bundle import Scene, load_scene, tokenizer_from_files


def scene_tokenizers(scene: Scene) -> list:
    """The scene's tokenizers (handles included), one per text encoder of its family."""
    return [tokenizer_from_files(scene.files, folder, scene.family) for folder in scene.family.tokenizers]


@one_builder_at_a_time
def scene_components(scene: Scene, device: Device, dtype=None, base_model: str | None = None, tokenizers=None,
                     quantize: str = "none", report=None):
    """Denoiser, VAE, text encoders and tokenizers (lists: two on SDXL) of a scene on
    `device` in `dtype` (default: the device's sampling precision); `base_model` says
    where a LoRA scene's base model is, if not where the scene recorded it;
    `tokenizers` are the scene's, if already built. `quantize` (a LoRA scene of a
    family whose usual tuning is LoRA): its base held in "nf4" or "int8" under the
    adapters, as `learn --quantize` trains it, or "auto": NF4 on a GPU its weights in
    `dtype` would not fit (said through `report`)."""
    import torch

    from ..families import pool_at_end_of_text

    if not scene.weights:
        if report is not None and not scene.needs_base_model and scene.path is not None:
            from ..events import Message  # (gigabytes to read: said before, not a silent minute)

            from ..estimates import format_bytes

            try:
                size = f" ({format_bytes(scene.path.stat().st_size)})"
            except OSError:  # (deleted meanwhile, say by `rm`: load_scene says so)
                size = ""
            report(Message(f"loading the weights of scene {scene.name!r}{size}"))
        # A LoRA scene's adapters are merged on the CPU, where its base model loads.
        first = scene
        scene = load_scene(scene.path, weights=True, device="cpu" if scene.needs_base_model else str(device.torch))
        if first.stamp is not None and scene.stamp != first.stamp:
            # (its handles and tokenizer, already in use, are the first file's)
            raise BundleError(f"{scene.path} was replaced since it was opened (another learn writing it?): run again")
    dtype = dtype or device.infer_dtype()
    family = scene.family
    tokenizers = tokenizers or scene_tokenizers(scene)
    if scene.needs_base_model:
        denoiser, vae, text_encoders = base_with_lora(scene, base_model, [len(t) for t in tokenizers], dtype,
                                                      quantize=quantize, device=device, report=report)
    else:
        denoiser, vae, text_encoders = own_weights(scene, dtype)
    for model in (denoiser, vae, *text_encoders):
        to_device(model, device, dtype).eval().requires_grad_(False)
    vae.to(family.sampling_vae_dtype(vae, dtype))
    for tokenizer, text_encoder, rows in zip(tokenizers, text_encoders, scene.handle_embeddings):
        pool_at_end_of_text(text_encoder, tokenizer)  # older scenes recorded the legacy config
        emb = text_encoder.get_input_embeddings().weight
        ids = handle_ids(scene, tokenizer, emb.shape)
        if rows.shape[1] != emb.shape[1]:
            raise BundleError(f"{scene.path or scene.name} is not a valid scene: its handles' embeddings are "
                              f"{rows.shape[1]} wide, its text encoder's {emb.shape[1]}")
        with torch.no_grad():
            emb[ids] = rows.to(emb.device, emb.dtype)
    return denoiser, vae, text_encoders, tokenizers


def handle_ids(scene: Scene, tokenizer, table: tuple[int, int]) -> list[int]:
    """The rows of the handles in a text encoder's embedding table of shape `table`, as
    the scene's tokenizer gives them. A stranger's tokenizer that lacks a handle maps it
    to its unknown token (CLIP's end of text: its row would be overwritten, and the
    handle read as pieces of text), and one with ids past the table fails in the
    encoder: both are refused, as a damaged scene."""
    ids = tokenizer.convert_tokens_to_ids(scene.tokens)
    lost = any(not isinstance(i, int) or i == tokenizer.unk_token_id or not 0 <= i < table[0] for i in ids)
    if lost or len(set(ids)) != len(ids):
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its tokenizer and text encoder disagree on "
                          "the handles")
    if max(tokenizer.get_vocab().values(), default=0) >= table[0]:
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its tokenizer has tokens past its text "
                          f"encoder's {table[0]} rows")
    return ids


def to_device(model, device: Device, dtype):
    """`model` on `device` in `dtype`; the weights of a quantised layer move (and are
    packed by the move) but are never cast, and the layers the model's library keeps in
    fp32 stay there (device.hold_in_fp32: T5's `wo` in fp16 overflows, and FLUX.1's T5
    then gives clamped or NaN prompt states; the model's forward casts its input to
    such a layer's dtype itself)."""
    from ..device import hold_in_fp32, is_bitsandbytes_weight
    from ..families.quantized import has_quantized_layers

    if not has_quantized_layers(model):
        model.to(device.torch, dtype)
    else:
        model.to(device.torch)
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype and not is_bitsandbytes_weight(param):
                param.data = param.data.to(dtype)
    hold_in_fp32([model], dtype)
    return model


def sampling_quantization(components, device: Device, dtype, asked: str) -> tuple[str, str]:
    """How a LoRA scene's base is held to sample (none, nf4, int8) and why: as asked;
    with auto, NF4 on a GPU where its weights in `dtype` would not fit (FLUX.1's
    transformer and T5 are 34 GB in bf16: no 24 GB card holds them), if bitsandbytes is
    there (else a note saying how to get it, and the full weights are tried)."""
    import torch

    from ..families.quantized import QUANTIZE_HINT, quantization_available, require_quantization

    if asked in ("none", "nf4", "int8"):
        if asked != "none":
            require_quantization(f"sampling in {asked}", device)
        return asked, ""
    if device.type != "cuda" or components.family.default_tune != "lora":
        return "none", ""
    size = torch.empty((), dtype=dtype).element_size()
    need = size * sum(p.numel() for model in components.models() for p in model.parameters())
    free, _ = torch.cuda.mem_get_info(device.torch)
    GiB = 2**30
    if need <= 0.85 * free:
        return "none", ""
    why = f"its weights need about {need / GiB:.1f} GiB in {str(dtype).removeprefix('torch.')}, {free / GiB:.1f} GiB is free"
    if not quantization_available():
        return "none", f"{why}: with bitsandbytes ({QUANTIZE_HINT}) its base would be held in 4 bits"
    return "nf4", f"sampling with the base in nf4: {why}"


def own_weights(scene: Scene, dtype):
    """Denoiser, VAE and text encoders of a self-contained scene, built empty from the
    recorded configs and filled with its weights."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    configs = {name: model_config(config) for name, config in scene.meta["configs"].items()}
    names = scene.family.text_encoders
    try:
        with init_empty_weights():  # no random init of weights we overwrite anyway
            denoiser = scene.family.denoiser_class().from_config(configs[scene.family.denoiser])
            vae = AutoencoderKL.from_config(configs["vae"])
            text_encoders = []
            for name in names:
                cls = scene.family.text_encoder_class(name)
                text_encoders.append(cls(cls.config_class(**configs[name])))
    except Exception as exc:  # a config with values no model has (0 heads, negative widths): many error types
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its model configs do not build a model "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    for model, name in ((denoiser, scene.family.denoiser), (vae, "vae"), *zip(text_encoders, names)):
        expected = model.state_dict()
        state = with_model_key_names(scene.weights[name], expected)  # (written under another transformers)
        check_weights_fit(scene, name, expected, state)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        model.load_state_dict(state, assign=True, strict=True)
    return denoiser, vae, text_encoders


# Config keys that would choose code, kernels or files to fetch (transformers loads a hub
# kernel named by attn_implementation): a scene's configs only size its models.
UNSAFE_CONFIG_KEYS = ("auto_map", "attn_implementation", "_attn_implementation", "_attn_implementation_internal",
                      "_attn_implementation_autoset", "quantization_config", "_name_or_path")


def model_config(config: dict) -> dict:
    """A recorded model config without the keys that are not the model's shape."""
    return {key: value for key, value in config.items() if key not in UNSAFE_CONFIG_KEYS}


STORED_FLOATS = ("torch.float16", "torch.bfloat16", "torch.float32")


def check_weights_fit(scene: Scene, component: str, expected: dict, state: dict) -> None:
    """The scene's `component` tensors have exactly the names and shapes of the model
    its config builds (`expected`: that model's state dict, on the meta device when
    built empty), and dtypes a scene stores: a stranger's scene is refused in one
    line, not with torch's multi-line loading errors."""
    def fail(why: str):
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its {component} weights {why}")

    missing, unknown = [k for k in expected if k not in state], [k for k in state if k not in expected]
    if missing or unknown:
        fail(f"do not fit its config ({len(missing)} missing{f', e.g. {missing[0][:60]!r}' if missing else ''}; "
             f"{len(unknown)} unknown{f', e.g. {unknown[0][:60]!r}' if unknown else ''})")
    for key, want in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(want.shape):
            fail(f"do not fit its config ({key[:60]!r} is {tuple(got.shape)}, the config makes {tuple(want.shape)})")
        if (str(got.dtype) not in STORED_FLOATS) if want.is_floating_point() else got.dtype != want.dtype:
            fail(f"hold {key[:60]!r} as {got.dtype}, not a dtype a scene stores")


def scene_base_model(scene: Scene, base_model: str | None, who: str, what: str, half=None, defer: tuple[str, ...] = (),
                     report=None):
    """The base model's Components a scene was learned on, from where it recorded it
    or `base_model`, checked by fingerprint; `who` needs it, for `what` (messages).
    `half` (a half-precision dtype): where the family's usual tuning is LoRA (FLUX.1),
    the denoiser, and the text encoders without adapters whose files hold `half`, load
    straight in it: FLUX.1's base then takes 34 GB of RAM, not 67, and, its weights
    being published in bf16, merging the adapters in it gives the very weights that
    merging in fp32 and casting would. The text encoders in `defer` wait for
    load_deferred (load_components). `report` hears a warning where the model's stored
    weights are not those the scene was learned on."""
    from ..config import default_base_model
    from ..families.base_model import load_components, resolve_model_dir, text_encoder_load_dtypes

    base = scene.meta["base_model"]
    base_model = os.fspath(base_model) if base_model is not None else None  # (a Path from Python)
    half = half if scene.family.default_tune == "lora" else None
    try:
        if base_model:
            model, revision = base_model, None
            resolved = resolve_model_dir(model)
        else:
            model, revision, resolved = base["id"], *_scene_named_base(base, default_base_model())
        _check_family(scene, resolved[0], base_model or base["id"])
        c = load_components(model, revision, resolved, denoiser_dtype=half,
                            text_encoder_dtypes=text_encoder_load_dtypes(scene.family, resolved[0], half), defer=defer)
    except (InvalidInput, ModelNotAvailable) as exc:
        fix = "" if "--base-model" in str(exc) else " (if it moved, pass --base-model with where it is now)"
        # The folder the scene recorded, gone or changed, is a model not available (exit 1,
        # as a hub model not downloaded is), not bad input: the input was --base-model only.
        error = type(exc) if base_model else ModelNotAvailable
        raise error(f"{who} needs its base model: {exc}{fix}") from None
    if not c.base.matches(base):
        raise BundleError(f"scene {scene.name!r} was learned on another base model than {base_model or base['id']} "
                          f"({what} need that exact model): pass --base-model with the right one")
    if report is not None and c.base.other_weights(base):
        from ..events import Message

        report(Message(f"the base model {base_model or base['id']} has the architecture and vocabulary scene "
                       f"{scene.name!r} was learned on but other weights (a fine-tune of it, or a copy in another "
                       f"precision): {what} are taken against it all the same; for the results the scene was learned "
                       "for, pass --base-model with the model it was learned on", "warning"))
    return c


def _check_family(scene: Scene, folder, named: str) -> None:
    """A base model of another family than the scene's is refused from its configs,
    before its weights load (an SDXL scene given a FLUX.1 folder read 34 GB first)."""
    from ..families import detect_family

    family = detect_family(folder, f"the base model {named}")
    if type(family) is not type(scene.family):
        raise BundleError(f"scene {scene.name!r} was learned on {scene.family.name}, but {named} is {family.name}: "
                          "pass --base-model with the model it was learned on")


def _scene_named_base(base: dict, default: str) -> tuple[str | None, tuple]:
    """(revision, resolve_model_dir's answer) for the base model a scene names, on the
    scene's word alone. From the cache: the commit it was learned on. Downloaded: only
    a documented base, at the default branch or the plain branch name it recorded,
    never a commit or a ref of the scene's choosing (anyone can open a pull request on
    a public model, and its commits download by their hash). A network path (\\\\host\\
    share, //host/share) is never opened: on Windows that alone sends the user's
    credentials to the host."""
    from ..families import KNOWN_BASES
    from ..families.base_model import resolve_model_dir

    model = base["id"]
    if model.startswith(("\\\\", "//")):
        raise BundleError(f"the scene names a base model on a network share ({model[:60]!r}): pass --base-model "
                          "with a copy of it here")
    commit, branch = base.get("commit"), base.get("revision")
    commit = commit if isinstance(commit, str) and re.fullmatch(r"[0-9a-f]{40}", commit) else None
    branch = branch if isinstance(branch, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", branch) and \
        ".." not in branch else None
    try:
        return commit or branch, resolve_model_dir(model, commit or branch, download=False)
    except ModelNotAvailable as missing:
        not_cached = missing
    if commit:
        # That commit's snapshot has left the cache (pruned, the branch moved on): the
        # branch's own, if cached (the fingerprint check then says if it is the same model).
        try:
            return branch, resolve_model_dir(model, branch, download=False)
        except ModelNotAvailable:
            pass
    if model not in (*KNOWN_BASES, default):
        raise not_cached
    return branch, resolve_model_dir(model, branch, download=True)


def base_with_lora(scene: Scene, base_model: str | None, vocabularies: list[int], dtype=None, quantize: str = "none",
                   device: Device | None = None, report=None):
    """The base model a LoRA scene was learned on (checked by fingerprint), with the
    scene's adapters merged into its weights; `dtype` is the precision it will sample in
    (scene_base_model loads FLUX.1's base straight in a half one). With a quantised base
    (`quantize`, see scene_components) the adapters stay beside the packed layers, as in
    training: a 4-bit weight cannot take them in."""
    import torch

    from ..events import Message
    from ..families.base_model import load_deferred
    from ..families.lora import add_lora, load_lora_state_dict, merge_lora
    from ..families.quantized import quantize_adapterless_encoders, quantize_denoiser

    half = dtype if dtype in (torch.bfloat16, torch.float16) else None
    # On a CUDA GPU the text encoders without adapters (FLUX's T5) load once the denoiser
    # has left the host for it, as `learn` does them: the host never holds both.
    defer = tuple(scene.family.adapterless_text_encoders()) if half and device is not None and device.type == "cuda" else ()
    if report is not None:
        report(Message(f"loading its base model {base_model or scene.meta['base_model']['id']}"))
    c = scene_base_model(scene, base_model, f"LoRA scene {scene.name!r}", "its LoRA adapters", half=half, defer=defer,
                         report=report)
    kind, why = ("none", "") if device is None else sampling_quantization(c, device, dtype, quantize)
    if why and report is not None:
        report(Message(why, "warning" if kind == "none" else "info"))
    if kind != "none":
        quantize_denoiser(c, kind, dtype)
    try:
        add_lora(c.denoiser, dict(zip(c.family.text_encoders, c.text_encoders)), scene.meta["lora"], empty=True)
    except ValueError as exc:  # peft: a target that fits no layer, or a layer it cannot adapt
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its LoRA targets do not fit its base "
                          f"model ({str(exc).splitlines()[0][:120]})") from None
    models = dict(((c.family.denoiser, c.denoiser), *zip(c.family.text_encoders, c.text_encoders)))
    for component in scene.weight_components:  # the denoiser's adapters, and each adapted encoder's
        load_lora_state_dict(models[component.removesuffix("_lora")], scene.weights[component],
                             lambda expected, state, component=component: check_weights_fit(scene, component, expected,
                                                                                          state))
    if kind == "none":
        for model in (c.denoiser, *c.text_encoders):
            merge_lora(model)  # plain layers again: no adapter cost per step
    if c.deferred:
        to_device(c.denoiser, device, dtype)
        load_deferred(c)
    if kind != "none":
        quantize_adapterless_encoders(c, kind, dtype)  # (the denoiser was, before its adapters went in)
    for text_encoder, vocabulary in zip(c.text_encoders, vocabularies):
        rows = text_encoder.get_input_embeddings().weight.shape[0]
        if vocabulary > rows + MAX_HANDLES:  # the scene's tokenizer would size the table: only its handles are new
            raise BundleError(f"{scene.path or scene.name} is not a valid scene: its tokenizer has {vocabulary} tokens, "
                              f"{vocabulary - rows} more than its base model's text encoder")
        text_encoder.resize_token_embeddings(vocabulary, mean_resizing=False)  # the handle rows are set by the caller
    return c.denoiser, c.vae, c.text_encoders


@one_builder_at_a_time  # (diffusers' lazy imports of its samplers race too: one importer at a time)
def open_pipeline(scene: Scene, device: Device, base_model: str | None = None, dtype=None, scheduler: str = "dpm",
                  tokenizers=None, quantize: str = "auto", report=None):
    """A text-to-image pipeline of the scene's family over its models, sampling with
    `scheduler` (`tokenizers`: the scene's, if already built; `quantize`: see
    scene_components)."""
    from ..hub import quiet_libraries
    from .pipeline import make_pipeline

    quiet_libraries()
    denoiser, vae, text_encoders, tokenizers = scene_components(scene, device, dtype=dtype, base_model=base_model,
                                                                tokenizers=tokenizers, quantize=quantize, report=report)
    if device.type == "cuda":
        import torch

        denoiser.to(memory_format=torch.channels_last)  # faster convolutions with cuDNN
    return make_pipeline(scene.family, denoiser, vae, text_encoders, tokenizers, scene.meta["configs"]["scheduler"],
                         scheduler, scene.meta["configs"].get("pipeline"))
