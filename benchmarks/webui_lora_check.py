"""Does Forge load `scenebreak export -f a1111` of a FLUX.1 scene as the scene? Checked
with Forge's own loading code, not with our reading of it.

A tiny FLUX.1-dev (tests/tinymodels.py) learns the bundled example twice, with LoRA
(FLUX's default) and with full tuning (exported by SVD at full rank, so that every layer
kind the file carries is exercised: fused q/k/v, the single blocks' linear1 and linear2,
the modulations). Each scene is exported with `-f a1111` and loaded the way Forge's
LoRA extension loads a file (extensions-builtin/sd_forge_lora/networks.py,
load_lora_for_models), step by step with Forge's functions:

- the base transformer is Forge's own FLUX module (backend/nn/flux.py), built at the
  tiny model's size and filled from the diffusers weights through the key map that
  ComfyUI and Forge use to read diffusers FLUX files (flux_to_diffusers), so its
  parameter names are BFL's as in every FLUX checkpoint they load;
- the text encoders are Forge's IntegratedCLIP and IntegratedT5 in Forge's CLIP object;
- `model_lora_keys_unet`, `model_lora_keys_clip` and `load_lora` (backend/patcher/lora.py,
  which runs ComfyUI's loader as Forge vendors it, packages_3rdparty/comfyui_lora_collection)
  match the file's keys; every key must be taken (Forge ignores a file with more than 12
  unmatched keys and warns for fewer);
- Forge's ModelPatcher adds the patches and its LoraLoader merges them into the weights,
  as it does before sampling.

The merged weights are compared with the scene's own (a LoRA scene's adapters merged by
peft), mapped to BFL names the same way. The embeddings: Forge's textual-inversion reader
(create_embedding_from_data) on the files in `embeddings-forge/`, whose shape must be
CLIP-L's 768 (what Forge's FLUX engine expects) and whose row must be the scene's; and on
the two-encoder files in `embeddings/`, which Forge refuses (hence the copies).

    pip install einops sentencepiece   # Forge's modules import them
    python benchmarks/webui_lora_check.py --forge PATH/TO/stable-diffusion-webui-forge

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
        from backend.modules.k_model import KModel
        from backend.patcher import lora
        from backend.patcher.base import ModelPatcher
        from backend.patcher.clip import CLIP
        from backend.text_processing.textual_inversion import create_embedding_from_data
        from packages_3rdparty.comfyui_lora_collection import utils
    finally:
        sys.argv = argv
    return types.SimpleNamespace(IntegratedCLIP=IntegratedCLIP, IntegratedFluxTransformer2DModel=IntegratedFluxTransformer2DModel,
                                 IntegratedT5=IntegratedT5, KModel=KModel, lora=lora, ModelPatcher=ModelPatcher,
                                 CLIP=CLIP, create_embedding_from_data=create_embedding_from_data, utils=utils)


def forge_commit(folder: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def learn_and_export(work: Path, base: Path, tune: str) -> tuple[Path, Path]:
    """The example learnt on the tiny FLUX with `tune`, exported with -f a1111."""
    from scenebreak import LearnConfig, learn
    from scenebreak.exports.export import export

    config = (LearnConfig(**FEW, tune="lora", rank=4, lr_lora=1e-2) if tune == "lora"
              else LearnConfig(**FEW, tune="full", lr2=1e-3, save_dtype="fp32"))
    masks = sorted(EXAMPLE.glob("mask*.png"))[:2]
    scene = learn(EXAMPLE / "img.jpg", masks, config, base_model=str(base), device="cpu",
                  output=work / f"{tune}.scene").path
    export(scene, work / f"{tune}-a1111", "a1111")
    return scene, work / f"{tune}-a1111"


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


def forge_models(forge, base: Path):
    """Forge's transformer and text encoders, holding the base's weights."""
    import torch
    from transformers import CLIPTextModel

    from scenebreak.families.base_model import load_components

    components = load_components(str(base))
    unet_config = bfl_unet_config(components.denoiser.config)
    flux = forge.IntegratedFluxTransformer2DModel(**unet_config)
    flux.config = unet_config  # as Forge's loader sets it
    flux.storage_dtype = flux.computation_dtype = torch.float32
    flux.load_state_dict(to_bfl(forge, components.denoiser.state_dict(), unet_config, flux.state_dict()))
    kmodel = forge.KModel(flux, None, k_predictor=object(),
                          config=types.SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev"))

    clip_encoder, t5_encoder = components.text_encoders

    class CLIPTextModelAsInTransformers4(torch.nn.Module):
        """Forge runs transformers 4, whose CLIPTextModel holds the encoder under
        `text_model` (its weights' names begin "text_model."); transformers 5 dropped
        that level. The same module one level down keeps Forge's names."""

        def __init__(self, config):
            super().__init__()
            self.text_model = CLIPTextModel(config)

    clip_l = forge.IntegratedCLIP(CLIPTextModelAsInTransformers4, clip_encoder.config, add_text_projection=True)
    clip_l.transformer.text_model.load_state_dict(clip_encoder.state_dict())
    t5 = t5_encoder.config
    t5xxl = forge.IntegratedT5(dict(num_layers=t5.num_layers, d_model=t5.d_model, d_ff=t5.d_ff,
                                    dense_act_fn=t5.dense_act_fn, is_gated_act=t5.is_gated_act,
                                    num_heads=t5.num_heads, model_type=t5.model_type, vocab_size=t5.vocab_size))
    clip = forge.CLIP(model_dict={"clip_l": clip_l, "t5xxl": t5xxl}, tokenizer_dict={})
    return kmodel, clip, unet_config


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


def compare(forge, scene_path: Path, base: Path, kmodel, clip, unet_config, loaded: dict) -> dict:
    """Forge's merged weights against the scene's: the patched ones must be the scene's,
    the rest the base's (what the file leaves out by design: biases, norms, embedders)."""
    from scenebreak import load_scene
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components
    from scenebreak.sample.scene_models import scene_components

    import torch

    transformer, _, (scene_clip, _), _ = scene_components(load_scene(scene_path), choose_device("cpu"),
                                                           dtype=torch.float32)
    forge_state = kmodel.diffusion_model.state_dict()
    scene_state = to_bfl(forge, transformer.state_dict(), unet_config, forge_state)
    base_state = to_bfl(forge, load_components(str(base)).denoiser.state_dict(), unet_config, forge_state)
    patched = [k[len("diffusion_model."):] for k in loaded["unet_keys"]]

    def worst(a, b, keys):
        return max((float((a[k] - b[k]).abs().max()) for k in keys), default=0.0)

    rest = [k for k in forge_state if k not in patched]
    clip_patched = [k[len("clip_l.transformer.text_model."):] for k in loaded["clip_keys"]]
    forge_clip = clip.cond_stage_model.clip_l.transformer.text_model.state_dict()
    return dict(
        transformer_patched=len(patched), transformer_worst=worst(forge_state, scene_state, patched),
        transformer_learnt=worst(scene_state, base_state, patched),
        rest_is_base=worst(forge_state, base_state, rest),
        rest_scene_differs=sum(float((scene_state[k] - base_state[k]).abs().max()) > TOLERANCE for k in rest),
        clip_patched=len(clip_patched), clip_worst=worst(forge_clip, scene_clip.state_dict(), clip_patched),
    )


def check_embeddings(forge, folder: Path, scene_path: Path) -> dict:
    """Forge's textual-inversion reader on both layouts the export writes."""
    from safetensors.torch import load_file

    from scenebreak import load_scene
    from scenebreak.exports.a1111 import triggers

    scene = load_scene(scene_path)
    shapes, vectors, worst, refused = set(), set(), 0.0, 0
    for i, name in enumerate(triggers(scene).values()):
        path = folder / "embeddings-forge" / f"{name}.safetensors"
        embedding = forge.create_embedding_from_data(load_file(path), name, filename=path.name)
        shapes.add(embedding.shape)
        vectors.add(embedding.vectors)
        ours = scene.handle_embeddings[0][i].float()  # the handle's CLIP-L row
        worst = max(worst, float((embedding.vec.reshape(ours.shape) - ours).abs().max()))
        try:
            forge.create_embedding_from_data(load_file(folder / "embeddings" / path.name), name)
        except AssertionError:  # "embedding file has multiple terms in it"
            refused += 1
    return dict(files=len(scene.handles), shapes=sorted(shapes), vectors=sorted(vectors), worst=worst,
                comfy_refused_by_forge=refused, clip_width=scene.handle_embeddings[0].shape[-1])


def check(forge, work: Path, base: Path, tune: str) -> dict:
    from safetensors.torch import load_file

    scene, folder = learn_and_export(work, base, tune)
    (lora_path,) = (folder / "loras").glob("*.safetensors")
    lora = load_file(lora_path)
    kmodel, clip, unet_config = forge_models(forge, base)
    loaded = load_like_forge(forge, kmodel, clip, lora)
    result = dict(tune=tune, file_keys=len(lora), **{k: v for k, v in loaded.items() if not k.endswith("_keys")})
    result.update(compare(forge, scene, base, kmodel, clip, unet_config, loaded))
    result["embeddings"] = check_embeddings(forge, folder, scene)
    result["passed"] = passed(result)
    return result


def passed(r: dict) -> bool:
    e = r["embeddings"]
    return (not r["unmatched"] and r["unet_loaded"] == r["unet_patches"] > 0
            and r["clip_loaded"] == r["clip_patches"] > 0
            and r["transformer_worst"] < TOLERANCE < r["transformer_learnt"] and r["rest_is_base"] == 0.0
            and r["clip_worst"] < TOLERANCE
            and e["files"] > 0 and e["shapes"] == [e["clip_width"]] and e["vectors"] == [1] and e["worst"] == 0.0
            and e["comfy_refused_by_forge"] == e["files"])


def render(results: list[dict], commit: str) -> str:
    lines = [
        "# `export -f a1111` on FLUX.1, loaded by Forge's own code",
        "",
        f"Forge (lllyasviel/stable-diffusion-webui-forge) at {commit}; its LoRA loader is ComfyUI's,",
        "as Forge vendors it (packages_3rdparty/comfyui_lora_collection). Tiny FLUX.1-dev",
        "(tests/tinymodels.py): its CLIP-L is 32 wide, so an embedding's width is checked",
        "against that (Forge's FLUX engine takes CLIP-L embeddings of CLIP-L's width, 768 on",
        "the real model). Forge's CLIP-L is built with transformers 4's module layout, which",
        "Forge runs. Produced by `python benchmarks/webui_lora_check.py --forge PATH`.",
        "",
        "| scene | keys in file | unmatched | transformer weights patched | worst vs scene | scene vs base there"
        " | unpatched = base | unpatched the scene changed | CLIP-L weights patched | worst vs scene | passed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['tune']} | {r['file_keys']} | {len(r['unmatched'])} | {r['transformer_patched']}"
                     f" | {r['transformer_worst']:.1e} | {r['transformer_learnt']:.1e}"
                     f" | {'yes' if r['rest_is_base'] == 0.0 else r['rest_is_base']} | {r['rest_scene_differs']}"
                     f" | {r['clip_patched']} | {r['clip_worst']:.1e} | {'yes' if r['passed'] else 'NO'} |")
    lines += ["", "Embeddings (Forge's create_embedding_from_data):", ""]
    for r in results:
        e = r["embeddings"]
        lines.append(f"- {r['tune']}: {e['files']} files in embeddings-forge/ read as width {e['shapes']},"
                     f" {e['vectors']} vector, worst difference from the scene's CLIP-L row {e['worst']};"
                     f" {e['comfy_refused_by_forge']} of {e['files']} two-encoder files in embeddings/"
                     " refused by Forge (ComfyUI's layout; Forge reads one tensor per file).")
    lines += ["", "\"unpatched the scene changed\": weights the file leaves out by design (biases, norms,",
              "embedders: `export` reports them as left out); a LoRA scene changes none of them."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forge", type=Path, required=True, help="a checkout of stable-diffusion-webui-forge")
    parser.add_argument("--commit", help="Forge's commit, where PATH is not a git checkout")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "webui_lora-forge.md")
    args = parser.parse_args()
    forge = import_forge(args.forge.resolve())
    from tinymodels import build_tiny_flux

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["SCENEBREAK_HOME"] = str(work / "home")
        base = build_tiny_flux(work / "tiny-flux-dev")
        for tune in ("lora", "full"):
            results.append(check(forge, work, base, tune))
    text = render(results, args.commit or forge_commit(args.forge))
    print(text)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
