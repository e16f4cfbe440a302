"""LoRA tuning for phase 2 (`--tune lora`), with peft, the library diffusers uses.

Adapters go on the UNet's attention projections (self- and cross-attention) and on
the text encoder's attention and MLP layers. Their B matrices start at zero, so
adding them changes nothing until phase 2 trains them.
"""

from __future__ import annotations

import torch

from ..errors import SceneBreakError
from ..kept import one_builder_at_a_time
from .versions import with_model_key_names

ADAPTER = "default"


def require_peft():
    """peft, which scenebreak depends on: missing only from a damaged install."""
    try:
        import peft
    except ImportError as exc:
        raise SceneBreakError(f"peft, which scenebreak installs with itself, cannot be imported ({exc}): reinstall "
                              "scenebreak (pipx reinstall scenebreak, or pip install --force-reinstall peft)") from None
    return peft


def lora_settings(rank: int, family) -> dict:
    """What a scene records so the same adapters can be rebuilt to load its weights: the
    family's targets in the denoiser ("unet_targets", the name scenes have always used)
    and in the text encoders ("text_encoder_targets", and NAME_targets for an encoder
    that differs, [] for one that gets none, as FLUX's T5)."""
    return {"rank": rank, "alpha": rank, "unet_targets": list(family.lora_denoiser_targets),
            "text_encoder_targets": list(family.lora_text_targets.get("*", [])),
            **{f"{name}_targets": list(targets) for name, targets in family.lora_text_targets.items() if name != "*"}}


def text_encoder_targets(settings: dict, name: str) -> list[str]:
    """The LoRA targets of the text encoder `name` under recorded `settings`."""
    return settings.get(f"{name}_targets", settings["text_encoder_targets"])


@one_builder_at_a_time
def add_lora(denoiser, text_encoders: dict, settings: dict, empty: bool = False) -> list[torch.nn.Parameter]:
    """Put adapters into the denoiser and the text encoders (`text_encoders`: name ->
    model; in place); returns their parameters. An encoder without targets gets none.
    `empty`: the adapters are made on the meta device, to be filled by
    load_lora_state_dict: a scene's settings (a stranger's) size them, and its weights
    must be checked against them before any memory is taken (rank 1024 on every layer
    of FLUX.1 would be 22 GB). Targets that fit no layer raise ValueError (peft's)."""
    peft = require_peft()
    models = [(denoiser, settings["unet_targets"])]
    models += [(te, text_encoder_targets(settings, name)) for name, te in text_encoders.items()]
    models = [(model, targets) for model, targets in models if targets]
    for model, targets in models:
        config = peft.LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], target_modules=targets,
                                 lora_dropout=0.0, init_lora_weights=True)
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER, low_cpu_mem_usage=empty)
    params = [p for model, _ in models for p in lora_parameters(model)]
    # peft makes each adapter in its base layer's precision: a base loaded in bf16 (FLUX.1
    # under LoRA) would train bf16 adapters, whose small updates round away. They are
    # fp32, as peft's own autocast_adapter_dtype makes them; the matrix products still
    # run in the autocast precision.
    for p in params:
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    return params


def cast_adapter_inputs(models, enabled: bool) -> None:
    """Whether peft casts each adapter's input to the adapters' precision (its default).
    Under autocast that cast is wasted work: the fp32 adapters' input is a bf16/fp16
    activation, widened to fp32 only for autocast to narrow it straight back for the
    matrix product (the same numbers: widening is exact), two passes over the
    activation per adapted layer, and two more in the backward. Without autocast it
    is needed (a half-precision input to fp32 adapters would not multiply)."""
    for layer in _adapted_layers(models):
        layer.cast_input_dtype_enabled = enabled


def switch_adapters(models, enabled: bool) -> None:
    """Every adapter of `models` on or off (off: each layer is its base layer alone).
    peft also sets the adapters' requires_grad to `enabled`."""
    for layer in _adapted_layers(models):
        layer.enable_adapters(enabled)


def _adapted_layers(models):
    """peft's layers (a base layer with its adapters) in `models`."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for model in models for module in model.modules() if isinstance(module, BaseTunerLayer)]


def adapters_add_nothing(models) -> bool:
    """Every adapter's B matrix is zero (as made: phase 2 has not trained them), so they
    add exactly nothing to their layers and pass no gradient to what is before them."""
    tops = [p.detach().abs().amax() for model in models for name, p in model.named_parameters() if ".lora_B." in name]
    return bool(torch.stack(tops).max() == 0) if tops else True


def lora_parameters(model) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if ".lora_" in name]


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def load_lora_state_dict(model, state: dict[str, torch.Tensor], check=None) -> None:
    """Copy saved adapter weights into a model that has the same adapters (made empty
    or not: add_lora); `check(expected, state)` refuses weights that do not fit them (a
    scene's: names, shapes, dtypes); by default the names must match."""
    own = dict(model.named_parameters())
    expected = {k: p for k, p in own.items() if ".lora_" in k}
    state = with_model_key_names(state, expected)  # (saved under another transformers version)
    if check is not None:
        check(expected, state)
    elif set(expected) != set(state):
        missing, unknown = len(set(expected) - set(state)), len(set(state) - set(expected))
        raise SceneBreakError(f"the saved LoRA weights do not fit the model ({missing} missing, {unknown} unknown)")
    with torch.no_grad():
        for key, value in state.items():
            param = own[key]
            if not param.is_meta:
                param.copy_(value.to(param.dtype))
                continue
            # An empty adapter takes the saved tensor, on its base layer's device.
            layer = model.get_submodule(key.split(".lora_")[0])
            holder_name, _, attr = key.rpartition(".")
            value = value.to(layer.get_base_layer().weight.device, param.dtype)
            setattr(model.get_submodule(holder_name), attr, torch.nn.Parameter(value, requires_grad=param.requires_grad))


def merge_lora(model) -> None:
    """Bake the adapters into the weights and put the plain layers back, so the model
    is an ordinary diffusers/transformers model again (same keys, no adapter cost).
    Into a half-precision weight the sum is taken in fp32 and rounded once (peft rounds
    the adapters' product to the weight's precision first, then the sum again), so a
    base loaded in half precision gets the weights of an fp32 merge, cast."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight
            if weight.dtype in (torch.float16, torch.bfloat16):
                with torch.no_grad():
                    delta = sum(module.get_delta_weight(adapter).float() for adapter in module.active_adapters
                                if adapter in module.lora_A)
                    weight.copy_(weight.float() + delta)
            else:
                module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
