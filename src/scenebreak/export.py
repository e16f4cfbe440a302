"""`export`: a scene's learned weights in formats other tools load.

- `diffusers`: a standard pipeline folder of the scene's family (fine-tuned UNet and
  text encoder(s) with the handles, tokenizer(s), VAE, DDIM scheduler) that
  `StableDiffusionPipeline.from_pretrained(folder)` (SDXL:
  `StableDiffusionXLPipeline`) loads anywhere, in the precision the scene stores
  (fp16 unless learned with `--save-dtype fp32`). A LoRA scene's adapters are merged
  into its base model's weights for this.
- `embeddings`: one textual-inversion file per handle (`NAME.safetensors`), which
  diffusers' `load_textual_inversion` loads into the same base model: for SD 1.x/2.x
  `{"<NAME>": embedding}`; for SDXL `{"clip_l": row, "clip_g": row}`, the handle's
  rows in the first and second text encoder, loaded once into each. The handles alone
  carry phase 1 only: without the phase-2 UNet and text encoder they reproduce the
  objects less faithfully than the scene.

Either way the folder is written whole (atomically) with a `.scenebreak-export`
marker, and `--force` replaces only a folder that has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import __version__
from .bundle import load_scene
from .errors import InvalidInput
from .paths import home, write_atomically

FORMATS = ("diffusers", "embeddings")
# Written into every export folder: `--force` replaces a folder only when it holds one,
# so it can never empty a folder that scenebreak did not make.
MARKER = ".scenebreak-export"


def export_scene(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
                 base_model: str | None = None) -> list[Path]:
    """Write the scene in `format` as the folder `out` (replacing an earlier export
    there with `force`); returns the paths written."""
    if format not in FORMATS:
        raise InvalidInput(f"unknown export format {format!r}: use {' or '.join(FORMATS)}")
    out = Path(out)
    check_export_target(out, force)
    scene = load_scene(scene, weights=format == "diffusers")
    marker = json.dumps({"format": format, "scene": scene.name, "scenebreak": __version__})

    def write(tmp: Path) -> None:
        if format == "embeddings":
            _write_embeddings(scene, tmp)
        else:
            _write_diffusers(scene, tmp, base_model)
        (tmp / MARKER).write_text(marker + "\n")

    write_atomically(out, write)
    if format == "embeddings":
        return [out / f"{handle.name}.safetensors" for handle in scene.handles]
    return [out]


def check_export_target(out: Path, force: bool) -> None:
    """An export goes to a new or empty folder, or replaces an earlier export (`force`).
    Never the current folder or one above it, the home folder, or scenebreak's cache."""
    resolved = out.expanduser().resolve()
    cwd, cache = Path.cwd().resolve(), home().expanduser().resolve()
    protected = {cwd, *cwd.parents, Path.home().resolve(), cache, *cache.parents}
    if resolved in protected or cache in resolved.parents:
        raise InvalidInput(f"{out} is the current folder, one above it, the home folder or scenebreak's cache: "
                           "export into a new folder, e.g. -o exported/")
    if not resolved.exists():
        return
    if not resolved.is_dir():
        raise InvalidInput(f"{out} is a file: export writes a folder; choose another -o")
    if not any(resolved.iterdir()):
        return
    if not force:
        raise InvalidInput(f"{out} already exists and is not empty: pass --force to replace an earlier export there")
    if not (resolved / MARKER).is_file():
        raise InvalidInput(f"{out} is not an earlier scenebreak export (it has no {MARKER}): --force replaces only "
                           "those; choose a new folder")


def _write_embeddings(scene, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"scenebreak_scene": scene.name, "base_model": scene.meta["base_model"]["id"]}
    for i, handle in enumerate(scene.handles):
        rows = [e[i].detach().float().contiguous().clone() for e in scene.handle_embeddings]
        if scene.family.is_xl:
            # The layout SDXL embeddings are shared in: one (vectors, width) row per encoder.
            tensors = {"clip_l": rows[0][None], "clip_g": rows[1][None]}
        else:
            tensors = {handle.token: rows[0]}
        save_file(tensors, str(folder / f"{handle.name}.safetensors"), metadata=dict(meta, token=handle.token))


def _write_diffusers(scene, folder: Path, base_model: str | None) -> None:
    import torch

    from .device import choose_device
    from .scene_models import open_pipeline

    dtype = torch.float16 if scene.meta.get("weights_dtype", "fp16") == "fp16" else torch.float32
    pipe = open_pipeline(scene, choose_device("cpu"), base_model, dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
