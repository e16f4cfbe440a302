"""Where scenebreak keeps things: one home folder, `SCENEBREAK_HOME` moves it."""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Callable
from pathlib import Path

from .errors import InvalidInput

SCENE_SUFFIX = ".scene"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def home() -> Path:
    """The cache root: `$SCENEBREAK_HOME`, else the platform's user cache dir."""
    env = os.environ.get("SCENEBREAK_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("scenebreak"))


def scenes_dir() -> Path:
    return home() / "scenes"


def class_images_dir() -> Path:
    return home() / "class-images"


def checkpoints_dir() -> Path:
    return home() / "checkpoints"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name.endswith(SCENE_SUFFIX):
        raise InvalidInput(
            f"invalid scene name {name!r}: use letters, digits, '.', '_' or '-' (no '{SCENE_SUFFIX}' suffix)"
        )
    return name


def scene_path(name: str) -> Path:
    """The cache path of the scene called `name`."""
    return scenes_dir() / f"{check_name(name)}{SCENE_SUFFIX}"


def checkpoint_path(name: str) -> Path:
    return checkpoints_dir() / f"{check_name(name)}.ckpt"


def resolve_scene(ref: str | os.PathLike) -> Path:
    """A `.scene` path as given, or the cached scene of that name."""
    path = Path(ref).expanduser()
    if path.suffix == SCENE_SUFFIX or path.is_file() or os.sep in str(ref):
        return path
    return scene_path(str(ref))


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path next to `path`, then rename it over `path`:
    readers see the old file or the complete new one, never a partial one. `write`
    may make a file or a folder (a folder replaces an existing folder at `path`).

    Writers that report a full disk in their own words (safetensors, torch.save) get
    their error turned into the usual OSError(ENOSPC), so callers can name the fix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        if tmp.is_dir() and path.exists():
            _remove(path)  # a folder cannot be renamed over a non-empty one
        os.replace(tmp, path)
    except Exception as exc:
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) and _disk_nearly_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False
