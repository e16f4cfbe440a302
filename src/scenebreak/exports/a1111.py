"""`export -f a1111`: a scene as the files AUTOMATIC1111, Forge and ComfyUI load on top
of the base model it was learned on (and kohya's sd-scripts, for the blocks' layers).

    DIR/embeddings/SCENE-HANDLE.safetensors   one textual-inversion file per handle
    DIR/embeddings-forge/SCENE-HANDLE.safetensors  FLUX.1 only: the same for Forge (CLIP-L alone)
    DIR/loras/SCENE-lora.safetensors          the phase-2 weights as one kohya LoRA
    DIR/loras/SCENE-lora.json                 A1111/Forge's card for it: SD version, trigger words, weight
    DIR/README.md                             where each file goes, triggers, a prompt

The subfolders are named after the tools' folders they go into, and keep a handle's
file from ever meeting the LoRA's name. An embedding's trigger word in those tools is
its file name, and embeddings there apply to every prompt: so each trigger carries the
scene's name (`photo-asset1`, not `asset1`), which no ordinary word, and no other
scene's handle, spells. Handle names are checked again here (a scene is a stranger's
file). The tools' tokenizers lowercase, and some disks ignore case: handles that differ
only in letter case get triggers that differ in more (`photo-Cat`, `photo-cat-2`).

The LoRA's metadata says which model it is for as each tool reads it: A1111 lists a
LoRA only under models of the version it names (`ss_base_model_version` "sdxl_..." for
SDXL, else `ss_v2` "True" for SD 2.x, else SD 1.x), Forge reads
`modelspec.architecture` too, and both read the `.json` card beside the file. No
local path goes into a shared file: a base model from a folder is named by the
folder's name (or the hub id, where the folder is a hub cache snapshot).

Embedding files: `{"emb_params": (1, D)}` for SD 1.x/2.x (one key, as A1111 requires),
`{"clip_l": (1, 768), "clip_g": (1, 1280)}` for SDXL, `{"clip_l": (1, 768), "t5xxl":
(1, 4096)}` for FLUX.1 (ComfyUI's keys; diffusers loads each row into its encoder).
AUTOMATIC1111 has no FLUX.1, and Forge's reads CLIP-L embeddings only, from one-key
files: a family with `forge_embedding` gets those too, in `embeddings-forge/` (the
trigger's T5 row, the one FLUX's attention reads, is then lost in Forge; the README
says so). The LoRA: see kohya.py; on FLUX.1 its metadata is kohya's FLUX LoRA's
(`networks.lora_flux`, BFL's implementation, which Forge lists under Flux).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BundleError
from ..events import Message, Progress, Reporter, silent
from ..families.versions import with_model_key_names
from ..scenes.bundle import Scene
from .kohya import (BFL_IMPLEMENTATION, DEFAULT_RANK, KOHYA_SKIPS, Extraction, adapter_layers, bfl_denoiser, check_rank,
                    extract_layers, kohya_skips, kohya_state_dict)

SCENE_PART = 40  # characters of the scene's name in file names: with a 200-character handle, under 255 bytes
MAX_STEM = 255 - len(".safetensors")  # bytes of a file name's stem (names here are ASCII)
SGM = "https://github.com/Stability-AI/generative-models"
FORGE_EMBEDDINGS = "embeddings-forge"  # a family's embeddings in Forge's layout, where it differs
WEBUI_TOOLS = ("AUTOMATIC1111", "Forge", "ComfyUI")  # what the export is for, unless the family says fewer


def webui_tools(family) -> tuple[str, ...]:
    """The tools of WEBUI_TOOLS that load the family (FLUX.1: not AUTOMATIC1111)."""
    return tuple(getattr(family, "webui_tools", WEBUI_TOOLS))


@dataclass
class A1111Files:
    """Everything an a1111 export writes, computed before anything is written."""

    scene: str  # the scene's name as file names carry it
    embeddings: dict[str, dict]  # trigger -> tensors of its embedding file
    lora: dict  # kohya state dict
    lora_metadata: dict[str, str]
    readme: str
    extraction: Extraction
    card: dict = field(default_factory=dict)  # the LoRA's .json beside it (A1111/Forge "user metadata")
    forge_embeddings: dict[str, dict] = field(default_factory=dict)  # trigger -> Forge's file, where it differs

    @property
    def lora_name(self) -> str:
        return f"{self.scene}-lora"

    def paths(self, folder: Path) -> list[Path]:
        """The files written: the LoRA and its card, then the embeddings (Forge's after the
        others), then the README."""
        return [folder / "loras" / f"{self.lora_name}.safetensors", folder / "loras" / f"{self.lora_name}.json",
                *(folder / "embeddings" / f"{trigger}.safetensors" for trigger in self.embeddings),
                *(folder / FORGE_EMBEDDINGS / f"{trigger}.safetensors" for trigger in self.forge_embeddings),
                folder / "README.md"]

    def write(self, folder: Path) -> list[Path]:
        from safetensors.torch import save_file

        paths = self.paths(folder)
        root = folder.resolve()
        allowed = {root, root / "loras", root / "embeddings", root / FORGE_EMBEDDINGS}
        for path in paths:
            # The names are checked already; a stranger's scene is worth checking twice.
            if path.parent.resolve() not in allowed or path.name in ("", ".", "..") or "/" in path.name:
                raise BundleError(f"refusing to write {path.name[:60]!r} outside the export folder")
            path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.lora, str(paths[0]), metadata=self.lora_metadata)
        paths[1].write_text(json.dumps(self.card, indent=4) + "\n", encoding="utf-8")
        embeddings = [*self.embeddings.items(), *self.forge_embeddings.items()]
        for path, (trigger, tensors) in zip(paths[2:-1], embeddings):
            save_file(tensors, str(path), metadata={"scenebreak_scene": self.scene, "trigger": trigger})
        paths[-1].write_text(self.readme, encoding="utf-8")
        return paths


def file_stem(name: str) -> str:
    """A scene's name as file names carry it: letters, digits, '.', '_' and '-' only
    (a scene's file may be called anything), at most SCENE_PART characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")[:SCENE_PART].rstrip("-._")
    return stem or "scene"  # (only ever followed by -lora or -HANDLE: never a device's name)


def portable_stem(name: str, kind: str) -> str:
    """`name` as a file's stem that Windows takes: a name it keeps for a device (con,
    com1, nul.x: opening such a file opens the device) gets `-KIND` after its first
    word. Scenes made before names had to be portable may still carry one."""
    from ..paths import windows_device_name

    if not windows_device_name(name):
        return name
    head, dot, rest = name.partition(".")  # (Windows reads nul.v2 as NUL too: the word before the dot)
    return f"{head}-{kind}{dot}{rest}"


def distinct_names(names: list[str], limit: int = MAX_STEM) -> list[str]:
    """`names` made distinct without regard to letter case, in order: a name whose
    lowercase was taken before gets the first free `-2`, `-3`... (one that no other
    name spells either), trimmed to `limit` characters with it. Tools that lowercase,
    and disks that ignore case, then still tell every file apart."""
    spelled = {name.lower() for name in names}
    taken: set[str] = set()
    result = []
    for name in names:
        if name.lower() in taken:
            n = 2
            while (candidate := f"{name[:limit - len(str(n)) - 1]}-{n}").lower() in taken | spelled:
                n += 1
            name = candidate
        taken.add(name.lower())
        result.append(name)
    return result


def triggers(scene: Scene) -> dict[str, str]:
    """Handle token -> trigger word (also its embedding file's name)."""
    from ..handles import valid_handle_token

    stem = file_stem(scene.name)
    for handle in scene.handles:
        if not valid_handle_token(handle.token):
            raise BundleError(f"scene {scene.name!r}: handle {handle.token[:40]!r} cannot name a file")
    words = distinct_names([f"{stem}-{handle.name}" for handle in scene.handles])
    return {handle.token: word for handle, word in zip(scene.handles, words)}


def base_model_name(base: dict) -> str:
    """The base model as a file meant to be shared names it: its hub id, or for a local
    folder the folder's name (kohya writes that too), or the hub id where the folder is
    a snapshot in the hub cache (`.../models--owner--name/snapshots/<commit>`). Never
    the path: it says nothing on another machine and tells where files are on this one."""
    ref = str(base.get("id", ""))
    parts = [part for part in re.split(r"[\\/]+", ref) if part]
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", ref)
    if hub_id and not ref.startswith("~") and len(parts) <= 2:
        return ref
    for part in reversed(parts):
        cached = re.fullmatch(r"models--([\w.-]+?)--([\w.-]+)", part)
        if cached:
            return f"{cached[1]}/{cached[2]}"
    return parts[-1] if parts else "unknown"


def prepare(scene: Scene, rank: int = DEFAULT_RANK, base_model: str | None = None,
            report: Reporter = silent, kohya_strict: bool = False) -> A1111Files:
    """The export's files for a scene loaded with its weights. A fully tuned scene
    needs its base model (from where it recorded it, or `base_model`) for the LoRA's
    weight differences; a LoRA scene's adapters are taken as they are. `kohya_strict`
    leaves out the layers kohya's loaders skip (kohya.UNET_OUTER)."""
    check_rank(rank)
    names = triggers(scene)
    stem = file_stem(scene.name)
    forge_layout = getattr(scene.family, "forge_embedding", None)
    embeddings, forge_embeddings = {}, {}
    for i, handle in enumerate(scene.handles):
        rows = [e[i].detach().float().reshape(1, -1).contiguous().clone() for e in scene.handle_embeddings]
        embeddings[names[handle.token]] = scene.family.a1111_embedding(rows)
        if forge_layout:
            forge_embeddings[names[handle.token]] = forge_layout(rows)
    if scene.needs_base_model:
        lora = scene.meta["lora"]
        layers = adapter_layers(scene.weights, lora["alpha"])
        if kohya_strict:
            layers = {path: layer for path, layer in layers.items() if not kohya_skips(path)}
        extraction = Extraction(source="adapters", rank=lora["rank"], layers=len(layers), kohya_strict=kohya_strict)
        network_dim, network_alpha = lora["rank"], lora["alpha"]
        unet_config = (scene.meta.get("configs") or {}).get(scene.family.denoiser)
    else:
        from ..sample.scene_models import scene_base_model

        report(Message(f"loading its base model {base_model or scene.meta['base_model']['id']}, to take the "
                       "difference from it"))
        c = scene_base_model(scene, base_model, f"exporting scene {scene.name!r} as a LoRA",
                             "the weight differences", report=report)
        base = {scene.family.denoiser: c.denoiser.state_dict(),
                **{name: te.state_dict() for name, te in zip(scene.family.text_encoders, c.text_encoders)}}
        tuned = {name: with_model_key_names(scene.weights[name], base[name]) for name in base}

        def progress(done: int, total: int) -> None:
            report(Progress("extract LoRA", done, total))

        layers, extraction = extract_layers(tuned, base, rank, scene.stored_dtype, progress, kohya_strict,
                                            bfl_denoiser(scene.family))
        network_dim = max((layer.down.shape[0] for layer in layers.values()), default=0)
        network_alpha = float(rank)  # every layer's (kohya._truncated_svd)
        unet_config = c.denoiser.config
    state = kohya_state_dict(layers, scene.family, unet_config)
    files = A1111Files(scene=stem, embeddings=embeddings, lora=state, lora_metadata={}, readme="",
                       extraction=extraction, forge_embeddings=forge_embeddings)
    files.lora_metadata = _lora_metadata(scene, files, network_dim, network_alpha, names)
    files.card = _card(scene, files, names)
    files.readme = readme(scene, files, names)
    return files


def _activation_text(scene: Scene, names: dict[str, str]) -> str:
    """The trigger words a prompt with the LoRA usually wants: the objects' (all, if
    the scene has only a background)."""
    tokens = scene.object_tokens or scene.tokens
    return ", ".join(names[token] for token in tokens)


def _lora_metadata(scene: Scene, files: A1111Files, dim: int, alpha: float, names: dict[str, str]) -> dict[str, str]:
    """The metadata keys the tools read to tell which model a LoRA is for (kohya's
    `ss_*`, and the ModelSpec keys kohya writes too), and where it came from."""
    family = scene.family
    base, r = base_model_name(scene.meta["base_model"]), scene.resolution
    bfl = bfl_denoiser(family) is not None
    meta = {"ss_network_module": "networks.lora_flux" if bfl else "networks.lora", "ss_network_dim": str(dim),
            "ss_network_alpha": str(alpha), "ss_v2": str(family.a1111_version == "SD2"),
            "ss_base_model_version": family.kohya_version, "ss_output_name": files.lora_name, "ss_sd_model_name": base,
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{family.modelspec_architecture}/lora",
            # the names the denoiser's keys follow (kohya.py); Forge lists a LoRA in BFL's names under Flux
            "modelspec.implementation": SGM if family.kohya_sgm_unet else BFL_IMPLEMENTATION if bfl else "diffusers",
            "modelspec.title": files.lora_name, "modelspec.resolution": f"{r}x{r}",
            "modelspec.prediction_type": "v" if family.prediction_type == "v_prediction" else "epsilon",
            "modelspec.trigger_phrase": _activation_text(scene, names),
            "scenebreak_scene": files.scene, "scenebreak_base_model": base,
            "scenebreak_lora_source": files.extraction.source}
    if bfl:
        del meta["modelspec.prediction_type"]  # a flow model: kohya writes none for FLUX
    if any(key.endswith(".lora_down.weight") and t.ndim == 4 and t.shape[-1] > 1 for key, t in files.lora.items()):
        # 3x3 convolutions, as kohya's LoCon: its trainers build them only with these network args
        meta["ss_network_args"] = json.dumps({"conv_dim": str(dim), "conv_alpha": str(alpha)})
    return meta


def _card(scene: Scene, files: A1111Files, names: dict[str, str]) -> dict:
    """A1111's and Forge's user metadata of the LoRA (`NAME.json` beside it): the SD
    version it lists under, the trigger words a click adds with it, its weight."""
    handles = "; ".join(f"{names[h.token]}: {'the background' if h.background else f'mask {h.mask_index + 1}'}"
                        for h in scene.handles)
    return {"description": f"Break-A-Scene scene {files.scene} on {base_model_name(scene.meta['base_model'])}: use it "
                           "with its embeddings (see README.md)",
            "sd version": scene.family.a1111_version,
            "activation text": _activation_text(scene, names),
            "preferred weight": 1.0,
            "notes": f"Trigger words (the embeddings' file names): {handles}. Exported by scenebreak."}


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
            parts = ", ".join(e.left_out_parts)
            fidelity += f", and {e.left_out:.2%} of the change is in parameters the file does not carry ({parts})"
        fidelity += (f". Relative error of the whole change: {e.relative_error:.2%}. Export again with a higher "
                     "`--rank` to keep more, or use `scenebreak export -f diffusers` for the exact weights.")
    tools = webui_tools(family)
    webui = " / ".join(tool for tool in tools if tool != "ComfyUI")
    fidelity += "\n\n" + _kohya_note(files, tools)
    v_note = ("\nThis base model predicts v (v-prediction): if your tool does not detect it, pick its v-prediction "
              "setting.\n" if family.prediction_type == "v_prediction" else "")
    keys = sorted(next(iter(files.embeddings.values()), {}))
    encoders_note = (f"\n{family.name}: each embedding file holds the handle's rows for all {len(family.text_encoders)} "
                     f"text encoders ({', '.join(f'`{k}`' for k in keys)}); the tools load them all.\n"
                     if len(family.text_encoders) > 1 else "")
    embedding_rows = "| `embeddings/*.safetensors` | `embeddings/` | `models/embeddings/` |"
    if files.forge_embeddings:
        forge_keys = ", ".join(f"`{k}`" for k in sorted(next(iter(files.forge_embeddings.values()))))
        embedding_rows = (f"| `embeddings/*.safetensors` ({', '.join(f'`{k}`' for k in keys)}) | cannot load them | "
                          f"`models/embeddings/` |\n| `{FORGE_EMBEDDINGS}/*.safetensors` ({forge_keys} alone) | "
                          "`embeddings/` | not needed |")
        encoders_note = _forge_note(family, keys, forge_keys, first)
    return f"""# {files.scene}: a Break-A-Scene scene for {_and(tools)}

Exported by scenebreak. Learned on the base model `{_inline(base_model_name(base))}`{f' (revision `{_inline(revision)}`)' if revision else ''},
family {family.name}, at {scene.resolution}x{scene.resolution}. Select that same model as the checkpoint
(its single-file .safetensors): the embeddings and the LoRA only work on top of it.
{v_note}
## Files

| file | {webui} | ComfyUI |
|---|---|---|
| `loras/{lora}` | `models/Lora/` | `models/loras/` |
| `loras/{files.lora_name}.json` (its card: SD version, trigger words, weight) | `models/Lora/`, beside it | not needed |
{embedding_rows}

## Trigger words

| write in the prompt | handle in scenebreak | learned from |
|---|---|---|
{handle_rows}

Use the LoRA at strength 1.0 (model and text encoder) together with the trigger words: the
embeddings alone carry only phase 1 and reproduce the objects less faithfully.
{fidelity}
{encoders_note}
## {webui}

Copy the files as above (or press the refresh button of the Lora and Textual Inversion
tabs), select the base model, and prompt:

    {sample} <lora:{files.lora_name}:1>

## ComfyUI

Copy the files as above. Put a `LoraLoader` node with `{lora}` between the checkpoint
loader and the rest (strength_model 1.0, strength_clip 1.0) and write the embeddings
with their `embedding:` prefix:

    {comfy_sample}

Sampling as scenebreak does it: {_sampling(family)}, {scene.resolution}x{scene.resolution}.
"""


def _and(words) -> str:
    words = list(words)
    return ", ".join(words[:-1]) + f" and {words[-1]}" if len(words) > 1 else "".join(words)


def _sampling(family) -> str:
    """The README's sampler advice: a flow model (no classifier-free guidance) samples
    with Euler, at its own steps and embedded guidance."""
    if family.classifier_free:
        return f"DDIM 50 steps or DPM++ 2M 25 steps, CFG {family.guidance:g}"
    text = f"Euler {family.sampler_steps(family.samplers[0])} steps, CFG 1"
    if family.takes_guidance:
        text += (f", guidance {family.guidance:g} (Forge's Distilled CFG Scale, ComfyUI's FluxGuidance node; "
                 "the model embeds it)")
    return text


def _forge_note(family, keys: list[str], forge_keys: str, first: list[str]) -> str:
    """Which tools read which rows of a FLUX.1 embedding, for the README."""
    listed = ", ".join(f"`{k}`" for k in keys)
    trigger = first[0] if first else "TRIGGER"
    return f"""
## Embeddings: which tools take the T5 row

{family.name}: each file in `embeddings/` holds the handle's rows for both text encoders ({listed}).
Only T5's tokens reach the transformer's attention (CLIP-L gives a pooled vector), so the T5 row is
the one that puts the object where the prompt says.

- ComfyUI takes both (`t5xxl` into T5-XXL, `clip_l` into CLIP-L; ComfyUI from September 2024 on).
- diffusers takes both, one encoder at a time:
  `pipe.load_textual_inversion(rows["clip_l"], token="{trigger}", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`
  and the same with `rows["t5xxl"]`, `text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2`;
  then copy the value of `pipe.tokenizer.eos_token_id` into `pipe.text_encoder.config.eos_token_id` and into the
  `eos_token_id` of each module of `pipe.text_encoder.modules()` that has one (FLUX.1's CLIP-L config carries the legacy
  `eos_token_id: 2`, with which transformers pools at the largest token id: the trigger's, not the end of the
  prompt, where the scene was trained to pool).
- Forge takes CLIP-L embeddings only, from files with one key: it cannot load the files in `embeddings/`
  (keep them out of its `embeddings/` folder). Its copies in `{FORGE_EMBEDDINGS}/` hold {forge_keys} alone, so in
  Forge the trigger words reach T5 as plain text and the objects come out less faithfully than in ComfyUI.
- AUTOMATIC1111 has no FLUX.1.
"""


def _kohya_note(files: A1111Files, tools: tuple[str, ...] = WEBUI_TOOLS) -> str:
    """Which tools apply which layers of the LoRA, for the README."""
    e = files.extraction
    conv = "ss_network_args" in files.lora_metadata
    fused = files.lora_metadata.get("modelspec.implementation") == BFL_IMPLEMENTATION
    resume = (" To train on from it with kohya's `--network_weights`, pass `--dim_from_weights` (it holds 3x3 "
              "convolutions, as kohya's LoCon)." if conv else "")
    if fused:
        resume = (" Its layers that hold q, k and v in one (as Black Forest Labs' model does; the single-stream "
                  "blocks' `linear1` also the MLP's input) have 3 or 4 times the rank of the others: to train on "
                  "from it with kohya's `--network_weights`, pass `--dim_from_weights`.")
    if any(key.startswith("lora_te3_") for key in files.lora):  # a fully tuned FLUX.1 scene's T5 layers
        return (f"{_and([t for t in ('ComfyUI', 'Forge') if t in tools])} and kohya's sd-scripts apply every layer "
                "of the LoRA, T5's (`lora_te3_`) too; diffusers' `load_lora_weights` skips T5's layers (there, "
                f"`scenebreak export -f diffusers` has the scene's T5 exactly).{resume}")
    appliers = _and([*(t for t in ("ComfyUI", "AUTOMATIC1111", "Forge") if t in tools), "diffusers"])
    if e.kohya_strict and not fused:  # on FLUX.1 the file holds nothing kohya skips
        share = f" (they held {e.kohya_skipped:.2%} of the change)" if e.source == "svd" else ""
        return (f"Exported with `--kohya-strict`: {KOHYA_SKIPS} are left out{share}, so kohya's sd-scripts "
                f"apply the same layers as {appliers}.{resume}")
    if e.source == "svd" and e.kohya_skipped:
        return (f"{appliers} apply every layer of the LoRA (diffusers from 0.39: older releases refuse the file on "
                f"SDXL and skip those layers on SD). kohya's sd-scripts "
                f"(`merge_lora.py`, `sdxl_merge_lora.py`, `--network_weights`) skip {KOHYA_SKIPS}, which hold "
                f"{e.kohya_skipped:.2%} of the change; `scenebreak export --kohya-strict` leaves them out of the "
                f"file.{resume}")
    return f"{appliers.replace(' and ', ', ')} and kohya's sd-scripts apply every layer of the LoRA.{resume}"
