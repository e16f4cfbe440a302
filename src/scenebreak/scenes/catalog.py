"""The scenes in the cache, as `list`, `show` and `rm` see them: summaries of their
metadata, a readable description, and removal that only ever deletes scenes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ..errors import BundleError, InvalidInput, SceneBreakError
from ..events import printable
from ..paths import (ON_WINDOWS, SCENE_SUFFIX, is_regular_file, names_both, remove_stale_temporaries, resolve_scene,
                     scenes_dir)
from .bundle import list_scenes, read_metadata


def scene_rows() -> list[dict]:
    """One row per cached scene (name, handles, path, family, created, size); a scene that
    cannot be read gets a row with its error instead."""
    rows = []
    for path in list_scenes():
        try:
            meta = read_metadata(path)
            rows.append({"name": path.stem, "handles": [h["token"] for h in meta["handles"]], "path": str(path),
                         "family": meta["base_model"].get("family", ""), "created": meta.get("created"), "size_mb": round(path.stat().st_size / 2**20, 1)})
        except BundleError as exc:
            rows.append({"name": path.stem, "error": str(exc), "path": str(path)})
        except Exception as exc:  # one file no check foresaw must not hide every other scene
            rows.append({"name": path.stem, "error": f"{path} cannot be read ({type(exc).__name__})", "path": str(path)})
    return rows


def scene_summary(ref: str | os.PathLike) -> dict:
    """A scene's metadata without the model configs, plus its path and size."""
    path = resolve_scene(ref)
    meta = {k: v for k, v in read_metadata(path).items() if k != "configs"}
    meta["path"] = str(path)
    meta["size_mb"] = round(path.stat().st_size / 2**20, 1)
    return meta


def describe(summary: dict) -> str:
    """The summary as a few lines for people."""
    base = summary["base_model"]
    lines = [
        f"scene:       {summary.get('name') or Path(summary['path']).stem}  ({summary['path']}, {summary['size_mb']} MB)",
        f"handles:     {'  '.join(_handle_label(h, summary) for h in summary['handles'])}",
        f"base model:  {base['id']}" + (f" @ {base['commit']}" if base.get("commit") else "")
        + (f"  ({base['family']})" if base.get("family") else ""),
        f"resolution:  {summary['resolution']}  tuning: {_tuning_label(summary)}  created: {summary.get('created')}",
    ]
    recorded = summary.get("losses")
    for phase, losses in recorded.items() if isinstance(recorded, dict) else ():
        if not isinstance(losses, dict):
            continue
        lines.append(f"{phase}:      {losses.get('steps')} steps in {losses.get('seconds')} s, "
                     f"loss {_number(losses.get('loss_first'))} -> {_number(losses.get('loss_last'))}")
    # A stranger's scene says what it likes in these fields: shown, never obeyed (escape sequences).
    return "\n".join(printable(line) for line in lines)


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)[:40]


def _tuning_label(meta: dict) -> str:
    if meta.get("tuning") != "lora":
        return meta.get("tuning", "full")
    rank = (meta.get("lora") or {}).get("rank")
    return f"lora (rank {rank}, {'standalone' if meta.get('standalone') else 'needs its base model'})"


def _handle_label(handle: dict, meta: dict) -> str:
    source = meta.get("source")
    masks = source.get("masks") if isinstance(source, dict) else None
    masks = masks if isinstance(masks, list) else []  # (what the scene says it learned from: only shown)
    index = handle["mask_index"]
    if handle.get("background"):
        return f"{handle['token']} (the rest of the photo)"
    return f"{handle['token']} ({masks[index]})" if index < len(masks) else handle["token"]


def remove_scenes(refs: list[str | os.PathLike], removed: Callable[[Path], None] = lambda path: None) -> list[Path]:
    """Delete scenes by cache name or path, calling `removed(path)` after each; returns
    the deleted paths. Every one is checked to be a scene first: nothing is deleted if
    any is not. A damaged file in the scene cache counts as a scene (`list` shows it
    as unreadable: this is how it goes)."""
    for ref in refs:  # a deletion never guesses which of two files a name means
        if names_both(ref):
            raise InvalidInput(f"{str(ref)!r} names both the cached scene {resolve_scene(ref)} and a file in the "
                               f"current folder: give the path of the one to delete ({os.path.join('.', str(ref))} for the "
                               "file here)")
    # A scene named twice (`rm a a`, or by name and by path) is deleted once.
    unique: dict[Path, Path] = {}
    for path in map(resolve_scene, refs):
        unique.setdefault(path.resolve(), path)
    paths = list(unique.values())
    for path in paths:
        if not _cached_scene_file(path):
            read_metadata(path)
    for path in paths:
        delete_file(path)
        removed(path)  # said as it goes: if a later one cannot be deleted, the earlier are known gone
        remove_stale_temporaries(path)  # a killed write's copy (gigabytes) goes with it
    return paths


def delete_file(path: Path) -> None:
    """Delete `path`; a folder the user cannot write is said in words (not "[Errno 13]")."""
    try:
        path.unlink()
    except PermissionError:
        if ON_WINDOWS:  # there, mostly a file another program has open
            raise SceneBreakError(f"cannot delete {path}: it is in use (a `generate`, `ui` or notebook that opened "
                                  "it?), or its folder is not writable by you; close what uses it and try "
                                  "again") from None
        raise SceneBreakError(f"cannot delete {path}: its folder {path.parent} is not writable by you") from None


def _cached_scene_file(path: Path) -> bool:
    """A regular file named *.scene in the scene cache itself (not a link to elsewhere)."""
    return (path.suffix == SCENE_SUFFIX and not path.is_symlink() and is_regular_file(path)
            and path.parent.resolve() == scenes_dir().resolve())
