"""Phase-2 weights as one LoRA file in the kohya layout: the layout kohya's sd-scripts
write, and AUTOMATIC1111, Forge, ComfyUI and diffusers' `load_lora_weights` load.

Keys are `lora_unet_<module>`, `lora_te_<module>` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_`
(SDXL's two text encoders), each with `.lora_down.weight`, `.lora_up.weight` and
`.alpha`; a layer's change is `alpha / rank * up @ down`. Module names are `_` for `.`
in the names of the UNet kohya trains on: for SD 1.x/2.x diffusers' own, for SDXL the
original SGM ones (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`,
`output_blocks.2.2.conv`), as kohya's SDXL trainer writes them (`sgm_module` maps
diffusers' names onto them, from the UNet's block layout). SGM names are the only ones
kohya's SDXL tools (`sdxl_merge_lora.py`, `--network_weights`) find, and the only
ones A1111 finds for SDXL's first upsampler; ComfyUI, Forge and diffusers map both.

Two sources:
- a `--tune lora` scene's own adapters, renamed (peft's lora_A/lora_B are kohya's
  down/up, and alpha stays the scene's, so the scale alpha/rank is kept): exact;
- a fully tuned scene: the difference between its weights and its base model's, per
  layer, cut to `rank` by truncated SVD. This is approximate, and `Extraction` says by
  how much: the share of the difference's energy (squared Frobenius norm) kept, the
  worst layer, and the share in parameters the file does not carry.

Layers a kohya LoRA carries here: every Linear and Conv2d (1x1 and, as kohya's LoCon
does, 3x3) inside the UNet's down, mid and up blocks (attention projections, feed
forward, proj_in/out, resnet convolutions and time projections, down/upsamplers), and
each text-encoder layer's q/k/v/out projections and MLP: the layers every loader
applies. Also the UNet's conv_in, conv_out and time-embedding MLP (`UNET_OUTER`), which
ComfyUI, A1111, Forge and diffusers (from 0.39) apply but kohya's own loaders never target (they
look inside the blocks only): the report says what share of the difference lives
there, and `kohya_strict` leaves them out. Left out, as no LoRA can carry them: biases,
norms, the text encoders' position embeddings; and SDXL's added-conditioning MLP
(`add_embedding`), whose kohya name older diffusers releases misread. The handle rows
of the token embedding go into the textual-inversion files instead; its other rows
never change.

FLUX.1 (a family with `kohya_bfl_transformer`): kohya trains on Black Forest Labs' own
model, as ComfyUI and Forge run it, so the transformer's keys are BFL's module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`), the
text encoder's `lora_te1_`. BFL holds q, k and v in one layer (and, in the single-stream
blocks, the MLP's input projection with them), where diffusers has one per part: the
parts are fused (`bfl_layers`). Carried: every linear layer of the double- and
single-stream blocks, what kohya's FLUX LoRA trains and every loader applies; not the
layers outside the blocks (img_in, the time/guidance/vector embedders, final_layer),
which diffusers' kohya converter drops (0.42: those keys lose their `transformer.`
prefix) and kohya's `--network_weights` partly skips. T5: a LoRA scene leaves it frozen
(its handle rows go into the embedding files); a fully tuned one changes it, and its
attention and feed-forward layers are carried as kohya's FLUX LoRA names them,
`lora_te3_` and T5's own module names (`lora_te3_encoder_block_0_layer_0_SelfAttention_q`),
which ComfyUI and Forge map onto T5 and diffusers' converter skips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BundleError, InvalidInput
from ..scenes.bundle import is_token_table

DEFAULT_RANK = 64
MAX_RANK = 1024
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
# Outside the blocks: carried, but kohya's loaders never target them (`kohya_strict` leaves them out).
UNET_OUTER = ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.weight")
KOHYA_SKIPS = "conv_in, conv_out and the time-embedding MLP"
KOHYA_SKIPPED_KIND = "layers kohya skips"  # their share in left_out_parts under kohya_strict
TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# T5's layers as they are named in T5EncoderModel: attention q/k/v/o, the (gated) feed forward.
T5_LAYER = re.compile(r"^encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi|wi_0|wi_1|wo))$")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class LoraLayer:
    down: "torch.Tensor"  # noqa: F821 - (r, in) or (r, in, kh, kw)
    up: "torch.Tensor"  # noqa: F821 - (out, r) or (out, r, 1, 1)
    alpha: float


@dataclass
class Extraction:
    """What the LoRA file keeps of the scene's phase-2 weights."""

    source: str  # "adapters": a LoRA scene's own, exact; "svd": extracted from a full fine-tune
    rank: int  # the rank asked for (a layer with fewer rows or columns gets all it has)
    layers: int  # layers written
    kept: float = 1.0  # share of the carried layers' difference energy kept by the rank
    worst: tuple[str, float] | None = None  # the layer that keeps the least, and its share
    left_out: float = 0.0  # share of the whole difference in parameters the file does not carry
    left_out_parts: dict[str, float] = field(default_factory=dict)  # that share by kind
    kohya_skipped: float = 0.0  # share of the whole difference in UNET_OUTER, which kohya's loaders skip
    kohya_strict: bool = False  # UNET_OUTER left out of the file (then part of left_out too)

    @property
    def relative_error(self) -> float:
        """The Frobenius norm of what the file misses, relative to the whole difference."""
        carried = 1.0 - self.left_out
        return max(0.0, 1.0 - carried * self.kept) ** 0.5

    def to_dict(self) -> dict:
        return {"source": self.source, "rank": self.rank, "layers": self.layers, "kept": self.kept,
                "worst_layer": self.worst[0] if self.worst else None, "worst_kept": self.worst[1] if self.worst else None,
                "left_out": self.left_out, "left_out_parts": self.left_out_parts, "relative_error": self.relative_error,
                "kohya_skipped": self.kohya_skipped, "kohya_strict": self.kohya_strict}

    def summary(self) -> str:
        if self.source == "adapters":
            return f"LoRA: the scene's own adapters (rank {self.rank}, {self.layers} layers), exact"
        text = (f"LoRA extracted at rank {self.rank} from the fully tuned weights: {self.layers} layers keep "
                f"{self.kept:.2%} of their weight difference's energy")
        if self.worst:
            text += f" (worst {self.worst[0]}: {self.worst[1]:.2%})"
        if self.left_out_parts:
            parts = ", ".join(f"{kind} {share:.2%}" for kind, share in self.left_out_parts.items())
            text += f"; {self.left_out:.2%} of the difference is in parameters the file does not carry ({parts})"
        text += f"; relative error of the whole difference {self.relative_error:.2%}"
        if self.kohya_skipped and not self.kohya_strict:
            text += (f"; {self.kohya_skipped:.2%} of the difference is in {KOHYA_SKIPS}, which ComfyUI, AUTOMATIC1111, "
                     "Forge and diffusers apply and kohya's sd-scripts skip (--kohya-strict leaves them out)")
        return text


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise InvalidInput(f"--rank must be a whole number between 1 and {MAX_RANK}, not {rank!r}")
    return rank


def module_path(component: str, key: str) -> str:
    """`component.module` of a parameter key. Text-encoder modules always get the
    `text_model.` prefix that kohya names carry (transformers 5's CLIPTextModel
    dropped that level; CLIPTextModelWithProjection keeps it)."""
    module = key.rsplit(".", 1)[0]
    if component in TEXT_ENCODERS and not module.startswith("text_model.") and not T5_LAYER.match(module):
        module = f"text_model.{module}"
    return f"{component}.{module}"


def carried(component: str, key: str, tensor, kohya_strict: bool = False, bfl: str | None = None) -> bool:
    """Whether the kohya LoRA carries this parameter's change (see the module docstring);
    `bfl`: the component named in BFL's FLUX layout (`bfl_denoiser`), if any."""
    if not key.endswith(".weight") or tensor.ndim not in (2, 4):
        return False
    if component == bfl:
        return tensor.ndim == 2 and bfl_module(key.removesuffix(".weight")) is not None
    if component == "unet":
        return key.startswith(UNET_BLOCKS) or (key in UNET_OUTER and not kohya_strict)
    if component not in TEXT_ENCODERS:
        return False
    module = module_path(component, key).split(".", 1)[1]
    return bool(TEXT_LAYER.match(module) or T5_LAYER.match(module))


def adapter_layers(weights: dict[str, dict], alpha: float) -> dict[str, LoraLayer]:
    """A LoRA scene's peft adapters (`<component>_lora` state dicts) as layers."""
    layers: dict[str, LoraLayer] = {}
    for component_lora, state in weights.items():
        component = component_lora.removesuffix("_lora")
        for key, value in state.items():
            match = re.match(r"^(.*)\.lora_([AB])\.[^.]+\.weight$", key)  # ...to_q.lora_A.<adapter>.weight
            if not match:
                raise BundleError(f"the scene's LoRA weights hold an unexpected entry {key[:80]!r}")
            path = module_path(component, match[1] + ".weight")
            layer = layers.setdefault(path, LoraLayer(None, None, float(alpha)))
            if match[2] == "A":
                layer.down = value.detach()
            else:
                layer.up = value.detach()
    incomplete = [path for path, layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise BundleError(f"the scene's LoRA weights lack a half of {incomplete[0]}")
    return layers


def kohya_skips(path: str) -> bool:
    """Whether a layer (`component.module`) is one kohya's loaders never target."""
    component, _, module = path.partition(".")
    return component == "unet" and f"{module}.weight" in UNET_OUTER


def extract_layers(tuned: dict[str, dict], base: dict[str, dict], rank: int, dtype=None,
                   progress=None, kohya_strict: bool = False,
                   bfl: str | None = None) -> tuple[dict[str, LoraLayer], Extraction]:
    """LoRA layers of rank <= `rank` for the difference `tuned - base`, per component
    ("unet" or "transformer", "text_encoder", "text_encoder_2"), and what they keep of it
    (`bfl`: the component named in BFL's FLUX layout, whose block layers are carried, one
    layer per diffusers module; `kohya_state_dict` fuses them). Differences
    are taken in `dtype`, the precision the scene stores: a fp16 scene against its
    base rounded to fp16, so the base's rounding is not mistaken for learning (in a
    tool that runs the base in fp16, base + LoRA is then the scene itself).
    `progress(done, total)` is called per component weight; `kohya_strict` leaves out
    the layers kohya's loaders skip (UNET_OUTER)."""
    import torch

    check_rank(rank)
    dtype = dtype or torch.float16
    layers: dict[str, LoraLayer] = {}
    carried_energy = kept_energy = outer_energy = 0.0
    left: dict[str, float] = {}
    fits: list[tuple[str, float]] = []
    items = [(c, k, v) for c, state in tuned.items() for k, v in state.items() if v.is_floating_point()]
    if progress:
        progress(0, len(items))
    for done, (component, key, value) in enumerate(items, 1):
        reference = base[component].get(key)
        if reference is None:
            raise BundleError(f"the scene's {component} has a weight {key[:80]!r} that its base model lacks")
        if component in TEXT_ENCODERS and is_token_table(key):
            # The handles' rows are appended (they go into the embedding files); the
            # vocabulary's rows are compared, which the method keeps unchanged. (T5's
            # table is there under two names, tied.)
            value = value[: reference.shape[0]]
        if value.shape != reference.shape:
            raise BundleError(f"the scene's {component}.{key[:80]} does not have its base model's shape")
        diff = value.to(dtype).float() - reference.to(dtype).float()
        energy = float(diff.pow(2).sum())
        outer = component == "unet" and key in UNET_OUTER
        if outer:
            outer_energy += energy
        if carried(component, key, value, kohya_strict, bfl):
            path = module_path(component, key)
            carried_energy += energy
            if energy == 0.0:
                fits.append((path, 1.0))  # unchanged: nothing to write
            else:
                layer, kept = _truncated_svd(diff, rank, dtype)
                layers[path] = layer
                kept_energy += kept
                fits.append((path, kept / energy))
        elif energy:
            kind = ("biases" if key.endswith(".bias") else KOHYA_SKIPPED_KIND if outer
                    else "norms" if "norm" in key and value.ndim < 2 else "other layers")
            left[kind] = left.get(kind, 0.0) + energy
        if progress:
            progress(done, len(items))
    total = carried_energy + sum(left.values())
    worst = min(fits, key=lambda f: f[1]) if fits else None
    report = Extraction(
        source="svd", rank=rank, layers=len(layers),
        kept=kept_energy / carried_energy if carried_energy else 1.0,
        worst=(worst[0], worst[1]) if worst else None,
        left_out=sum(left.values()) / total if total else 0.0,
        left_out_parts={kind: energy / total for kind, energy in sorted(left.items(), key=lambda kv: -kv[1])},
        kohya_skipped=outer_energy / total if total else 0.0, kohya_strict=kohya_strict,
    )
    return layers, report


def _truncated_svd(diff, rank: int, dtype) -> tuple[LoraLayer, float]:
    """Rank-`rank` factors of one layer's difference (a conv's kernel is flattened to
    (out, in*kh*kw)), and the energy they keep, measured from what they leave out.

    A layer with room for little more than `rank` gets the exact SVD; a larger one the
    randomized SVD (Halko et al.: `rank` + 16 directions, 4 power iterations, a fixed
    seed so exports repeat), about 10x quicker on SD2.1's 1280 x 11520 convolutions and
    the same best factors to within a hair on differences whose spectrum falls off.
    The singular values are split evenly between up and down, so neither factor is
    far from 1 and both store well in fp16."""
    import torch

    out_features = diff.shape[0]
    matrix = diff.reshape(out_features, -1)
    smaller = min(matrix.shape)
    r = min(rank, smaller)
    if smaller <= 2 * rank + 16:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        v = vh.mT
    else:
        with torch.random.fork_rng(devices=[matrix.get_device()] if matrix.is_cuda else []):  # (restored after)
            # The generator svd_lowrank draws from, alone: torch.manual_seed reseeds every
            # GPU's too, which fork_rng does not give back (a caller's GPU noise after an
            # export was seed 0's).
            (torch.cuda.default_generators[matrix.get_device()] if matrix.is_cuda
             else torch.default_generator).manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=r + 16, niter=4)
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * v[:, :r].mT
    kept = float(matrix.pow(2).sum() - (matrix - up @ down).pow(2).sum())
    if diff.ndim == 4:
        up = up.reshape(out_features, r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    # One alpha for the whole file (`rank`), a layer narrower than it (r < rank) taking
    # r / rank into its up: the loaders' alpha / r times up @ down is the difference
    # still, and diffusers, which reads a single alpha for attention layers (it cannot
    # match their per-layer alpha keys), scales them right too.
    up = up * (r / rank)
    return LoraLayer(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(rank)), max(0.0, kept)


def kohya_state_dict(layers: dict[str, LoraLayer], family, unet_config=None) -> dict:
    """Layers keyed `component.module` as a kohya state dict: PEFT's lora_A/lora_B are
    kohya's lora_down/lora_up, each layer keeps its own alpha, and `.` becomes `_`. The
    family (families.Family) names the text encoders' prefixes, and whether the UNet's
    modules get their SGM names, which its block layout sets (`unet_config`: the
    UNet's config), or FLUX's transformer BFL's, its parts fused (`bfl_layers`)."""
    import torch

    prefixes = {family.denoiser or "unet": "lora_unet", **family.kohya_text_prefixes}
    bfl = bfl_denoiser(family)
    if bfl:
        layers = bfl_layers(layers, bfl)
    sgm = family.kohya_sgm_unet and any(path.startswith("unet.") for path in layers)
    layout = unet_layout(unet_config) if sgm else None
    state: dict = {}
    for path, layer in layers.items():
        component, _, module = path.partition(".")
        if component not in prefixes:
            raise BundleError(f"the scene has LoRA weights for an unknown part {component[:40]!r}")
        if layout:
            module = sgm_module(module, layout) if component == "unet" else module
        name = f"{prefixes[component]}_{module.replace('.', '_')}"
        if f"{name}.alpha" in state:
            raise BundleError(f"the scene's LoRA weights name the layer {name[:80]} twice")
        state[f"{name}.lora_down.weight"] = layer.down.contiguous()
        state[f"{name}.lora_up.weight"] = layer.up.contiguous()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return state


# -- FLUX's transformer in BFL names --------------------------------------------------------------
# A diffusers FluxTransformer2DModel layer inside the blocks -> (its BFL layer in the same
# block, its part of it or None). BFL's fused layers stack their parts by rows: q, k, v
# (and, in single_blocks.N.linear1, the MLP's input after them) as ComfyUI's
# flux_to_diffusers and diffusers' converters slice them.
BFL_IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # ModelSpec's name for keys in its names
BFL_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2), "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None), "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None)}
BFL_SINGLE = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
              "proj_mlp": ("linear1", 3), "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None)}
# Each fused layer's parts, by their output width in units of the block's width (FLUX.1's
# MLP is 4x as wide: BFL's mlp_ratio, which diffusers' single-stream block fixes too).
BFL_FUSED = {"img_attn.qkv": (1, 1, 1), "txt_attn.qkv": (1, 1, 1), "linear1": (1, 1, 1, 4)}
_BFL_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d{1,6})\.(.+)$")


def bfl_denoiser(family) -> str | None:
    """The component a family's kohya LoRA names in BFL's layout (FLUX.1's transformer:
    families/flux.py says so with `kohya_bfl_transformer`), or None."""
    return family.denoiser if getattr(family, "kohya_bfl_transformer", False) else None


def bfl_module(module: str) -> tuple[str, int | None] | None:
    """The BFL layer a diffusers FLUX transformer module is, or is a part of, and which
    part: `transformer_blocks.3.attn.add_k_proj` -> ("double_blocks.3.txt_attn.qkv", 1),
    `single_transformer_blocks.0.proj_out` -> ("single_blocks.0.linear2", None); None
    for a module outside the blocks' linear layers."""
    match = _BFL_BLOCK.match(module)
    if not match:
        return None
    double = match[1] == "transformer_blocks"
    found = (BFL_DOUBLE if double else BFL_SINGLE).get(match[3])
    if found is None:
        return None
    return f"{'double' if double else 'single'}_blocks.{int(match[2])}.{found[0]}", found[1]


def bfl_layers(layers: dict[str, LoraLayer], component: str) -> dict[str, LoraLayer]:
    """`component`'s layers (diffusers' module names) as BFL's, the parts of a fused layer
    in one: what kohya's converter (`convert_flux_lora.py`, sd-scripts) writes, and
    diffusers' kohya converter splits back exactly into the parts. BundleError for a
    layer that has no BFL name, or a part named twice or of the wrong shape."""
    fused: dict[str, LoraLayer] = {}
    parts: dict[str, dict[int, LoraLayer]] = {}
    for path, layer in layers.items():
        owner, _, module = path.partition(".")
        if owner != component:
            fused[path] = layer
            continue
        found = bfl_module(module)
        if found is None:
            raise BundleError(f"the scene's {component} has LoRA weights for {module[:80]!r}, a layer kohya's FLUX "
                              "LoRA cannot name")
        name, part = f"{component}.{found[0]}", found[1]
        if name in fused or (part is None and name in parts) or part in parts.get(name, {}):
            raise BundleError(f"the scene's LoRA weights name the layer {name[:80]} twice")
        if part is None:
            fused[name] = layer
        else:
            parts.setdefault(name, {})[part] = layer
    for name, group in parts.items():
        fused[name] = _fuse(name, group, BFL_FUSED[name.split(".", 3)[3]])
    return fused


def _fuse(name: str, parts: dict[int, LoraLayer], widths: tuple[int, ...]) -> LoraLayer:
    """One LoRA for a fused layer from its parts' (`parts`: part -> layer; a part not there
    changes nothing), each part's change up @ down * alpha / rank as before:
    down = the parts' downs stacked, up = their ups block-diagonal, every part padded with
    zeros to one rank r (a missing part is all zeros), so that the fused layer has rank
    (parts x r) and splits evenly (diffusers' converter splits an even, block-diagonal
    one into its parts; any other it copies whole to each). alpha is the fused rank
    times the parts' scale alpha / rank (their scales folded into the ups when they
    differ): not the parts' own alpha, as kohya's `split_qkv` save keeps it, which every
    loader divides by the fused rank (sd-scripts #2204: its layers 3-4x too weak)."""
    import torch

    first = next(iter(parts.values()))
    width, dtype = first.down.shape[-1] if first.down.ndim else 0, first.down.dtype
    for part, layer in parts.items():  # every part reads the block's hidden state, of `width`
        r = layer.down.shape[0] if layer.down.ndim else 0
        if r < 1 or layer.down.shape != (r, width) or layer.up.shape != (widths[part] * width, r):
            raise BundleError(f"the scene's LoRA weights for a part of {name[:80]} do not fit its shape")
    rank = max(layer.down.shape[0] for layer in parts.values())
    scales = {part: layer.alpha / layer.down.shape[0] for part, layer in parts.items()}
    scale = scales[next(iter(scales))] if len(set(scales.values())) == 1 else None
    downs, ups = [], []
    for part, units in enumerate(widths):
        down, up = torch.zeros(rank, width, dtype=dtype), torch.zeros(units * width, rank, dtype=dtype)
        layer = parts.get(part)
        if layer is not None:
            r = layer.down.shape[0]
            down[:r] = layer.down
            up[:, :r] = layer.up if scale is not None else layer.up.float() * scales[part]
        downs.append(down)
        ups.append(up)
    total = rank * len(widths)
    return LoraLayer(torch.cat(downs).contiguous(), torch.block_diag(*ups).contiguous(),
                     float(total * scale) if scale is not None else float(total))


# -- SDXL's UNet in SGM names ------------------------------------------------------------------------
# kohya trains SDXL on the original (SGM) UNet, whose modules sit in flat lists:
# input_blocks = [conv_in, then per level its resnet(+attention) pairs and a downsampler],
# middle_block = [resnet, attention, resnet], output_blocks = per level (reversed) its
# resnet(+attention)(+upsampler) triples. A diffusers name maps onto them by counting
# through the levels; inside a resnet four layers are named differently, inside an
# attention block nothing is.

RESNET_SGM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
SGM_OUTER = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}
BLOCK_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True, "UpBlock2D": False, "CrossAttnUpBlock2D": True}
MAX_LEVELS, MAX_LAYERS = 8, 64  # far beyond SDXL's 3 levels of 2 resnets: a scene's recorded config is a stranger's


@dataclass(frozen=True)
class UnetLayout:
    """What an SDXL UNet's SGM names depend on: per level, top to bottom for `down` and
    bottom to top for `up` (diffusers' order), its resnets and whether it has attention."""

    down: tuple[tuple[int, bool], ...]
    up: tuple[tuple[int, bool], ...]


def unet_layout(config) -> UnetLayout:
    """The layout of a diffusers UNet2DConditionModel config (a dict, or the model's own
    config); BundleError for one that is not SDXL's kind of UNet."""
    def fail(what: str):
        return BundleError(f"cannot name the UNet's layers as kohya does for SDXL: {what}")

    if config is None or not hasattr(config, "get"):
        raise fail("the scene does not record its UNet's configuration")
    down_types, up_types = config.get("down_block_types"), config.get("up_block_types")
    layers = config.get("layers_per_block")
    if not isinstance(down_types, (list, tuple)) or not isinstance(up_types, (list, tuple)) \
            or not 1 <= len(down_types) <= MAX_LEVELS or len(up_types) != len(down_types):
        raise fail("its block types are missing or damaged")
    if any(t not in BLOCK_TYPES or t.endswith("UpBlock2D") for t in down_types) \
            or any(t not in BLOCK_TYPES or not t.endswith("UpBlock2D") for t in up_types):
        raise fail(f"it has blocks other than {', '.join(BLOCK_TYPES)}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise fail("its middle block is not UNetMidBlock2DCrossAttn")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers] * len(down_types)
    if not isinstance(layers, (list, tuple)) or len(layers) != len(down_types) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_LAYERS for n in layers):
        raise fail("its layers_per_block is missing or damaged")
    # Up blocks run the levels in reverse, each with one resnet more (it takes the skip of the downsampler too).
    return UnetLayout(down=tuple((n, BLOCK_TYPES[t]) for n, t in zip(layers, down_types)),
                      up=tuple((n + 1, BLOCK_TYPES[t]) for n, t in zip(reversed(layers), up_types)))


_BLOCK_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")
_MID_LAYER = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")
_SAMPLER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(downsamplers|upsamplers)\.0\.conv$")


def sgm_module(module: str, layout: UnetLayout) -> str:
    """The SGM name of a diffusers UNet module: `down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in` on SDXL (two resnets per level). BundleError for a name
    that is not a carried layer of this layout."""
    def fail():
        return BundleError(f"the UNet layer {module[:80]!r} does not fit the UNet's layout")

    if module in SGM_OUTER:
        return SGM_OUTER[module]
    match = _BLOCK_LAYER.match(module)
    if match:
        side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        levels = layout.down if side == "down_blocks" else layout.up
        if level >= len(levels) or index >= levels[level][0] or (kind == "attentions" and not levels[level][1]):
            raise fail()
        rest = _resnet_layer(rest, fail) if kind == "resnets" else rest
        part = 1 if kind == "attentions" else 0
        if side == "down_blocks":  # conv_in, then per level above: its resnets and its downsampler
            return f"input_blocks.{1 + sum(n + 1 for n, _ in levels[:level]) + index}.{part}.{rest}"
        return f"output_blocks.{sum(n for n, _ in levels[:level]) + index}.{part}.{rest}"
    match = _MID_LAYER.match(module)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if index > (1 if kind == "resnets" else 0):
            raise fail()
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_resnet_layer(rest, fail)}"
        return f"middle_block.1.{rest}"
    match = _SAMPLER.match(module)
    if match:
        side, level = match[1], int(match[2])
        levels = layout.down if side == "down_blocks" else layout.up
        if level >= len(levels) - 1 or (side == "down_blocks") != (match[3] == "downsamplers"):
            raise fail()  # the last level has no sampler
        if side == "down_blocks":  # the level's last input block, after its resnets
            return f"input_blocks.{sum(n + 1 for n, _ in levels[:level + 1])}.0.op"
        # In the level's last output block, after its resnet (and attention).
        return f"output_blocks.{sum(n for n, _ in levels[:level + 1]) - 1}.{2 if levels[level][1] else 1}.conv"
    raise fail()


def _resnet_layer(name: str, fail) -> str:
    if name not in RESNET_SGM:
        raise fail()
    return RESNET_SGM[name]
