"""`export -f a1111`: a scene as the files AUTOMATIC1111, Forge and ComfyUI load on top
of the base model it was learned on.

    DIR/embeddings/SCENE-HANDLE.safetensors   one textual-inversion file per handle
    DIR/loras/SCENE-lora.safetensors          the phase-2 weights as one kohya LoRA
    DIR/README.md                             where each file goes, triggers, a prompt

The subfolders are named after the tools' folders they go into, and keep a handle's
file from ever meeting the LoRA's name. An embedding's trigger word in those tools is
its file name, and embeddings there apply to every prompt: so each trigger carries the
scene's name (`photo-asset1`, not `asset1`), which no ordinary word, and no other
scene's handle, spells. Handle names are checked again here (a scene is a stranger's
file) and must differ in more than letter case, since the tools' tokenizers lowercase.

Embedding files: `{"emb_params": (1, D)}` for SD 1.x/2.x (one key, as A1111 requires),
`{"clip_l": (1, 768), "clip_g": (1, 1280)}` for SDXL. The LoRA: see kohya.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .bundle import Scene
from .errors import BundleError, InvalidInput
from .events import Progress, Reporter, silent
from .kohya import DEFAULT_RANK, Extraction, adapter_layers, check_rank, extract_layers, kohya_state_dict

SCENE_PART = 40  # characters of the scene's name in file names: with a 200-character handle, under 255 bytes


@dataclass
class A1111Files:
    """Everything an a1111 export writes, computed before anything is written."""

    scene: str  # the scene's name as file names carry it
    embeddings: dict[str, dict]  # trigger -> tensors of its embedding file
    lora: dict  # kohya state dict
    lora_metadata: dict[str, str]
    readme: str
    extraction: Extraction

    @property
    def lora_name(self) -> str:
        return f"{self.scene}-lora"

    def paths(self, folder: Path) -> list[Path]:
        """The files written, LoRA first, then the embeddings, then the README."""
        return [folder / "loras" / f"{self.lora_name}.safetensors",
                *(folder / "embeddings" / f"{trigger}.safetensors" for trigger in self.embeddings),
                folder / "README.md"]

    def write(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        paths = self.paths(folder)
        root = folder.resolve()
        allowed = {root, root / "loras", root / "embeddings"}
        for path in paths:
            # The names are checked already; a stranger's scene is worth checking twice.
            if path.parent.resolve() not in allowed or path.name in ("", ".", "..") or "/" in path.name:
                raise BundleError(f"refusing to write {path.name[:60]!r} outside the export folder")
            path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.lora, str(paths[0]), metadata=self.lora_metadata)
        for path, (trigger, tensors) in zip(paths[1:-1], self.embeddings.items()):
            save_file(tensors, str(path), metadata={"scenebreak_scene": self.scene, "trigger": trigger})
        paths[-1].write_text(self.readme)
        return paths


def file_stem(name: str) -> str:
    """A scene's name as file names carry it: letters, digits, '.', '_' and '-' only
    (a scene's file may be called anything), at most SCENE_PART characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:SCENE_PART].rstrip("-._")
    return stem or "scene"


def triggers(scene: Scene) -> dict[str, str]:
    """Handle token -> trigger word (also its embedding file's name)."""
    from .tokens import valid_handle_token

    stem = file_stem(scene.name)
    result, seen = {}, {}
    for handle in scene.handles:
        if not valid_handle_token(handle.token):
            raise BundleError(f"scene {scene.name!r}: handle {handle.token[:40]!r} cannot name a file")
        trigger = f"{stem}-{handle.name}"
        if trigger.lower() in seen:
            raise InvalidInput(f"scene {scene.name!r}: handles {seen[trigger.lower()]} and {handle.token} differ only in "
                               "letter case, which AUTOMATIC1111 and ComfyUI (and case-insensitive disks) cannot tell apart")
        seen[trigger.lower()] = handle.token
        result[handle.token] = trigger
    return result


def prepare(scene: Scene, rank: int = DEFAULT_RANK, base_model: str | None = None,
            report: Reporter = silent) -> A1111Files:
    """The export's files for a scene loaded with its weights. A fully tuned scene
    needs its base model (from where it recorded it, or `base_model`) for the LoRA's
    weight differences; a LoRA scene's adapters are taken as they are."""
    check_rank(rank)
    names = triggers(scene)
    stem = file_stem(scene.name)
    embeddings = {}
    for i, handle in enumerate(scene.handles):
        rows = [e[i].detach().float().reshape(1, -1).contiguous().clone() for e in scene.handle_embeddings]
        # A1111 reads a one-key file as one embedding; SDXL's names its two encoders' rows.
        tensors = {"clip_l": rows[0], "clip_g": rows[1]} if scene.family.is_xl else {"emb_params": rows[0]}
        embeddings[names[handle.token]] = tensors
    if scene.needs_base_model:
        lora = scene.meta["lora"]
        layers = adapter_layers(scene.weights, lora["alpha"])
        extraction = Extraction(source="adapters", rank=lora["rank"], layers=len(layers))
        network_dim, network_alpha = lora["rank"], lora["alpha"]
    else:
        from .scene_models import scene_base_model

        c = scene_base_model(scene, base_model, f"exporting scene {scene.name!r} as a LoRA",
                             "the weight differences")
        base = {"unet": c.unet.state_dict(),
                **{name: te.state_dict() for name, te in zip(scene.family.text_encoders, c.text_encoders)}}
        tuned = {name: scene.weights[name] for name in base}

        def progress(done: int, total: int) -> None:
            report(Progress("extract LoRA", done, total))

        layers, extraction = extract_layers(tuned, base, rank, scene.stored_dtype, progress)
        network_dim = network_alpha = max((layer.down.shape[0] for layer in layers.values()), default=0)
    state = kohya_state_dict(layers, scene.family.is_xl)
    files = A1111Files(scene=stem, embeddings=embeddings, lora=state, lora_metadata={}, readme="", extraction=extraction)
    files.lora_metadata = _lora_metadata(scene, files, network_dim, network_alpha)
    files.readme = readme(scene, files, names)
    return files


def _lora_metadata(scene: Scene, files: A1111Files, dim: int, alpha: float) -> dict[str, str]:
    """kohya's metadata keys that the tools read (A1111 shows a LoRA only for the model
    version `ss_base_model_version` names), and where it came from."""
    family = scene.family
    version = {"SD 1.x": "sd_v1", "SD 2.x": "sd_v2", "SDXL": "sdxl_base_v1-0"}[family.name]
    if family.name == "SD 2.x" and family.prediction_type == "v_prediction":
        version = "sd_v2_v"
    base = scene.meta["base_model"]
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(alpha),
            "ss_base_model_version": version, "ss_output_name": files.lora_name, "ss_sd_model_name": str(base["id"]),
            "scenebreak_scene": files.scene, "scenebreak_base_model": str(base["id"]),
            "scenebreak_lora_source": files.extraction.source}


def _inline(text: str) -> str:
    """A scene's string for the README: one line, no backticks (it goes in code spans)."""
    return " ".join(str(text).replace("`", "'").split())[:300]


def readme(scene: Scene, files: A1111Files, names: dict[str, str]) -> str:
    family, base = scene.family, scene.meta["base_model"]
    revision = base.get("commit") or base.get("revision")
    objects = [names[token] for token in scene.object_tokens]
    first = objects[:2] or list(names.values())[:1]
    sample = "a photo of " + " and ".join(first) + " in the snow"
    comfy_sample = "a photo of " + " and ".join(f"embedding:{t}" for t in first) + " in the snow"
    lora = f"{files.lora_name}.safetensors"
    handle_rows = "\n".join(
        f"| `{names[h.token]}` | `{h.token}` | "
        f"{'the background (the photo outside the masks)' if h.background else f'mask {h.mask_index + 1}'} |"
        for h in scene.handles)
    if files.extraction.source == "adapters":
        fidelity = "The LoRA holds the scene's own LoRA adapters: base model + LoRA at strength 1.0 is the scene, exactly."
    else:
        e = files.extraction
        fidelity = (f"The scene was fully fine-tuned; the LoRA approximates its weight changes at rank {e.rank}: it keeps "
                    f"{e.kept:.2%} of the change in the {e.layers} layers it carries (worst layer: {e.worst[1]:.2%})"
                    if e.worst else "The scene was fully fine-tuned; its weights did not change in the layers a LoRA carries")
        if e.left_out:
            fidelity += f", and {e.left_out:.2%} of the change is in biases, norms and other layers a LoRA cannot carry"
        fidelity += (f". Relative error of the whole change: {e.relative_error:.2%}. Export again with a higher "
                     "`--rank` to keep more, or use `scenebreak export -f diffusers` for the exact weights.")
    v_note = ("\nThis base model predicts v (v-prediction): if your tool does not detect it, pick its v-prediction "
              "setting.\n" if family.prediction_type == "v_prediction" else "")
    sdxl_note = ("\nSDXL: each embedding file holds the handle's rows for both text encoders (`clip_l`, `clip_g`); "
                 "the tools load both.\n" if family.is_xl else "")
    return f"""# {files.scene}: a Break-A-Scene scene for AUTOMATIC1111, Forge and ComfyUI

Exported by scenebreak. Learned on the base model `{_inline(base['id'])}`{f' (revision `{_inline(revision)}`)' if revision else ''},
family {family.name}, at {scene.resolution}x{scene.resolution}. Select that same model as the checkpoint
(its single-file .safetensors): the embeddings and the LoRA only work on top of it.
{v_note}
## Files

| file | AUTOMATIC1111 / Forge | ComfyUI |
|---|---|---|
| `loras/{lora}` | `models/Lora/` | `models/loras/` |
| `embeddings/*.safetensors` | `embeddings/` | `models/embeddings/` |

## Trigger words

| write in the prompt | handle in scenebreak | learned from |
|---|---|---|
{handle_rows}

Use the LoRA at strength 1.0 (model and text encoder) together with the trigger words: the
embeddings alone carry only phase 1 and reproduce the objects less faithfully.
{fidelity}
{sdxl_note}
## AUTOMATIC1111 / Forge

Copy the files as above (or press the refresh button of the Lora and Textual Inversion
tabs), select the base model, and prompt:

    {sample} <lora:{files.lora_name}:1>

## ComfyUI

Copy the files as above. Put a `LoraLoader` node with `{lora}` between the checkpoint
loader and the rest (strength_model 1.0, strength_clip 1.0) and write the embeddings
with their `embedding:` prefix:

    {comfy_sample}

Sampling as scenebreak does it: DDIM 50 steps or DPM++ 2M 25 steps, CFG {family.guidance:g}, {scene.resolution}x{scene.resolution}.
"""
