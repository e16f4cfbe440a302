"""Locks between scenebreak processes: one `learn` per scene name at a time, and one
maker of each set of class images (the others wait, then reuse them)."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from ..errors import SceneBreakError
from ..paths import home

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel runs are the user's to keep apart
    fcntl = None


class Busy(SceneBreakError):
    """Another process holds the lock (exit 1: wait for it, or choose another name)."""


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor, made inside scenebreak's cache and never through a
    symbolic link: a link planted at the lock's path would otherwise have the process
    id written into whatever file it points to. A link there is replaced by a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder, cache = os.path.realpath(path.parent), os.path.realpath(home())
    if os.path.commonpath([folder, cache]) != cache:
        raise SceneBreakError(f"the lock folder {path.parent} leads outside scenebreak's cache ({folder}): "
                              "remove that link, or set SCENEBREAK_HOME to another folder")
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for _ in range(10):  # another process may make or replace it between two calls
        try:
            fd = os.open(path, os.O_RDWR | nofollow)
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
            except FileExistsError:
                continue
        except OSError:
            if not path.is_symlink():
                raise
            path.unlink()  # the link itself, never what it points to
            continue
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SceneBreakError(f"the lock {path} is not a regular file: remove it")
        return fd
    raise SceneBreakError(f"could not make the lock file {path}: it keeps changing; remove it and try again")


@contextlib.contextmanager
def locked(path: Path, *, wait: bool, busy_message: str = "", on_wait=None):
    """Hold an exclusive lock on `path` (created if needed, inside the cache) for the
    block. If another process holds it: `wait=False` raises Busy at once, naming the
    holder's process id; `wait=True` calls `on_wait(holder)` and waits."""
    if fcntl is None:
        yield
        return
    fd = _open_lock_file(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Busy(busy_message.format(holder=_holder(fd))) from None
            if on_wait:
                on_wait(_holder(fd))
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock


def scene_lock(name: str):
    """Held by the `learn` of scene `name`: a second one is refused at once."""
    return locked(home() / "locks" / f"{name}.lock", wait=False,
                  busy_message=f"scene {name!r} is being learned by {{holder}}: wait for it to finish, choose another "
                               "--name, or pass --force to run anyway")


def class_images_lock(folder: Path, on_wait=None):
    """Held while class images are made in `folder`: a second run waits, then reuses them."""
    return locked(folder.with_name(folder.name + ".lock"), wait=True, on_wait=on_wait)
