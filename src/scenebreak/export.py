"""`export`: a scene's learned weights in formats other tools load.

- `diffusers`: a standard Stable Diffusion pipeline folder (fine-tuned UNet and text
  encoder with the handles, tokenizer, VAE, DDIM scheduler) that
  `StableDiffusionPipeline.from_pretrained(folder)` loads anywhere, in the precision
  the scene stores (fp16 unless learned with `--save-dtype fp32`). A LoRA scene's
  adapters are merged into its base model's weights for this.
- `embeddings`: one textual-inversion file per handle (`NAME.safetensors`, holding
  `{"<NAME>": embedding}`), which `pipe.load_textual_inversion(file)` loads into the
  same base model. The handles alone carry phase 1 only: without the phase-2 UNet and
  text encoder they reproduce the objects less faithfully than the scene.
"""

from __future__ import annotations

import os
from pathlib import Path

from .bundle import load_scene
from .errors import InvalidInput
from .paths import write_atomically

FORMATS = ("diffusers", "embeddings")


def export_scene(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
                 base_model: str | None = None) -> list[Path]:
    """Write the scene in `format` under `out`; returns the paths written."""
    if format not in FORMATS:
        raise InvalidInput(f"unknown export format {format!r}: use {' or '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())) and not force:
        raise InvalidInput(f"{out} already exists and is not empty: pass --force to replace what is there")
    scene = load_scene(scene, weights=format == "diffusers")
    if format == "embeddings":
        return _export_embeddings(scene, out)
    return [_export_diffusers(scene, out, base_model)]


def _export_embeddings(scene, out: Path) -> list[Path]:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for handle, embedding in zip(scene.handles, scene.embeddings):
        tensors = {handle.token: embedding.detach().float().contiguous().clone()}
        meta = {"scenebreak_scene": scene.name, "base_model": scene.meta["base_model"]["id"]}
        path = out / f"{handle.name}.safetensors"
        write_atomically(path, lambda tmp, tensors=tensors, meta=meta: save_file(tensors, str(tmp), metadata=meta))
        written.append(path)
    return written


def _export_diffusers(scene, out: Path, base_model: str | None) -> Path:
    import torch

    from .device import choose_device
    from .scene_models import open_pipeline

    dtype = torch.float16 if scene.meta.get("weights_dtype", "fp16") == "fp16" else torch.float32
    pipe = open_pipeline(scene, choose_device("cpu"), base_model, dtype=dtype)
    write_atomically(out, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return out
