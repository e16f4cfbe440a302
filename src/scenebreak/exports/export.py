"""`export`: a scene's learned weights in formats other tools load.

- `diffusers`: a standard pipeline folder of the scene's family (fine-tuned UNet and
  text encoder(s) with the handles, tokenizer(s), VAE, and the scheduler `generate`
  uses by default: DPM-Solver++ 2M; FLUX.1 its flow-matching Euler) that
  `StableDiffusionPipeline.from_pretrained(folder)` (SDXL:
  `StableDiffusionXLPipeline`) loads anywhere, in the precision the scene stores
  (fp16 unless learned with `--save-dtype fp32`). A LoRA scene's adapters are merged
  into its base model's weights for this.
- `embeddings`: one textual-inversion file per handle (`NAME.safetensors`; names that
  differ only in letter case get `-2`..., so no disk takes two for one), which
  diffusers' `load_textual_inversion` loads into the same base model: for SD 1.x/2.x
  `{"<NAME>": embedding}`; for SDXL `{"clip_l": row, "clip_g": row}`, the handle's
  rows in the first and second text encoder, loaded once into each. The handles alone
  carry phase 1 only: without the phase-2 UNet and text encoder they reproduce the
  objects less faithfully than the scene.
- `a1111`: the files AUTOMATIC1111, Forge and ComfyUI load on top of the base model:
  an embedding per handle, the phase-2 weights as one kohya LoRA (a fully tuned
  scene's extracted by truncated SVD at `rank`, with a report of what it keeps), its
  `.json` card for A1111/Forge, and a README saying where each goes (a1111.py,
  kohya.py). No format writes a local path: a base model from a folder is named by
  the folder's name (a1111.base_model_name).

No `checkpoint` format (one single-file .safetensors in the original SD layout):
diffusers has no maintained function for that direction, only an unpackaged script
(`scripts/convert_diffusers_to_original_stable_diffusion.py`), and a copy of it here
would be a key table of our own to keep right for every family.

In every format the folder is built whole in a temporary folder beside the target
(`.NAME.<host>-<pid>-<random>.sbx-tmp`, removed on failure, and by a later export to
the same target if its process died), with a `.scenebreak-export` marker, and then
renamed into place: only onto a missing path or an empty folder, which a rename
replaces without losing anything, or with `--force` onto an earlier export (one with
the marker), which is moved aside first and deleted once the new one is in place.
Whatever appeared at the target while the export ran is left as it is, and the export
fails instead (two exports at once to one new folder: the later one fails).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import __version__
from ..errors import InvalidInput, fixable_failures
from ..events import Message, Reporter, silent
from ..families.base_model import name_as_on_the_hub
from ..families.versions import tokenizer_class_name_for
from ..hub import downloads_reported
from ..paths import (check_file_name_fits, existing_ancestor, flush_to_disk, home, is_writable_folder,
                     remove_stale_temporaries, settle_replaced_folder, sync_folder, temporary_beside,
                     writer_os_error)
from .kohya import DEFAULT_RANK, Extraction, check_rank

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
    scene_path: Path | None = None  # the scene's file, where it has one (`scene` is its own name)

    def to_dict(self) -> dict:
        return {"scene": self.scene, "scene_path": str(self.scene_path) if self.scene_path else None,
                "format": self.format, "paths": [str(p) for p in self.paths],
                **({"lora": self.lora.to_dict()} if self.lora else {})}


def export_scene(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
                 base_model: str | None = None, rank: int | None = None, kohya_strict: bool = False,
                 report: Reporter = silent) -> list[Path]:
    """Write the scene in `format` as the folder `out` (replacing an earlier export
    there with `force`); returns the paths written."""
    return export(scene, out, format, force, base_model, rank, report=report, kohya_strict=kohya_strict).paths


@fixable_failures()
def export(scene, out: str | os.PathLike, format: str = "diffusers", force: bool = False,
           base_model: str | None = None, rank: int | None = None, report: Reporter = silent,
           kohya_strict: bool = False) -> Exported:
    """`export_scene`, with what an a1111 export's LoRA keeps (`rank`: of a fully tuned
    scene's extraction, default 64; `kohya_strict`: leave out the layers kohya's
    loaders skip; a1111 only)."""
    from ..arguments import flag_argument, function_argument, model_argument, path_argument

    if format not in FORMATS:
        raise InvalidInput(f"unknown export format {format!r}: use {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    force, kohya_strict = flag_argument(force, "force"), flag_argument(kohya_strict, "kohya_strict")
    base_model, report = model_argument(base_model, "base_model"), function_argument(report, "report") or silent
    if rank is not None and format != "a1111":
        raise InvalidInput("--rank applies only to -f a1111")
    if kohya_strict and format != "a1111":
        raise InvalidInput("--kohya-strict applies only to -f a1111")
    rank = check_rank(DEFAULT_RANK if rank is None else rank)
    from ..scenes.bundle import Scene, load_scene  # here: the CLI reads FORMATS without loading numpy

    out = path_argument(out, "out").expanduser()
    check_export_target(out, force)
    if isinstance(scene, Scene):  # (a Scene from Python, as generate takes: its file read with the weights it needs)
        if scene.path is None:
            raise InvalidInput(f"scene {scene.name!r} is not in a file: save_scene it first, then export the file")
        scene = scene.path
    scene = load_scene(scene, weights=format in ("diffusers", "a1111"))
    marker = json.dumps({"format": format, "scene": scene.name, "scenebreak": __version__})
    a1111 = None
    if format == "a1111":
        from .a1111 import prepare

        # before writing: a missing base model leaves nothing behind
        with downloads_reported(report):
            a1111 = prepare(scene, rank, base_model, report, kohya_strict)

    def write(tmp: Path) -> None:
        if a1111:
            a1111.write(tmp)
        elif format == "embeddings":
            _write_embeddings(scene, tmp)
        else:
            _write_diffusers(scene, tmp, base_model, report)
        (tmp / MARKER).write_text(marker + "\n", encoding="utf-8")

    if format != "embeddings":  # (a few kilobytes: said only for the gigabytes of weights)
        report(Message(f"writing {out}"))
    with downloads_reported(report):
        write_folder(out, write, force)
    if a1111:
        return Exported(scene.name, format, a1111.paths(out), a1111.extraction, scene_path=scene.path)
    if format == "embeddings":
        return Exported(scene.name, format, [out / f"{name}.safetensors" for name in _embedding_names(scene)],
                        scene_path=scene.path)
    return Exported(scene.name, format, [out], scene_path=scene.path)


def check_export_target(out: Path, force: bool) -> None:
    """An export goes to a new or empty folder, or replaces an earlier export (`force`).
    Never the current folder or one above it, the home folder, or scenebreak's cache;
    never through a symbolic link at the target, or below a file."""
    out = out.expanduser()
    if out.is_symlink():
        raise InvalidInput(f"{out} is a symbolic link (to {os.readlink(out)}): export writes a real folder; "
                           "give the folder itself as -o, or choose a new one")
    above = existing_ancestor(out)
    if above != out.absolute() and not above.is_dir():
        raise InvalidInput(f"cannot export to {out}: {above} is a file, not a folder; choose another -o")
    if not is_writable_folder(out.parent):  # the export is made beside its target, then moved there
        raise InvalidInput(f"cannot export to {out}: {out.parent} is not a folder you can write to; choose another -o")
    check_file_name_fits(out)
    resolved = out.resolve()
    cwd, cache = Path.cwd().resolve(), home().expanduser().resolve()
    protected = {cwd, *cwd.parents, Path.home().resolve(), cache, *cache.parents}
    if cache in resolved.parents:
        raise InvalidInput(f"{out} is inside scenebreak's cache ({cache}), which scenebreak manages: export into a "
                           "folder of yours, e.g. -o exported/")
    if resolved in protected:
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


def write_folder(out: Path, write: Callable[[Path], None], force: bool) -> None:
    """Call `write(tmp)` on a new temporary folder beside `out`, then move it into place
    (see the module docstring): never onto anything that holds data, except an earlier
    export with `force`; the temporary folder is removed whatever happens."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise InvalidInput(f"cannot export to {out}: {parent} cannot be made, a file is in the way; "
                           "choose another -o") from None
    # A run killed after moving the earlier export aside: that one goes back (it was
    # deleted, and a failure of this export then left neither).
    settle_replaced_folder(out, "sbx-old")
    remove_stale_temporaries(out, ("sbx-tmp",))
    tmp = temporary_beside(out, "sbx-tmp")
    try:
        tmp.mkdir()
        try:
            write(tmp)
        except Exception as exc:
            said = writer_os_error(exc, out)
            if said is not None:
                raise said from exc
            raise
        # On the disk before the rename publishes it, and the rename before an earlier
        # export goes: after a power cut, never empty weight files with the old export gone.
        flush_to_disk(tmp)
        _move_into_place(tmp, out, force, settled=lambda: sync_folder(parent))
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_empty_folder(path: Path) -> bool:
    """Remove `path` if it is an empty folder (not a link); whether it was."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        path.rmdir()  # fails unless empty
    except OSError:
        return False
    return True


def _move_into_place(tmp: Path, out: Path, force: bool, settled=lambda: None) -> None:
    """Rename `tmp` to `out`. A rename replaces only a missing path or an empty folder;
    anything else there is left alone, except an earlier export with `force`: that is
    renamed aside, checked again (it is ours alone then), and deleted once the new one
    is in place (put back if it could not be) and `settled()` (the rename on the disk)."""
    aside: list[Path] = []
    placed = False
    try:
        for _ in range(3):  # an earlier export moved aside, and another export racing in, at most twice
            try:
                os.rename(tmp, out)
                placed = True
                return
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
            if _remove_empty_folder(out):  # Windows renames onto no folder, not even an empty one
                continue
            if not (force and _is_export(out)):
                raise InvalidInput(f"{out} appeared while exporting, and is not an earlier export that --force may "
                                   "replace: it is left as it is; export again, or choose another -o")
            old = temporary_beside(out, "sbx-old")
            os.rename(out, old)
            if not _is_export(old):  # swapped for something else in between: put it back
                try:
                    os.rename(old, out)
                except OSError:
                    raise InvalidInput(f"{out} changed while exporting; what was there is now {old}") from None
                raise InvalidInput(f"{out} changed while exporting: it is left as it is; export again")
            aside.append(old)
        raise InvalidInput(f"{out} keeps being replaced by other exports: export again")
    finally:
        if aside and not placed:
            try:  # the export --force was to replace goes back where nothing took its place
                os.rename(aside.pop(), out)
            except OSError:
                pass  # left under its temporary name: the next export here removes it
        if placed:
            settled()
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)


def _is_export(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _embedding_names(scene) -> list[str]:
    """File names of the embeddings: the handles' names, distinct without regard to
    letter case (a case-insensitive disk would write one file over the other), none a
    Windows device's (a1111.portable_stem)."""
    from .a1111 import distinct_names, portable_stem

    return distinct_names([portable_stem(handle.name, "handle") for handle in scene.handles])


def _write_embeddings(scene, folder: Path) -> None:
    from safetensors.torch import save_file

    from .a1111 import base_model_name

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"scenebreak_scene": scene.name, "base_model": base_model_name(scene.meta["base_model"])}
    for i, (handle, name) in enumerate(zip(scene.handles, _embedding_names(scene))):
        rows = [e[i].detach().float().contiguous().clone() for e in scene.handle_embeddings]
        tensors = scene.family.textual_inversion(handle.token, rows)
        save_file(tensors, str(folder / f"{name}.safetensors"), metadata=dict(meta, token=handle.token))


def _write_diffusers(scene, folder: Path, base_model: str | None, report: Reporter = silent) -> None:
    from ..device import choose_device
    from ..sample.scene_models import open_pipeline

    pipe = open_pipeline(scene, choose_device("cpu"), base_model, dtype=scene.stored_dtype, report=report)
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in scene.family.text_encoders:  # (CLIP saved under transformers 5: renamed as the hub names it)
        name_as_on_the_hub(folder / name)
        _loads_in_fp32_by_default(folder / name / "config.json")
    _tokenizers_for_either_transformers(folder, scene.family.tokenizers)


def _loads_in_fp32_by_default(config_path: Path) -> None:
    """A text encoder's config saying float32, as the hub's do. Saved in half precision,
    it said float16, which transformers 5 loads by default while diffusers loads the
    UNet and VAE in fp32: `StableDiffusionPipeline.from_pretrained(DIR)` then failed at
    its first step (Half and Float). The weights stay as stored; `torch_dtype=` still
    loads all of it in half precision."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    config.update(dict.fromkeys(keys, "float32"))
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _tokenizers_for_either_transformers(folder: Path, names) -> None:
    """A folder's tokenizers as transformers 4 reads them too. Saved by 5, a tokenizer
    is tokenizer.json alone, which 4's slow class (model_index.json's CLIPTokenizer)
    cannot read: the index names the fast class, which both versions have. T5's config
    lists its sentinels as `extra_special_tokens`, which 4 reads as a dict: they are
    written as `additional_special_tokens`, which 5 reads too."""
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text(encoding="utf-8"))
    for name in names:
        files = {p.name for p in (folder / name).iterdir()}
        library, cls = index.get(name) or (None, None)
        if library == "transformers" and cls:
            index[name] = [library, tokenizer_class_name_for(cls, files)]
        config_path = folder / name / "tokenizer_config.json"
        if config_path.exists():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            if isinstance(config.get("extra_special_tokens"), list):
                config["additional_special_tokens"] = config.pop("extra_special_tokens")
                config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    index_path.write_text(json.dumps(index, indent=2), encoding="utf-8")
