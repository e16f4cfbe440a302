"""Phase-2 weights as one LoRA file in the kohya layout, the layout AUTOMATIC1111,
Forge and ComfyUI load (and diffusers' `load_lora_weights`).

Keys are `lora_unet_<module>`, `lora_te_<module>` (SD 1.x/2.x) or `lora_te1_`/`lora_te2_`
(SDXL's two text encoders), each with `.lora_down.weight`, `.lora_up.weight` and
`.alpha`; a layer's change is `alpha / rank * up @ down`. Module names are the
diffusers ones with `_` for `.`, as kohya's trainer writes them for SD 1.x/2.x and
every loader maps for SDXL too.

Two sources:
- a `--tune lora` scene's own adapters, renamed (peft's lora_A/lora_B are kohya's
  down/up, and alpha stays the scene's, so the scale alpha/rank is kept): exact;
- a fully tuned scene: the difference between its weights and its base model's, per
  layer, cut to `rank` by truncated SVD. This is approximate, and `Extraction` says by
  how much: the share of the difference's energy (squared Frobenius norm) kept, the
  worst layer, and the share in parameters a LoRA cannot carry at all.

Layers a kohya LoRA carries here: every Linear and Conv2d (1x1 and, as kohya's LoCon
does, 3x3) inside the UNet's down, mid and up blocks (attention projections, feed
forward, proj_in/out, resnet convolutions and time projections, down/upsamplers), its
conv_in, conv_out and time-embedding MLP, and each text-encoder layer's q/k/v/out
projections and MLP: the layers A1111's, ComfyUI's and diffusers' loaders all map.
Left out, as no LoRA can carry them: biases, norms, the text encoders' position
embeddings; and SDXL's added-conditioning MLP (`add_embedding`), whose kohya name
diffusers' loader misreads. The handle rows of the token embedding go into the
textual-inversion files instead; its other rows never change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import BundleError, InvalidInput

DEFAULT_RANK = 64
MAX_RANK = 1024
UNET_BLOCKS = ("down_blocks.", "mid_block.", "up_blocks.")
UNET_OUTER = ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.weight")
TEXT_LAYER = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
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
    left_out: float = 0.0  # share of the whole difference in parameters a LoRA cannot carry
    left_out_parts: dict[str, float] = field(default_factory=dict)  # that share by kind

    @property
    def relative_error(self) -> float:
        """The Frobenius norm of what the file misses, relative to the whole difference."""
        carried = 1.0 - self.left_out
        return max(0.0, 1.0 - carried * self.kept) ** 0.5

    def to_dict(self) -> dict:
        return {"source": self.source, "rank": self.rank, "layers": self.layers, "kept": self.kept,
                "worst_layer": self.worst[0] if self.worst else None, "worst_kept": self.worst[1] if self.worst else None,
                "left_out": self.left_out, "left_out_parts": self.left_out_parts, "relative_error": self.relative_error}

    def summary(self) -> str:
        if self.source == "adapters":
            return f"LoRA: the scene's own adapters (rank {self.rank}, {self.layers} layers), exact"
        text = (f"LoRA extracted at rank {self.rank} from the fully tuned weights: {self.layers} layers keep "
                f"{self.kept:.2%} of their weight difference's energy")
        if self.worst:
            text += f" (worst {self.worst[0]}: {self.worst[1]:.2%})"
        if self.left_out_parts:
            parts = ", ".join(f"{kind} {share:.2%}" for kind, share in self.left_out_parts.items())
            text += f"; {self.left_out:.2%} of the difference is in parameters a LoRA cannot carry ({parts})"
        return text + f"; relative error of the whole difference {self.relative_error:.2%}"


def check_rank(rank: int) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise InvalidInput(f"--rank must be a whole number between 1 and {MAX_RANK}, not {rank!r}")
    return rank


def module_path(component: str, key: str) -> str:
    """`component.module` of a parameter key. Text-encoder modules always get the
    `text_model.` prefix that kohya names carry (transformers 5's CLIPTextModel
    dropped that level; CLIPTextModelWithProjection keeps it)."""
    module = key.rsplit(".", 1)[0]
    if component in TEXT_ENCODERS and not module.startswith("text_model."):
        module = f"text_model.{module}"
    return f"{component}.{module}"


def carried(component: str, key: str, tensor) -> bool:
    """Whether the kohya LoRA carries this parameter's change (see the module docstring)."""
    if not key.endswith(".weight") or tensor.ndim not in (2, 4):
        return False
    if component == "unet":
        return key.startswith(UNET_BLOCKS) or key in UNET_OUTER
    return component in TEXT_ENCODERS and bool(TEXT_LAYER.match(module_path(component, key).split(".", 1)[1]))


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


def extract_layers(tuned: dict[str, dict], base: dict[str, dict], rank: int, dtype=None,
                   progress=None) -> tuple[dict[str, LoraLayer], Extraction]:
    """LoRA layers of rank <= `rank` for the difference `tuned - base`, per component
    ("unet", "text_encoder", "text_encoder_2"), and what they keep of it. Differences
    are taken in `dtype`, the precision the scene stores: a fp16 scene against its
    base rounded to fp16, so the base's rounding is not mistaken for learning (in a
    tool that runs the base in fp16, base + LoRA is then the scene itself).
    `progress(done, total)` is called per component weight."""
    import torch

    check_rank(rank)
    dtype = dtype or torch.float16
    layers: dict[str, LoraLayer] = {}
    carried_energy = kept_energy = 0.0
    left: dict[str, float] = {}
    fits: list[tuple[str, float]] = []
    items = [(c, k, v) for c, state in tuned.items() for k, v in state.items() if v.is_floating_point()]
    for done, (component, key, value) in enumerate(items, 1):
        reference = base[component].get(key)
        if reference is None:
            raise BundleError(f"the scene's {component} has a weight {key[:80]!r} that its base model lacks")
        if "token_embedding" in key:
            # The handles' rows are appended (they go into the embedding files); the
            # vocabulary's rows are compared, which the method keeps unchanged.
            value = value[: reference.shape[0]]
        if value.shape != reference.shape:
            raise BundleError(f"the scene's {component}.{key[:80]} does not have its base model's shape")
        diff = value.to(dtype).float() - reference.to(dtype).float()
        energy = float(diff.pow(2).sum())
        if carried(component, key, value):
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
            kind = "biases" if key.endswith(".bias") else "norms" if "norm" in key else "other layers"
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
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(matrix, q=r + 16, niter=4)
    root = s[:r].sqrt()
    up = u[:, :r] * root
    down = root[:, None] * v[:, :r].mT
    kept = float(matrix.pow(2).sum() - (matrix - up @ down).pow(2).sum())
    if diff.ndim == 4:
        up = up.reshape(out_features, r, 1, 1)
        down = down.reshape(r, *diff.shape[1:])
    # alpha = r: the loaders scale by alpha / r = 1
    return LoraLayer(down.to(dtype).contiguous(), up.to(dtype).contiguous(), float(r)), max(0.0, kept)


def kohya_state_dict(layers: dict[str, LoraLayer], xl: bool) -> dict:
    """Layers keyed `component.module` as a kohya state dict, through diffusers'
    `convert_state_dict_to_kohya` (PEFT lora_A/lora_B -> lora_down/lora_up, prefixes,
    `_` for `.`), with each layer's own alpha."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    peft = {}
    for path, layer in layers.items():
        peft[f"{path}.lora_A.weight"] = layer.down
        peft[f"{path}.lora_B.weight"] = layer.up
    state = convert_state_dict_to_kohya(peft)
    alphas = {_kohya_name(path): layer.alpha for path, layer in layers.items()}
    if not xl:
        # One text encoder: kohya's SD 1.x/2.x name is lora_te_, diffusers writes lora_te1_.
        state = {re.sub(r"^lora_te1_", "lora_te_", key): value for key, value in state.items()}
        alphas = {re.sub(r"^lora_te1_", "lora_te_", key): value for key, value in alphas.items()}
    for name, alpha in alphas.items():
        state[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return state


def _kohya_name(path: str) -> str:
    component, _, module = path.partition(".")
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}[component]
    return f"{prefix}_{module.replace('.', '_')}"
