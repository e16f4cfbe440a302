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
- `a1111`: the files AUTOMATIC1111, Forge and ComfyUI load on top of the base model:
  an embedding per handle, the phase-2 weights as one kohya LoRA (a fully tuned
  scene's extracted by truncated SVD at `rank`, with a report of what it keeps) and a
  README saying where each goes (a1111.py, kohya.py).

No `checkpoint` format (one single-file .safetensors in the original SD layout):
diffusers has no maintained function for that direction, only an unpackaged script
(`scripts/convert_diffusers_to_original_stable_diffusion.py`), and a copy of it here
would be a key table of our own to keep right for every family.

In every format the folder is written whole (atomically) with a `.scenebreak-export`
marker, and `--force` replaces only a folder that has one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .errors import InvalidInput
from .events import Reporter, silent
from .kohya import DEFAULT_RANK, Extraction, check_rank
from .paths import home, write_atomically

FORMATS = ("diffusers", "embeddings", "a1111")
# Written into every export folder: `--force` replaces a folder only when it holds one,
# so it can never empty a folder that scenebreak did not make.
MARKER = ".scenebreak-export"


@dataclass
class Exported:
    scene: str
    format: str
    paths: list[Path]
    lora: Extraction | None = None  # a1111: what the LoRA keeps of the phase-2 weights

    def to_dict(self) -> dict:
        return {"scene": self.scene, "format": self.format, "paths": [str(p) for p in self.paths],
                **({"lora": self.lora.to_dict()} if self.lora else {})}


def export_scene(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
                 base_model: str | None = None, rank: int | None = None) -> list[Path]:
    """Write the scene in `format` as the folder `out` (replacing an earlier export
    there with `force`); returns the paths written."""
    return export(scene, out, format, force, base_model, rank).paths


def export(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
           base_model: str | None = None, rank: int | None = None, report: Reporter = silent) -> Exported:
    """`export_scene`, with what an a1111 export's LoRA keeps (`rank`: of a fully tuned
    scene's extraction, default 64; a1111 only)."""
    if format not in FORMATS:
        raise InvalidInput(f"unknown export format {format!r}: use {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if rank is not None and format != "a1111":
        raise InvalidInput("--rank applies only to -f a1111")
    rank = check_rank(DEFAULT_RANK if rank is None else rank)
    from .bundle import load_scene  # here: the CLI reads FORMATS without loading numpy

    out = Path(out)
    check_export_target(out, force)
    scene = load_scene(scene, weights=format in ("diffusers", "a1111"))
    marker = json.dumps({"format": format, "scene": scene.name, "scenebreak": __version__})
    a1111 = None
    if format == "a1111":
        from .a1111 import prepare

        a1111 = prepare(scene, rank, base_model, report)  # before writing: a missing base model leaves nothing behind

    def write(tmp: Path) -> None:
        if a1111:
            a1111.write(tmp)
        elif format == "embeddings":
            _write_embeddings(scene, tmp)
        else:
            _write_diffusers(scene, tmp, base_model)
        (tmp / MARKER).write_text(marker + "\n")

    write_atomically(out, write)
    if a1111:
        return Exported(scene.name, format, a1111.paths(out), a1111.extraction)
    if format == "embeddings":
        return Exported(scene.name, format, [out / f"{handle.name}.safetensors" for handle in scene.handles])
    return Exported(scene.name, format, [out])


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
    from .device import choose_device
    from .scene_models import open_pipeline

    pipe = open_pipeline(scene, choose_device("cpu"), base_model, dtype=scene.stored_dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
