"""Locks between scenebreak processes, on one machine or on many that share
SCENEBREAK_HOME over a network file system: one `learn` per scene name at a time
(which also keeps its checkpoint to one writer), one maker of each set of class images
(the others wait, then reuse them), and one runner of each `batch` job.

fcntl/flock locks cannot be trusted on NFS (lost with the lock daemon, or silently
local to one client), so a lock is a file created with O_CREAT | O_EXCL, which is
atomic there too, holding its owner's host, process id and a random token. While it
is held a thread touches it every HEARTBEAT seconds. It is stale, and may be taken
over, when its owner is a process of this host that no longer runs, or when nobody
has touched it for STALE seconds (its machine went down or lost the network; this
needs clocks kept within a minute or so of each other, as NTP does). Taking over
first renames the stale file away, so of two processes breaking the same lock only
one can win."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path

from ..errors import Interrupted, SceneBreakError
from ..paths import ON_WINDOWS, PID_NAMESPACE, home, process_alive

HEARTBEAT = 10.0  # seconds between touches of a held lock
STALE = 120.0  # seconds without a touch after which a lock's owner is taken for dead
MAX_LOCK_BYTES = 4096  # a lock holds a line of JSON; anything bigger is not ours
# A lock file names its owner the moment it is made; one still saying nothing after this
# long never will (its maker died between the two, or a full disk refused the line).
UNWRITTEN = 30.0
HOST = socket.gethostname()
# The tokens of the locks this process holds (or is taking) now. A lock file naming this
# process with another token is a leftover of one it held earlier: a Ctrl-C landed
# between the end of its block and the removal of its file (a notebook, the page, a
# batch worker live on), and it would otherwise be "held" until the process exits.
_HELD_TOKENS: set[str] = set()


class Busy(SceneBreakError):
    """Another process holds the lock (exit 1: wait for it, or choose another name)."""


def _check_folder(path: Path) -> None:
    """Locks live inside scenebreak's cache: a folder link leading elsewhere is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder, cache = os.path.realpath(path.parent), os.path.realpath(home())
    if os.path.commonpath([folder, cache]) != cache:
        raise SceneBreakError(f"the lock folder {path.parent} leads outside scenebreak's cache ({folder}): "
                              "remove that link, or set SCENEBREAK_HOME to another folder")


def _create(path: Path, owner: dict) -> bool:
    """Make the lock file holding `owner`; False when one is already there. Never
    through a symbolic link: a link planted at the lock's path is removed (the link
    itself, never what it points to), so no process id is written into its target."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
        except FileExistsError:
            if not path.is_symlink():
                return False
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        data = json.dumps(owner).encode()
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"could not write the lock file {path} whole")
        except BaseException:
            # (A full disk: an empty lock left behind would refuse every later run as
            # "another process", until it went stale.)
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)
        return True
    raise SceneBreakError(f"could not make the lock file {path}: it keeps changing; remove it and try again")


def read_owner(path: Path) -> dict | None:
    """Who holds the lock at `path` (host, pid, token, since); None when it is gone,
    unreadable, or not yet written."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        data = json.loads(os.read(fd, MAX_LOCK_BYTES).decode())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def describe_owner(owner: dict | None) -> str:
    if not owner or not str(owner.get("pid", "")).isdigit():
        return "another process"
    where = "" if owner.get("host") == HOST else f" on {owner.get('host')}"
    if not where and owner.get("namespace", PID_NAMESPACE) != PID_NAMESPACE:
        where = f" in another container on {HOST}"
    return f"process {owner['pid']}{where}"


def is_stale(path: Path, owner: dict | None) -> bool:
    """Whether the lock at `path` has an owner no longer there (see the module's rule)."""
    try:
        touched = os.lstat(path).st_mtime
    except FileNotFoundError:
        return False  # gone: free, not stale
    # Its process id means something here only on this machine and in these ids' namespace
    # (a lock from before namespaces were recorded: this one's).
    here = owner and owner.get("host") == HOST and owner.get("namespace", PID_NAMESPACE) == PID_NAMESPACE
    if here and isinstance(owner.get("pid"), int):
        if owner["pid"] == os.getpid():
            return owner.get("token") not in _HELD_TOKENS
        if not process_alive(owner["pid"]):
            return True
        started = process_started(owner["pid"])
        since = owner.get("since")
        if started is not None and isinstance(since, (int, float)):
            # The very process that took it (started before it did) holds it, however long
            # since its last touch (suspended with Ctrl-Z, a paused container, a clock jump);
            # one started later only has its id (after a reboot): the lock is stale.
            return started > since + 1
    if not owner:
        return time.time() - touched > UNWRITTEN
    return time.time() - touched > STALE


def process_started(pid: int) -> float | None:
    """When the process `pid` of this machine started (seconds since the epoch), where
    the system says (Linux's /proc); else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text(encoding="utf-8").splitlines()
                    if line.startswith("btime "))
        ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, after the command's name
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _break(path: Path, seen: dict | None, patient: bool = False) -> bool:
    """Take the stale lock `seen` away: rename it aside, and put it back should a live
    owner have replaced it in the meantime. False: not now, try again (`patient`, on
    Windows, where a file another process has open this instant cannot be renamed)."""
    aside = path.with_name(f".{path.name}.{secrets.token_hex(4)}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # another process broke it first
    except PermissionError as exc:
        if ON_WINDOWS and patient:
            return False
        raise SceneBreakError(f"cannot take over the stale lock {path} ({exc.strerror}): if no scenebreak is "
                              "running, remove that file") from None
    if read_owner(aside) != seen:  # not the one judged stale: a fresh lock, give it back
        with contextlib.suppress(OSError):
            os.link(aside, path)
    with contextlib.suppress(OSError):
        aside.unlink()
    return True


class _Heartbeat(threading.Thread):
    """Touches the held lock every HEARTBEAT seconds, so others see its owner alive."""

    def __init__(self, path: Path, token: str):
        super().__init__(daemon=True, name=f"lock heartbeat {path.name}")
        self.path, self.token, self.done = path, token, threading.Event()

    def run(self) -> None:
        while not self.done.wait(HEARTBEAT):
            owner = read_owner(self.path)
            if not owner or owner.get("token") != self.token:
                return  # taken over (this process was taken for dead): nothing of ours to touch
            with contextlib.suppress(OSError):
                os.utime(self.path)


@contextlib.contextmanager
def locked(path: Path, *, wait: bool, busy_message: str = "", on_wait=None, poll: float = 0.2, should_stop=None):
    """Hold an exclusive lock on `path` (inside the cache) for the block. If another
    process holds it: `wait=False` raises Busy at once, naming the holder;
    `wait=True` calls `on_wait(holder)` and waits, taking it over if it turns stale,
    and raises Interrupted once `should_stop()` (optional) turns true."""
    path = Path(path)
    _check_folder(path)
    token = secrets.token_hex(8)
    owner = {"host": HOST, "namespace": PID_NAMESPACE, "pid": os.getpid(), "token": token, "since": time.time()}
    _HELD_TOKENS.add(token)  # (before the file exists: another thread here never takes it for a leftover)
    try:
        yield from _hold(path, token, owner, wait, busy_message, on_wait, poll, should_stop)
    finally:
        _HELD_TOKENS.discard(token)


def _hold(path: Path, token: str, owner: dict, wait: bool, busy_message: str, on_wait, poll: float, should_stop):
    """locked()'s body: take the lock (waiting, or not), hold it for the block, give it back."""
    waited, refused = False, 0
    while not _create(path, owner):
        holder = read_owner(path)
        if is_stale(path, holder):
            if not _break(path, holder, patient=refused < 40):
                refused += 1
                time.sleep(0.05)
            continue
        if not wait:
            raise Busy(busy_message.format(holder=describe_owner(holder)))
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped while waiting for {describe_owner(holder)}")
        if not waited and on_wait:
            on_wait(describe_owner(holder))
        waited = True
        time.sleep(poll)
        poll = min(poll * 1.5, 2.0)
    heartbeat = _Heartbeat(path, token)
    heartbeat.start()
    try:
        yield
    finally:
        heartbeat.done.set()
        current = read_owner(path)
        if current and current.get("token") == token:
            _remove_own_lock(path)


def _remove_own_lock(path: Path, tries: int = 40) -> None:
    """Delete the lock this process held. On Windows a file another process has open
    this instant (reading who holds it) cannot be deleted: try again for a moment. A
    lock that cannot be deleted at all is left: it is stale once this process has
    exited (its owner is dead), and failing here would turn finished work (a scene
    written) or the error already on its way out into this one."""
    for _ in range(tries if ON_WINDOWS else 1):
        try:
            path.unlink()
            return
        except FileNotFoundError:
            return
        except PermissionError:
            if ON_WINDOWS:
                time.sleep(0.05)


def scene_lock(name: str, *, wait: bool = False, on_wait=None, should_stop=None):
    """Held by the `learn` of scene `name`: a second one is refused at once (`wait`:
    waits, e.g. for a dead machine's lock to turn stale)."""
    return locked(home() / "locks" / f"{name}.lock", wait=wait, on_wait=on_wait, should_stop=should_stop,
                  busy_message=f"scene {name!r} is being learned by {{holder}}: wait for it to finish, choose another "
                               "--name, or pass --force to run anyway")


def class_images_lock(folder: Path, on_wait=None):
    """Held while class images are made in `folder`: a second run waits, then reuses them."""
    return locked(folder.with_name(folder.name + ".lock"), wait=True, on_wait=on_wait)
