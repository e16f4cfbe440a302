"""Where scenebreak keeps things: one home folder, `SCENEBREAK_HOME` moves it."""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
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


MAX_NAME = 200  # characters: room for ".scene", ".ckpt" and a temp-file prefix and suffix in 255 bytes


def valid_name(name: str) -> bool:
    """Letters, digits, '.', '_' and '-', starting with a letter or digit: nothing that
    can name another folder, hide a file or start an option."""
    return bool(_NAME_RE.match(name)) and len(name) <= MAX_NAME


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise InvalidInput(f"scene name {name[:40]!r}... is {len(name)} characters long: use at most {MAX_NAME}")
    if not valid_name(name) or name.endswith(SCENE_SUFFIX):
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
        if not (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG)) and _disk_nearly_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from exc
        raise
    finally:
        if tmp.exists():
            _remove(tmp)
    return path


def is_regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (or a link to one): never a FIFO, a device or a
    socket, which would block or never end when read. Asks without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file the user named, or of stdin for "-"; `what`
    names it in errors. Reads at most `max_bytes`: a larger file (/dev/zero, a log
    given by mistake) is refused, not read whole into memory."""
    import sys

    if str(path) == "-":
        data, name = sys.stdin.buffer.read(max_bytes + 1), "standard input"
    else:
        name = str(path)
        if not Path(path).exists():
            raise InvalidInput(f"{what} {name} not found")
        if not is_regular_file(Path(path)):
            raise InvalidInput(f"{what} {name} is not a regular file")
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as exc:
            raise InvalidInput(f"cannot read {what} {name}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InvalidInput(f"{what} {name} is larger than {max_bytes // 2**20} MiB: is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{what} {name} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None


def existing_ancestor(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing parent."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_writable_folder(folder: Path) -> bool:
    """Whether files can be made in `folder` (or in the folders that would be made for it)."""
    probe = existing_ancestor(folder)
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def check_file_name_fits(path: Path) -> None:
    """A file name plus the temp-file prefix and suffix of write_atomically must fit the
    usual 255-byte limit of file systems."""
    if len(Path(path).name.encode()) + 32 > 255:
        raise InvalidInput(f"the file name {Path(path).name[:40]}... is too long for the file system: choose a shorter one")


def check_room(needs: list[tuple[Path, int]], fix: str) -> None:
    """Raise NoSpace unless each disk has room for the bytes meant for it: `needs` pairs
    a folder with the bytes that will be written there (folders on one disk add up)."""
    from .errors import NoSpace

    per_disk: dict[int, list] = {}
    for folder, count in needs:
        probe = existing_ancestor(folder)
        entry = per_disk.setdefault(probe.stat().st_dev, [probe, 0])
        entry[1] += count
    for probe, count in per_disk.values():
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            continue
        if count > free:
            from .estimates import format_bytes

            raise NoSpace(f"not enough space on the disk of {probe}: about {format_bytes(count)} will be written, "
                          f"{format_bytes(free)} is free; {fix}")


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False
