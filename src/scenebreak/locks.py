"""Locks between scenebreak processes: one `learn` per scene name at a time, and one
maker of each set of class images (the others wait, then reuse them)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import SceneBreakError
from .paths import home

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel runs are the user's to keep apart
    fcntl = None


class Busy(SceneBreakError):
    """Another process holds the lock (exit 1: wait for it, or choose another name)."""


def _holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid.isdigit() else "another process"


@contextlib.contextmanager
def locked(path: Path, *, wait: bool, busy_message: str = "", on_wait=None):
    """Hold an exclusive lock on `path` (created if needed) for the block. If another
    process holds it: `wait=False` raises Busy at once, naming the holder's process id;
    `wait=True` calls `on_wait(holder)` and waits."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise Busy(busy_message.format(holder=_holder(path))) from None
            if on_wait:
                on_wait(_holder(path))
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
