"""The checkpoints interrupted runs left (`learn --resume` continues one): listed beside
the scenes, and deleted with them by `rm NAME`. A phase-2 checkpoint holds the model and
the optimizer's state (about 14 GB on SD 2.1): one nobody resumes must not sit unseen."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..arguments import path_arguments
from ..errors import InvalidInput
from ..paths import (CHECKPOINT_SUFFIX, SCENE_SUFFIX, check_name, checkpoint_path, checkpoints_dir, has_folder,
                     remove_stale_temporaries, resolve_scene, scene_path)
from ..scenes.catalog import delete_file, remove_scenes as remove_scene_files
from .locks import Busy, scene_lock

@dataclass
class InterruptedRun:
    name: str
    path: Path
    bytes: int

    def to_dict(self) -> dict:
        return {"name": self.name, "path": str(self.path), "bytes": self.bytes}


def interrupted_runs() -> list[InterruptedRun]:
    """The checkpoints in the cache, by name (links and odd entries left out)."""
    try:
        entries = sorted(os.scandir(checkpoints_dir()), key=lambda e: e.name)
    except OSError:  # no such folder yet, or unreadable: nothing to show
        return []
    runs = []
    for entry in entries:
        if entry.name.endswith(CHECKPOINT_SUFFIX) and not entry.name.startswith(".") and \
                entry.is_file(follow_symlinks=False):
            try:
                size = entry.stat(follow_symlinks=False).st_size
            except OSError:
                continue
            runs.append(InterruptedRun(entry.name[: -len(CHECKPOINT_SUFFIX)], Path(entry.path), size))
    return runs


def _run_named(ref) -> str | None:
    """The name of the interrupted run `ref` means: a bare scene name with a checkpoint."""
    text = str(ref)
    if text.endswith(SCENE_SUFFIX) or has_folder(text):
        return None
    try:
        check_name(text)
    except InvalidInput:
        return None
    return text if os.path.lexists(checkpoint_path(text)) else None


def remove_scenes_and_runs(refs: list, removed: Callable[[Path], None] = lambda path: None) -> list[Path]:
    """`rm`: delete scenes by cache name or path (scenes.catalog.remove_scenes), and the
    checkpoint of each name's interrupted run with them; a name with a checkpoint alone
    is that run's. Nothing is deleted if any is neither, or if a run is being learned
    now (its lock is held). Returns the deleted paths, each passed to `removed` as it goes."""
    runs = [_run_named(ref) for ref in refs]
    names = list(dict.fromkeys(name for name in runs if name is not None))
    scenes = [ref for ref, run in zip(refs, runs) if run is None or os.path.lexists(resolve_scene(ref))]
    with contextlib.ExitStack() as held:
        for name in names:
            try:
                held.enter_context(scene_lock(name))
            except Busy:
                raise InvalidInput(f"scene {name!r} is being learned now: stop that run first") from None
        deleted = remove_scene_files(scenes, removed) if scenes else []
        for name in names:
            # A run killed while writing its scene left a full-size copy that no listing shows.
            remove_stale_temporaries(scene_path(name))
            path = checkpoint_path(name)
            remove_stale_temporaries(path)
            try:
                delete_file(path)
            except FileNotFoundError:
                continue
            removed(path)
            deleted.append(path)
    return deleted


def remove_scenes(scenes) -> list[Path]:
    """`scenebreak rm` from Python: delete scenes (cache names or paths; one alone counts
    as a list of one) and the checkpoint each name's interrupted run left. Nothing is
    deleted if any is neither, or if one is being learned now (InvalidInput). Returns
    the paths deleted."""
    return remove_scenes_and_runs([os.fspath(ref) for ref in path_arguments(scenes, "scenes")])
