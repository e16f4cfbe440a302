"""The lock files hold on a network file system: O_EXCL files with a heartbeat, taken
over only when their owner is gone (a dead process of this host, or no heartbeat for
STALE seconds), never while it lives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenebreak.errors import SceneBreakError
from scenebreak.paths import home
from scenebreak.train import locks
from scenebreak.train.locks import Busy, locked, read_owner


def _lock_path(name="x"):
    return home() / "locks" / f"{name}.lock"


def test_a_held_lock_names_its_owner_and_is_removed_on_release():
    path = _lock_path()
    with locked(path, wait=False):
        owner = read_owner(path)
        assert owner["pid"] == os.getpid() and owner["host"] == locks.HOST
        with pytest.raises(Busy, match=f"process {os.getpid()}"):
            with locked(path, wait=False, busy_message="held by {holder}"):
                pass
    assert not path.exists()


def test_the_lock_of_a_dead_process_of_this_host_is_taken_over_at_once():
    path = _lock_path()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": locks.HOST, "pid": int(dead), "token": "old"}))
    with locked(path, wait=False):
        assert read_owner(path)["pid"] == os.getpid()


def test_a_full_disk_leaves_no_empty_lock_and_an_ownerless_one_goes_stale_soon(monkeypatch):
    """ENOSPC while writing the owner left an empty lock file: every later run was
    "another process" (or waited) for STALE seconds after the user freed space."""
    import errno

    path = _lock_path()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(locks.os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            with locked(path, wait=False):
                pass
    assert not path.exists()
    path.write_bytes(b"")  # one left by a process killed between making and writing it
    with pytest.raises(Busy):  # just made: its owner may be writing it this instant
        with locked(path, wait=False):
            pass
    old = time.time() - locks.UNWRITTEN - 5
    os.utime(path, (old, old))
    assert locks.UNWRITTEN < locks.STALE
    with locked(path, wait=False):
        assert read_owner(path)["pid"] == os.getpid()


def test_a_lock_of_another_host_is_stale_only_without_heartbeat(monkeypatch):
    path = _lock_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "theirs"}))
    with pytest.raises(Busy, match="process 1 on elsewhere"):  # touched just now: its owner lives
        with locked(path, wait=False, busy_message="{holder}"):
            pass
    old = time.time() - locks.STALE - 5
    os.utime(path, (old, old))  # no heartbeat for longer than STALE
    with locked(path, wait=False):
        assert read_owner(path)["host"] == locks.HOST


def test_a_lock_of_another_container_with_this_hosts_name_is_judged_as_another_hosts(tmp_path):
    """A container on the host's network has its name but its own process ids: a pid
    that is dead here may live there. Its lock goes only without heartbeat, and its
    temporaries are not this machine's to clear."""
    from scenebreak import paths

    path = _lock_path()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"host": locks.HOST, "namespace": "pid:[1]", "pid": int(dead), "token": "theirs"}))
    with pytest.raises(Busy, match=f"process {int(dead)} in another container on"):
        with locked(path, wait=False, busy_message="{holder}"):
            pass
    old = time.time() - locks.STALE - 5
    os.utime(path, (old, old))
    with locked(path, wait=False):
        assert read_owner(path)["namespace"] == paths.PID_NAMESPACE
    # Temporaries are tagged with the namespace too: another container's (same name, other
    # ids) never match this one's tag, so its live writes are not cleared as dead ones.
    import hashlib
    import socket

    if paths.PID_NAMESPACE:
        name_only = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
        other = hashlib.sha256((socket.gethostname() + "pid:[1]").encode()).hexdigest()[:8]
        assert paths.HOST_TAG not in (name_only, other)
        target = tmp_path / "a.scene"
        theirs, mine = (tmp_path / f".a.scene.{tag}-{int(dead)}-abcd.tmp" for tag in (other, paths.HOST_TAG))
        theirs.write_text("x")
        mine.write_text("x")
        paths.remove_stale_temporaries(target)
        assert theirs.exists() and not mine.exists()


def test_the_heartbeat_keeps_a_long_held_lock_fresh(monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT", 0.05)
    path = _lock_path()
    with locked(path, wait=False):
        old = time.time() - 1000
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - os.stat(path).st_mtime < 5



@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times from /proc (Linux)")
def test_a_live_owner_of_this_host_keeps_its_lock_untouched_but_not_one_whose_id_was_reused():
    """A learn suspended (Ctrl-Z, a paused container) missed its heartbeats: after STALE
    seconds its lock was taken over while it lived, and two runs wrote one checkpoint.
    A process that started after the lock was taken only has its id (a reboot)."""
    path = _lock_path()
    path.parent.mkdir(parents=True)
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live process of this host
    try:
        time.sleep(0.1)
        old = time.time() - locks.STALE - 5
        path.write_text(json.dumps({"host": locks.HOST, "pid": owner.pid, "token": "its", "since": time.time()}))
        os.utime(path, (old, old))  # no heartbeat for longer than STALE
        with pytest.raises(Busy):  # the very process that took it holds it: never stale
            with locked(path, wait=False, busy_message="{holder}"):
                pass
        assert locks.process_started(owner.pid) < time.time()
        path.write_text(json.dumps({"host": locks.HOST, "pid": owner.pid, "token": "before", "since": 1000.0}))
        os.utime(path, (old, old))  # taken in 1970 by that id: another process, long gone
        with locked(path, wait=False):
            assert read_owner(path)["token"] != "before"
    finally:
        owner.kill()
        owner.wait()


def test_on_windows_a_process_is_asked_about_without_os_kill(monkeypatch):
    """os.kill(pid, 0) terminates the process on Windows: there, whether an owner lives is
    asked through OpenProcess/GetExitCodeProcess (faked here: the answers Windows gives)."""
    from scenebreak import paths

    class Kernel32:
        def __init__(self, handle, code=259, error=0):
            self.handle, self.code, self.error, self.closed = handle, code, error, []

        def OpenProcess(self, access, inherit, pid):
            return self.handle

        def GetExitCodeProcess(self, handle, code):
            code._obj.value = self.code
            return 1

        def CloseHandle(self, handle):
            self.closed.append(handle)

    def ask(kernel32):
        return paths._windows_process_alive(1234, kernel32, lambda: kernel32.error)

    running, exited = Kernel32(7), Kernel32(7, code=0)
    assert ask(running) and running.closed == [7]
    assert not ask(exited) and exited.closed == [7]
    assert not ask(Kernel32(0, error=87))  # ERROR_INVALID_PARAMETER: no such process
    assert ask(Kernel32(0, error=5))  # access denied: another user's, alive

    monkeypatch.setattr(paths, "ON_WINDOWS", True)
    monkeypatch.setattr(paths.os, "kill", lambda *a: pytest.fail("os.kill on Windows"))
    monkeypatch.setattr(paths, "_windows_process_alive", lambda pid: pid == 42)
    assert paths.process_alive(42) and not paths.process_alive(43)


def test_on_windows_a_folder_is_writable_when_a_file_can_be_made_in_it(monkeypatch, tmp_path):
    """os.access on Windows reads only the read-only attribute, which folders ignore: every
    folder passed the early checks of --out, export -o and mask --out-dir there. Windows
    is asked by making a file (here /proc, which no one can write, stands in)."""
    from scenebreak import paths

    monkeypatch.setattr(paths, "ON_WINDOWS", True)
    assert paths.is_writable_folder(tmp_path / "new" / "out") and paths.is_writable_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []  # the probes leave nothing behind
    assert not paths.is_writable_folder(Path("/proc/out")) and not paths.is_writable_folder(Path("/proc"))
    # A folder to be made is asked by making a folder (C:\ lets users make folders, not files).
    import tempfile

    monkeypatch.setattr(tempfile, "TemporaryFile", lambda **k: (_ for _ in ()).throw(PermissionError(13, "no files")))
    assert paths.is_writable_folder(tmp_path / "renders") and not paths.is_writable_folder(tmp_path)


def test_a_folder_the_permissions_allow_but_the_system_refuses_is_not_writable(monkeypatch, tmp_path):
    """Root may write anywhere by the permissions, but not make a folder in /proc or /sys:
    `--out-dir /sys/renders` passed the early check and failed after the work with a raw
    OSError. The folder is asked by trying."""
    from scenebreak import paths

    monkeypatch.setattr(paths.os, "access", lambda *a, **k: True)  # as root
    assert not paths.is_writable_folder(Path("/proc/renders")) and not paths.is_writable_folder(Path("/proc"))
    assert paths.is_writable_folder(tmp_path / "new" / "out") and paths.is_writable_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_lock_open_in_another_process_this_instant_is_released_and_broken_calmly(monkeypatch):
    """On Windows a file that another process has open (to read who holds the lock)
    cannot be renamed or deleted (PermissionError): a finished learn failed after writing
    its scene, and a waiting one crashed breaking a stale lock."""
    from pathlib import Path as PathClass

    monkeypatch.setattr(locks, "ON_WINDOWS", True)
    path = _lock_path("shared")
    real_unlink, refusals = PathClass.unlink, []

    def unlink(self, *args, **kwargs):
        if self == path and len(refusals) < 2:
            refusals.append(1)
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(PathClass, "unlink", unlink)
    with locked(path, wait=False):
        pass
    assert len(refusals) == 2 and not path.exists()

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": locks.HOST, "pid": 2**22 + 7, "token": "t", "since": 0}))
    real_rename, renames = os.rename, []

    def rename(src, dst):
        renames.append(src)
        if len(renames) == 1:
            raise PermissionError(13, "being used by another process")
        return real_rename(src, dst)

    monkeypatch.setattr(locks.os, "rename", rename)
    with locked(path, wait=True):  # the dead owner's lock: broken on the second try
        assert read_owner(path)["pid"] == os.getpid()
    assert len(renames) == 2


def test_elsewhere_a_lock_that_cannot_be_broken_or_released_is_an_error_not_a_busy_loop(monkeypatch):
    """The Windows retries (a file open elsewhere) are Windows' only: on Linux a stale lock
    that cannot be renamed (another user's, in a sticky folder) looped at full speed for
    ever, silently."""
    path = _lock_path("sticky")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": locks.HOST, "pid": 2**22 + 7, "token": "t", "since": 0}))
    monkeypatch.setattr(locks, "ON_WINDOWS", False)
    monkeypatch.setattr(locks.os, "rename", lambda *a: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    with pytest.raises(SceneBreakError, match=f"cannot take over the stale lock {path} .*remove that file"):
        with locked(path, wait=True):
            pass
    # A lock of ours that cannot be deleted is left to go stale (its owner exits), never
    # turning finished work, or the error on its way out, into a failure.
    from pathlib import Path as PathClass

    mine = _lock_path("undeletable")
    real_unlink = PathClass.unlink
    monkeypatch.setattr(PathClass, "unlink", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError(13, "denied"))
                        if self == mine else real_unlink(self, *a, **k))
    with pytest.raises(KeyError):  # the error in flight is the one that comes out
        with locked(mine, wait=False):
            raise KeyError("the work's own error")
    assert mine.exists()


def test_a_wait_for_a_lock_stops_when_asked(monkeypatch):
    """A batch worker waiting for another run's job is told to stop through an event (no
    SIGINT, which kills on Windows): the wait must hear it."""
    from scenebreak.errors import Interrupted

    path = _lock_path("held")
    asked = []
    with locked(path, wait=False):
        with pytest.raises(Interrupted, match="stopped while waiting"):
            with locked(path, wait=True, poll=0.01, should_stop=lambda: asked.append(1) or len(asked) > 2):
                pass
    assert len(asked) == 3


def test_a_lock_this_process_left_behind_is_free_again_but_not_one_it_holds():
    """A Ctrl-C between the end of a lock's block and the removal of its file left a lock
    naming this live process, "held" until it exited: a notebook, the page or a batch
    worker could not learn that name again. A lock this process holds (in another
    thread) stays held."""
    import threading

    path = _lock_path()
    path.parent.mkdir(parents=True)
    left = {"host": locks.HOST, "namespace": locks.PID_NAMESPACE, "pid": os.getpid(), "token": "0123456789abcdef",
            "since": time.time()}  # (taken by this very process, after it started)
    path.write_text(json.dumps(left))
    with locked(path, wait=False):
        assert read_owner(path)["token"] != left["token"]
    assert not path.exists()

    holding, release = threading.Event(), threading.Event()

    def hold():
        with locked(path, wait=False):
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert holding.wait(30)
        with pytest.raises(Busy):
            with locked(path, wait=False):
                pass
    finally:
        release.set()
        thread.join(30)
    assert not path.exists()
