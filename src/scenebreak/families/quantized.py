"""The frozen base held quantised under LoRA (`learn --quantize nf4|int8`, QLoRA's way).

Under LoRA the base model's weights never change: only the adapters and the handle rows
train. Their linear layers can then wait in 4 bits (bitsandbytes' NF4, about a quarter
of bf16's memory) or 8 bits (LLM.int8()), dequantised block by block as each one runs,
while the adapters beside them stay full precision. FLUX.1's 12B transformer goes from
24 GB in bf16 to about 7 GB in NF4, and T5-XXL from 9.5 GB to 2.7 GB, which is what lets
`learn` on FLUX at 1024 fit a 24 GB card with `--memory low`. The gradient still flows
through a quantised layer to what is before it (T5's handle rows, the adapters of
earlier blocks).

What is quantised: every linear layer of the denoiser but its input and output
projections (`Family.quantize_skip`: the few layers whose rounding every token
feels), and the text encoders that get no adapters (FLUX's T5), whole. The scene holds
the adapters, made against the quantised base: they are applied to the full-precision
base when sampling, as QLoRA's are. bitsandbytes runs these layers on CUDA and, from
0.48, on the CPU.
"""

from __future__ import annotations

from ..device import fp32_layers, is_bitsandbytes_weight
from ..hub import quiet_bitsandbytes
from ..kept import one_builder_at_a_time

QUANTIZE_HINT = "pipx inject scenebreak bitsandbytes (or pip install 'scenebreak[quantize]')"
KINDS = ("nf4", "int8")


def quantization_available() -> bool:
    """bitsandbytes installed (found, not imported: importing it is slow and chatty)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def require_quantization(what: str, device=None) -> None:
    """Refuse `what` (e.g. "--quantize nf4") in one line: on a device bitsandbytes has no
    kernels for (Apple's GPU: found out only after the model loaded), and naming the
    install where bitsandbytes is missing."""
    if device is not None and device.type not in ("cuda", "cpu"):
        from ..errors import InvalidInput

        raise InvalidInput(f"{what}: bitsandbytes runs on CUDA and the CPU, not on {device.type.upper()}: "
                           "use --quantize none (or --device cpu)")
    if not quantization_available():
        from ..errors import SceneBreakError

        raise SceneBreakError(f"{what} needs bitsandbytes: {QUANTIZE_HINT}")


def _quantized_linear(linear, kind: str, compute_dtype):
    import bitsandbytes as bnb
    import torch

    bias = linear.bias is not None
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, quant_type="nf4",
                                  compute_dtype=compute_dtype, device="meta")
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                    device="meta")
        layer.weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
    if bias:
        layer.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
    return layer


@one_builder_at_a_time
def quantize_linear_layers(model, kind: str, compute_dtype, skip: tuple[str, ...] = ()) -> int:
    """Replace the model's linear layers (but those whose name starts with one of
    `skip`, and those transformers keeps out of quantisation, `_keep_in_fp32_modules`)
    by bitsandbytes' `kind` layers holding the same weights; they are quantised when
    the model moves to its device. Returns how many were replaced."""
    import torch

    if kind not in KINDS:
        raise ValueError(f"unknown quantisation {kind!r}")
    quiet_bitsandbytes()
    # T5's `wo`: its forward casts its input to the weight's dtype, which for a 4-bit
    # layer is uint8 (every prompt state garbage); transformers never quantises the layers
    # it keeps in fp32 (all of them: fp16's list, the longer one).
    kept = {id(layer) for layer in fp32_layers(model, torch.float16)}
    # Never a LoRA adapter's own matrices (lora_A, lora_B: plain linear layers too).
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and not name.startswith(skip) and ".lora_" not in name
               and id(module) not in kept]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized_linear(linear, kind, compute_dtype))
    return len(targets)


def quantize_denoiser(components, kind: str, compute_dtype) -> None:
    """The denoiser's linear layers in `kind` but the family's `quantize_skip` (its input
    and output projections); layers already quantised are left as they are."""
    quantize_linear_layers(components.denoiser, kind, compute_dtype, skip=components.family.quantize_skip)


def quantize_frozen_base(components, kind: str, compute_dtype) -> None:
    """The frozen base of LoRA in `kind`: the denoiser (quantize_denoiser), and the text
    encoders that get no adapters (FLUX's T5), whole (quantize_adapterless_encoders).
    Layers already quantised are left as they are, so a second call changes nothing."""
    quantize_denoiser(components, kind, compute_dtype)
    quantize_adapterless_encoders(components, kind, compute_dtype)


def quantize_adapterless_encoders(components, kind: str, compute_dtype) -> None:
    """The text encoders that get no adapters (FLUX's T5), whole, in `kind`."""
    family = components.family
    adapterless = family.adapterless_text_encoders()
    for name, encoder in zip(family.text_encoders, components.text_encoders):
        if name in adapterless:
            quantize_linear_layers(encoder, kind, compute_dtype)


def has_quantized_layers(model) -> bool:
    return any(is_bitsandbytes_weight(p) for p in model.parameters())


def is_quantized(param) -> bool:
    """A weight bitsandbytes holds packed (not a float tensor to cast or copy)."""
    return not param.is_floating_point()
