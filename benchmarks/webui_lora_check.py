"""Does Forge load `scenebreak export -f a1111` as the scene? Checked with Forge's own
loading code, not with our reading of it, for every family: SD 1.x, SD 2.x, SDXL and
FLUX.1.

Each family's tiny model (tests/tinymodels.py) learns the bundled example twice, with
LoRA and with full tuning (exported by SVD at full rank, so that every layer kind the
file carries is exercised). Each scene is exported with `-f a1111` and loaded the way
Forge's LoRA extension loads a file (extensions-builtin/sd_forge_lora/networks.py,
load_lora_for_models), step by step with Forge's functions:

- the base denoiser is Forge's own module (backend/nn/unet.py for SD and SDXL,
  backend/nn/flux.py for FLUX), built at the tiny model's size and filled from the
  diffusers weights through the key maps ComfyUI and Forge use to read diffusers files
  (unet_to_diffusers, flux_to_diffusers); the UNet's config in the original code's terms
  is checked against what huggingface_guess (Forge's model detection) reads from the
  converted weights, and loading them into Forge's module checks every name and shape;
- the text encoders are Forge's IntegratedCLIP (and IntegratedT5) under the names its
  engines give them (clip_l for SD 1.x, clip_h for SD 2.x, clip_l + clip_g for SDXL,
  clip_l + t5xxl for FLUX) in Forge's CLIP object, with transformers 4's module layout,
  which Forge runs;
- `model_lora_keys_unet`, `model_lora_keys_clip` and `load_lora` (backend/patcher/lora.py,
  which runs ComfyUI's loader as Forge vendors it, packages_3rdparty/comfyui_lora_collection)
  match the file's keys; every key must be taken (Forge ignores a file with more than 12
  unmatched keys and warns for fewer);
- Forge's ModelPatcher adds the patches and its LoraLoader merges them into the weights,
  as it does before sampling.

The merged weights are compared with the scene's own (a LoRA scene's adapters merged by
peft), converted the same way. The embeddings go through Forge's textual-inversion
reader (create_embedding_from_data): each handle's file must read as the scene's rows
at the encoders' widths (FLUX: the CLIP-L copies in `embeddings-forge/`; the
two-encoder files in `embeddings/`, ComfyUI's, Forge refuses, hence the copies).

    pip install einops sentencepiece huggingface-guess   # what Forge's modules import
    python benchmarks/webui_lora_check.py --forge PATH/TO/stable-diffusion-webui-forge [--models sd1 sd2 sdxl flux]

Prints a table and saves it to benchmarks/results/webui_lora-forge.md (and .json).
Exit status 1 when any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

EXAMPLE = ROOT / "examples" / "creature"
MODELS = ("sd1", "sd2", "sdxl", "flux")
# Forge's names for each family's text encoders (backend/diffusion_engine/*.py), and the
# repository name its loader would have guessed (only FLUX's is read by the LoRA code).
ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g"), "flux": ("clip_l", "t5xxl")}
REPOS = {"sd1": "runwayml/stable-diffusion-v1-5", "sd2": "stabilityai/stable-diffusion-2-1",
         "sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "flux": "black-forest-labs/FLUX.1-dev"}
UNET_PREFIX = "model.diffusion_model."
TOLERANCE = 1e-5  # fp32: the merge's rounding, far below any trained change (checked below)
FEW = dict(steps1=2, steps2=3, prior=False)


def import_forge(folder: Path):
    """Forge's modules, imported from a checkout on the CPU (its args parser reads sys.argv)."""
    sys.path[:0] = [str(folder), str(folder / "packages_3rdparty")]
    argv, sys.argv = sys.argv, [sys.argv[0], "--always-cpu"]
    try:
        from backend.nn.clip import IntegratedCLIP
        from backend.nn.flux import IntegratedFluxTransformer2DModel
        from backend.nn.t5 import IntegratedT5
        from backend.nn.unet import IntegratedUNet2DConditionModel
        from backend.modules.k_model import KModel
        from backend.patcher import lora
        from backend.patcher.base import ModelPatcher
        from backend.patcher.clip import CLIP
        from backend.text_processing.textual_inversion import create_embedding_from_data
        from packages_3rdparty.comfyui_lora_collection import utils
    finally:
        sys.argv = argv
    from huggingface_guess import detection, diffusers_convert

    return types.SimpleNamespace(IntegratedCLIP=IntegratedCLIP, IntegratedFluxTransformer2DModel=IntegratedFluxTransformer2DModel,
                                 IntegratedT5=IntegratedT5, IntegratedUNet2DConditionModel=IntegratedUNet2DConditionModel,
                                 KModel=KModel, lora=lora, ModelPatcher=ModelPatcher, CLIP=CLIP,
                                 create_embedding_from_data=create_embedding_from_data, utils=utils,
                                 detection=detection, diffusers_convert=diffusers_convert)


def forge_commit(folder: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


# Forge's UNet normalises in groups of 32 wherever the original code does: the tiny
# models' UNets, 16 and 32 wide with groups of 8, are made twice as wide for it.
FORGE_SIZED_UNET = dict(block_out_channels=(32, 64, 64), norm_num_groups=32)


def build_base(model: str, folder: Path) -> Path:
    from tinymodels import build_tiny_flux, build_tiny_model, build_tiny_sdxl

    if model == "flux":
        return build_tiny_flux(folder / "tiny-flux-dev")
    if model == "sdxl":
        return build_tiny_sdxl(folder / "tiny-sdxl", unet=FORGE_SIZED_UNET)
    return build_tiny_model(folder / f"tiny-{model}", variant=model, unet=FORGE_SIZED_UNET)


def learn_and_export(work: Path, base: Path, model: str, tune: str) -> tuple[Path, Path]:
    """The example learnt on the tiny model with `tune`, exported with -f a1111."""
    from scenebreak import LearnConfig, learn
    from scenebreak.exports.export import export

    config = (LearnConfig(**FEW, tune="lora", rank=4, lr_lora=1e-2) if tune == "lora"
              else LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32"))
    masks = sorted(EXAMPLE.glob("mask*.png"))[:2]
    scene = learn(EXAMPLE / "img.jpg", masks, config, base_model=str(base), device="cpu",
                  output=work / f"{model}-{tune}.scene").path
    export(scene, work / f"{model}-{tune}-a1111", "a1111")
    return scene, work / f"{model}-{tune}-a1111"


def bfl_unet_config(transformer_config) -> dict:
    """Forge's unet_config for a FLUX transformer (what its loader passes to the module)."""
    c = transformer_config
    return dict(in_channels=c.in_channels // 4, vec_in_dim=c.pooled_projection_dim,
                context_in_dim=c.joint_attention_dim, hidden_size=c.num_attention_heads * c.attention_head_dim,
                mlp_ratio=4.0, num_heads=c.num_attention_heads, depth=c.num_layers,
                depth_single_blocks=c.num_single_layers, axes_dim=list(c.axes_dims_rope), theta=10000,
                qkv_bias=True, guidance_embed=c.guidance_embeds)


def to_bfl(forge, diffusers_state: dict, unet_config: dict, template: dict) -> dict:
    """Diffusers FLUX weights under BFL's names, through ComfyUI's/Forge's own key map
    (whole tensors, slices of fused ones, and the output norm's swapped scale/shift)."""
    import torch

    out = {k: torch.full_like(v, float("nan")) for k, v in template.items()}
    for key, target in forge.utils.flux_to_diffusers(unet_config, output_prefix="").items():
        if key not in diffusers_state:
            continue
        value = diffusers_state[key]
        if isinstance(target, str):
            out[target].copy_(value)
            continue
        name, offset, *function = target
        slot = out[name] if offset is None else out[name].narrow(*offset)
        slot.copy_(function[0](value) if function else value)
    missing = [k for k, v in out.items() if v.isnan().any()]
    if missing:
        raise SystemExit(f"flux_to_diffusers left these BFL weights unset: {missing}")
    return out


def forge_denoiser(forge, model: str, denoiser):
    """Forge's denoiser module for the base's, holding its weights, and the function that
    turns a diffusers state dict into the module's names."""
    import torch

    if model == "flux":
        config = bfl_unet_config(denoiser.config)
        module = forge.IntegratedFluxTransformer2DModel(**config)
        template = module.state_dict()
        convert = lambda state: to_bfl(forge, state, config, template)  # noqa: E731
    else:
        config = ldm_unet_config(denoiser.config)
        names = forge.utils.unet_to_diffusers(config)  # diffusers name -> original name, ComfyUI's and Forge's map
        convert = lambda state: {names[k]: v for k, v in state.items()}  # noqa: E731
        original = convert(denoiser.state_dict())
        detected = forge.detection.detect_unet_config({UNET_PREFIX + k: v for k, v in original.items()}, UNET_PREFIX)
        differ = {k: (v, detected[k]) for k, v in config.items() if k in detected and detected[k] != v}
        if differ:
            raise SystemExit(f"huggingface_guess reads another UNet config from the converted weights: {differ}")
        module = forge.IntegratedUNet2DConditionModel.from_config(config)
    module.load_state_dict(convert(denoiser.state_dict()))  # strict: every name and shape as Forge's
    if hasattr(module, "_internal_dict"):  # as Forge's loader sets it
        module._internal_dict = config
    else:
        module.config = config
    module.storage_dtype = module.computation_dtype = torch.float32
    return module, convert


def ldm_unet_config(c) -> dict:
    """The original code's UNet config (what Forge's UNet module and ComfyUI's key map take)
    for a diffusers UNet config; checked against what huggingface_guess detects from the
    converted weights."""
    levels = len(c.block_out_channels)
    layers = c.transformer_layers_per_block
    layers = [layers] * levels if isinstance(layers, int) else list(layers)
    depth = [layers[x] if "CrossAttn" in kind else 0 for x, kind in enumerate(c.down_block_types)
             for _ in range(c.layers_per_block)]
    # Output blocks lowest resolution first (up_blocks' order), each level's res blocks
    # plus one; the map pops from the end of the list, so it is stored reversed.
    depth_out = [layers[levels - 1 - x] if "CrossAttn" in kind else 0 for x, kind in enumerate(c.up_block_types)
                 for _ in range(c.layers_per_block + 1)]
    config = dict(in_channels=c.in_channels, out_channels=c.out_channels, model_channels=c.block_out_channels[0],
                  num_res_blocks=[c.layers_per_block] * levels,
                  channel_mult=[ch // c.block_out_channels[0] for ch in c.block_out_channels],
                  transformer_depth=depth, transformer_depth_output=depth_out[::-1],
                  transformer_depth_middle=layers[-1], use_spatial_transformer=True, context_dim=c.cross_attention_dim,
                  use_linear_in_transformer=c.use_linear_projection, adm_in_channels=None,
                  **attention_heads(c))
    if c.addition_embed_type == "text_time":  # SDXL's pooled text and size conditioning
        config.update(num_classes="sequential", adm_in_channels=c.projection_class_embeddings_input_dim)
    return config


def attention_heads(config) -> dict:
    """The heads of a UNet's attention in the original code's terms, which its weights do
    not show: what huggingface_guess's model list adds for a model it recognises (SD 1.x
    8 heads, SD 2.x and SDXL 64 channels a head), worked out here from the diffusers
    config (whose `attention_head_dim` counts heads, per level) for the tiny models."""
    levels = [i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind]
    heads = config.num_attention_heads or config.attention_head_dim
    heads = [heads] * len(config.block_out_channels) if isinstance(heads, int) else list(heads)
    widths = {config.block_out_channels[i] // heads[i] for i in levels}
    if len(widths) == 1:
        return {"num_heads": -1, "num_head_channels": widths.pop()}
    return {"num_heads": heads[levels[0]], "num_head_channels": -1}


def text_model(encoder):
    """The CLIP text model's own module (transformers 5 dropped the level in CLIPTextModel)."""
    return getattr(encoder, "text_model", encoder)


def forge_text_encoders(forge, model: str, encoders) -> dict:
    import torch
    from transformers import CLIPTextModel

    class CLIPTextModelAsInTransformers4(torch.nn.Module):
        """Forge runs transformers 4, whose CLIPTextModel holds the encoder under
        `text_model` (its weights' names begin "text_model."); transformers 5 dropped
        that level. The same module one level down keeps Forge's names."""

        def __init__(self, config):
            super().__init__()
            self.text_model = CLIPTextModel(config)

    out = {}
    for name, encoder in zip(ENCODERS[model], encoders):
        if name == "t5xxl":
            t5 = encoder.config
            out[name] = forge.IntegratedT5(dict(num_layers=t5.num_layers, d_model=t5.d_model, d_ff=t5.d_ff,
                                                dense_act_fn=t5.dense_act_fn, is_gated_act=t5.is_gated_act,
                                                num_heads=t5.num_heads, model_type=t5.model_type, vocab_size=t5.vocab_size))
            continue
        clip = forge.IntegratedCLIP(CLIPTextModelAsInTransformers4, encoder.config, add_text_projection=True)
        clip.transformer.text_model.load_state_dict(text_model(encoder).state_dict())
        out[name] = clip
    return out


def forge_models(forge, model: str, base: Path):
    """Forge's denoiser (in its KModel) and text encoders (in its CLIP), holding the base's weights."""
    from scenebreak.families.base_model import load_components

    components = load_components(str(base))
    module, convert = forge_denoiser(forge, model, components.denoiser)
    kmodel = forge.KModel(module, None, k_predictor=object(), config=types.SimpleNamespace(huggingface_repo=REPOS[model]))
    clip = forge.CLIP(model_dict=forge_text_encoders(forge, model, components.text_encoders), tokenizer_dict={})
    return kmodel, clip, convert


def load_like_forge(forge, kmodel, clip, lora: dict) -> dict:
    """extensions-builtin/sd_forge_lora/networks.py's load_lora_for_models, then the merge
    Forge runs before sampling; returns what each step took."""
    import torch

    unet_keys = forge.lora.model_lora_keys_unet(kmodel, {})
    clip_keys = forge.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    lora_unet, unmatched = forge.lora.load_lora(lora, unet_keys)
    lora_clip, unmatched = forge.lora.load_lora(unmatched, clip_keys)
    unet = forge.ModelPatcher(kmodel, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    unet_loaded = unet.add_patches(filename="scene", patches=lora_unet, strength_patch=1.0)
    clip_loaded = clip.add_patches(filename="scene", patches=lora_clip, strength_patch=1.0)
    unet.refresh_loras()
    clip.patcher.refresh_loras()
    return dict(unmatched=sorted(unmatched), unet_patches=len(lora_unet), unet_loaded=len(unet_loaded),
                clip_patches=len(lora_clip), clip_loaded=len(clip_loaded),
                unet_keys=sorted(k if isinstance(k, str) else k[0] for k in unet_loaded),
                clip_keys=sorted(k if isinstance(k, str) else k[0] for k in clip_loaded))


def compare(scene_path: Path, base: Path, model: str, kmodel, clip, convert, loaded: dict) -> dict:
    """Forge's merged weights against the scene's: the patched ones must be the scene's,
    the rest the base's (what the file leaves out by design: biases, norms, embedders)."""
    import torch

    from scenebreak import load_scene
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.scene_models import scene_components

    denoiser, _, encoders, _ = scene_components(load_scene(scene_path), choose_device("cpu"), dtype=torch.float32)
    forge_state = kmodel.diffusion_model.state_dict()
    scene_state = convert(denoiser.state_dict())
    base_state = convert(load_components(str(base)).denoiser.state_dict())
    patched = [k[len("diffusion_model."):] for k in loaded["unet_keys"]]

    def worst(a, b, keys):
        return max((float((a[k] - b[k]).abs().max()) for k in keys), default=0.0)

    rest = [k for k in forge_state if k not in patched]
    clip_worst, clip_patched = 0.0, 0
    ours = {name: text_model(encoder).state_dict() for name, encoder in zip(ENCODERS[model], encoders)}
    for key in loaded["clip_keys"]:  # "clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        name, inner = key.split(".transformer.text_model.", 1)
        theirs = clip.cond_stage_model.state_dict()[key]
        clip_worst = max(clip_worst, float((theirs - ours[name][inner]).abs().max()))
        clip_patched += 1
    return dict(
        denoiser_patched=len(patched), denoiser_worst=worst(forge_state, scene_state, patched),
        denoiser_learnt=worst(scene_state, base_state, patched),
        rest_is_base=worst(forge_state, base_state, rest),
        rest_scene_differs=sum(float((scene_state[k] - base_state[k]).abs().max()) > TOLERANCE for k in rest),
        clip_patched=clip_patched, clip_worst=clip_worst,
    )


def check_embeddings(forge, model: str, folder: Path, scene_path: Path) -> dict:
    """Forge's textual-inversion reader on each handle's file: the rows it reads, against
    the scene's (FLUX: the CLIP-L copies; the two-encoder files must be refused)."""
    from safetensors.torch import load_file

    from scenebreak import load_scene
    from scenebreak.exports.a1111 import triggers

    scene = load_scene(scene_path)
    widths = [rows.shape[-1] for rows in scene.handle_embeddings]
    clips = [i for i, name in enumerate(ENCODERS[model]) if name != "t5xxl"]
    expected_width = sum(widths[i] for i in clips)  # Forge's SDXL width is clip_g's + clip_l's
    shapes, vectors, worst, refused = set(), set(), 0.0, 0
    for i, name in enumerate(triggers(scene).values()):
        path = folder / ("embeddings-forge" if model == "flux" else "embeddings") / f"{name}.safetensors"
        embedding = forge.create_embedding_from_data(load_file(path), name, filename=path.name)
        shapes.add(embedding.shape)
        vectors.add(embedding.vectors)
        vec = embedding.vec if isinstance(embedding.vec, dict) else {ENCODERS[model][0]: embedding.vec}
        for j in clips:
            ours = scene.handle_embeddings[j][i].float()
            worst = max(worst, float((vec[ENCODERS[model][j]].reshape(ours.shape) - ours).abs().max()))
        if model == "flux":
            try:
                forge.create_embedding_from_data(load_file(folder / "embeddings" / path.name), name)
            except AssertionError:  # "embedding file has multiple terms in it"
                refused += 1
    return dict(files=len(scene.handles), shapes=sorted(shapes), vectors=sorted(vectors), worst=worst,
                expected_width=expected_width, comfy_refused_by_forge=refused if model == "flux" else None)


def check(forge, work: Path, base: Path, model: str, tune: str) -> dict:
    from safetensors.torch import load_file

    scene, folder = learn_and_export(work, base, model, tune)
    (lora_path,) = (folder / "loras").glob("*.safetensors")
    lora = load_file(lora_path)
    kmodel, clip, convert = forge_models(forge, model, base)
    loaded = load_like_forge(forge, kmodel, clip, lora)
    result = dict(model=model, tune=tune, file_keys=len(lora),
                  **{k: v for k, v in loaded.items() if not k.endswith("_keys")})
    result.update(compare(scene, base, model, kmodel, clip, convert, loaded))
    result["embeddings"] = check_embeddings(forge, model, folder, scene)
    result["passed"] = passed(result)
    return result


def passed(r: dict) -> bool:
    e = r["embeddings"]
    return (not r["unmatched"] and r["unet_loaded"] == r["unet_patches"] > 0
            and r["clip_loaded"] == r["clip_patches"] == r["clip_patched"] > 0
            and r["denoiser_worst"] < TOLERANCE < r["denoiser_learnt"] and r["rest_is_base"] == 0.0
            and r["clip_worst"] < TOLERANCE
            and e["files"] > 0 and e["shapes"] == [e["expected_width"]] and e["vectors"] == [1] and e["worst"] == 0.0
            and e["comfy_refused_by_forge"] in (None, e["files"]))


def render(results: list[dict], commit: str) -> str:
    lines = [
        "# `export -f a1111`, loaded by Forge's own code",
        "",
        f"Forge (lllyasviel/stable-diffusion-webui-forge) at {commit}; its LoRA loader is ComfyUI's,",
        "as Forge vendors it (packages_3rdparty/comfyui_lora_collection); huggingface_guess from PyPI",
        "converts and detects the UNets as Forge's loader does. The tests' tiny models; Forge's CLIP",
        "built with transformers 4's module layout, which Forge runs. Produced by",
        "`python benchmarks/webui_lora_check.py --forge PATH`.",
        "",
        "| model | scene | keys in file | unmatched | denoiser weights patched | worst vs scene | scene vs base there"
        " | unpatched = base | unpatched the scene changed | CLIP weights patched | worst vs scene | embeddings | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["embeddings"]
        embeddings = (f"{e['files']} read as width {e['shapes']} (expected {e['expected_width']}), worst {e['worst']}"
                      + (f"; {e['comfy_refused_by_forge']} of {e['files']} two-encoder files refused" if r["model"] == "flux" else ""))
        lines.append(f"| {r['model']} | {r['tune']} | {r['file_keys']} | {len(r['unmatched'])} | {r['denoiser_patched']}"
                     f" | {r['denoiser_worst']:.1e} | {r['denoiser_learnt']:.1e}"
                     f" | {'yes' if r['rest_is_base'] == 0.0 else r['rest_is_base']} | {r['rest_scene_differs']}"
                     f" | {r['clip_patched']} | {r['clip_worst']:.1e} | {embeddings} | {'yes' if r['passed'] else 'NO'} |")
    lines += ["", "\"unpatched the scene changed\": weights the file leaves out by design (biases, norms,",
              "embedders: `export` reports them as left out); a LoRA scene changes none of them. Embeddings:",
              "Forge reads SD's `emb_params` and SDXL's `clip_l` + `clip_g` files as they are written; for FLUX",
              "it reads the CLIP-L copies in `embeddings-forge/` and refuses ComfyUI's two-encoder files."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forge", type=Path, required=True, help="a checkout of stable-diffusion-webui-forge")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--commit", help="Forge's commit, where PATH is not a git checkout")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "webui_lora-forge.md")
    args = parser.parse_args()
    forge = import_forge(args.forge.resolve())

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SCENEBREAK_HOME"] = str(work / "home")
        for model in args.models:
            base = build_base(model, work)
            for tune in ("lora", "full"):
                results.append(check(forge, work, base, model, tune))
    text = render(results, args.commit or forge_commit(args.forge))
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
