"""Where scenebreak keeps things: one home folder, `SCENEBREAK_HOME` moves it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import re
import secrets
import shutil
import socket
import stat
from typing import Callable
from pathlib import Path

from .errors import InvalidInput, SceneBreakError

SCENE_SUFFIX = ".scene"
ON_WINDOWS = os.name == "nt"  # (its files and processes behave differently: see where it is used)
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the whole name (fullmatch: "$" would let "x\n" by)


def home() -> Path:
    """The cache root: `$SCENEBREAK_HOME`, else the platform's user cache dir."""
    env = os.environ.get("SCENEBREAK_HOME")
    if env:
        path = Path(env).expanduser()
        if path.exists() and not path.is_dir():  # (else every scene would be "not found", `list` empty)
            raise SceneBreakError(f"SCENEBREAK_HOME={env} is a file, not a folder: point it at a folder (or unset it)")
        return path
    import platformdirs

    return Path(platformdirs.user_cache_dir("scenebreak"))


def scenes_dir() -> Path:
    return home() / "scenes"


def class_images_dir() -> Path:
    return home() / "class-images"


def checkpoints_dir() -> Path:
    return home() / "checkpoints"


MAX_NAME = 200  # characters: room for ".scene", ".ckpt" and a temp-file prefix and suffix in 255 bytes


# Names Windows keeps for devices, whatever follows their first dot (con.scene is the console).
WINDOWS_DEVICE_NAMES = frozenset(["con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
                                  *(f"lpt{i}" for i in range(10))])


def windows_device_name(name: str) -> bool:
    return name.split(".", 1)[0].lower() in WINDOWS_DEVICE_NAMES


def valid_name(name: str) -> bool:
    """Letters, digits, '.', '_' and '-', starting with a letter or digit: nothing that
    can name another folder, hide a file or start an option. (What every scene and
    handle name is checked against, also when read.)"""
    return bool(_NAME_RE.fullmatch(name)) and len(name) <= MAX_NAME


def not_portable(name: str) -> str | None:
    """Why a valid name could not be a file name on Windows, where a scene may travel
    (a device name such as con or nul.x; a trailing dot, which Windows drops), or None.
    Asked of new names only: a scene made before this rule still opens."""
    if windows_device_name(name):
        return f"Windows keeps {name.split('.', 1)[0]!r} for a device"
    if name.endswith("."):
        return "Windows drops a name's trailing dot"
    return None


def check_name(name: str, new: bool = False) -> str:
    """`name` as a scene name, or InvalidInput; `new`: a name being given to a scene now,
    which must also be portable."""
    if len(name) > MAX_NAME:
        raise InvalidInput(f"scene name {name[:40]!r}... is {len(name)} characters long: use at most {MAX_NAME}")
    if not valid_name(name) or name.endswith(SCENE_SUFFIX):
        raise InvalidInput(
            f"invalid scene name {name!r}: use letters, digits, '.', '_' or '-' (no '{SCENE_SUFFIX}' suffix)"
        )
    why = not_portable(name) if new else None
    if why:
        raise InvalidInput(f"invalid scene name {name!r}: {why}, so the scene could not be saved there: choose "
                           "another --name")
    return name


def scene_path(name: str) -> Path:
    """The cache path of the scene called `name`."""
    return scenes_dir() / f"{check_name(name)}{SCENE_SUFFIX}"


CHECKPOINT_SUFFIX = ".ckpt"


def checkpoint_path(name: str) -> Path:
    return checkpoints_dir() / f"{check_name(name)}{CHECKPOINT_SUFFIX}"


def resolve_scene(ref: str | os.PathLike) -> Path:
    """A `.scene` path as given, or the cached scene of that name. A bare name (no folder,
    no `.scene`) is the cached scene where one has it, else a file of that name here: a
    file in the current folder no longer hides the scene `list` shows (and `rm` took it)."""
    path = Path(ref).expanduser()
    if path.suffix == SCENE_SUFFIX or has_folder(str(ref)):
        return path
    try:
        cached = scene_path(str(ref))
    except InvalidInput:  # no scene name: only a file of that name can be meant
        if path.is_file():
            return path
        raise
    return path if path.is_file() and not os.path.lexists(cached) else cached


def names_both(ref: str | os.PathLike) -> bool:
    """Whether `ref` is a bare name that is both a cached scene and a file here."""
    path = Path(ref).expanduser()
    return resolve_scene(ref) != path and path.is_file()


def has_folder(ref: str) -> bool:
    """Whether `ref` names a folder too (a path, not a bare name)."""
    return os.sep in ref or bool(os.altsep and os.altsep in ref)


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp path next to `path`, then rename it over `path`:
    readers see the old file or the complete new one, never a partial one. `write`
    may make a file or a folder (a folder replaces an existing folder at `path`).
    Temp files that a killed run left for the same `path` are removed first.

    Writers that report a full disk in their own words (safetensors, torch.save) get
    their error turned into the usual OSError(ENOSPC), so callers can name the fix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settle_replaced_folder(path)
    aside: list[Path] = []

    def replace(tmp: Path) -> Path:
        if tmp.is_dir() and os.path.lexists(path):
            # A folder cannot be renamed over a non-empty one: the old one steps aside (a
            # rename, not a deletion) and goes only once the new one is in its place.
            aside.append(temporary_beside(path, "old"))
            os.rename(path, aside[0])
        try:
            os.replace(tmp, path)
        except BaseException:
            if aside:
                os.rename(aside.pop(), path)
            raise
        return path

    _write_beside(path, write, replace)
    if aside:
        _remove(aside[0])
    return path


def in_a_private_folder(path: Path, write: Callable[[Path], None]) -> Callable[[Path], None]:
    """`write` for a writer that makes a temporary of its own beside its target and
    renames it over the target at the end (safetensors' `.tmpXXXXXX`): it writes into a
    folder named as this run's temporary of `path`, so that a run killed meanwhile
    leaves nothing the next write of `path` (or `rm`) does not remove. Before, that was
    a whole scene (gigabytes) left in the cache for good."""
    def write_tmp(tmp: Path) -> None:
        folder = temporary_beside(path, "tmpdir")
        folder.mkdir()
        try:
            write(folder / path.name)
            os.replace(folder / path.name, tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return write_tmp


def write_new_file(path: Path, write: Callable[[Path], None]) -> Path:
    """write_atomically for a file that must replace nothing: it takes `path`, or the
    first of `path` numbered -1, -2, ... that is free when it is published, even if
    another run took a name meanwhile (a hard link claims a name or fails; on a disk
    without hard links, a check just before the rename). Returns where it went."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def claim_a_free_name(tmp: Path) -> Path:
        for n in itertools.count():
            candidate = path if n == 0 else path.with_name(f"{path.stem}-{n}{path.suffix}")
            try:
                os.link(tmp, candidate)
            except FileExistsError:
                continue
            except OSError:  # no hard links here (FAT, some network disks)
                if os.path.lexists(candidate):
                    continue
                os.replace(tmp, candidate)
            return candidate

    return _write_beside(path, write, claim_a_free_name)


def _write_beside(path: Path, write: Callable[[Path], None], publish: Callable[[Path], Path]) -> Path:
    """The part the two writers share: `write(tmp)` beside `path` (a killed run's
    temporaries of it removed first), on the disk before `publish(tmp)` gives it its
    name (after a power cut a rename must not publish an empty file), the rename on the
    disk too, a full disk said as one, and the temporary never left behind."""
    remove_stale_temporaries(path)
    tmp = temporary_beside(path)
    try:
        write(tmp)
        flush_to_disk(tmp)
        published = publish(tmp)
        sync_folder(path.parent)
        return published
    except Exception as exc:
        said = writer_os_error(exc, path)
        if said is not None:
            raise said from exc
        raise
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def settle_replaced_folder(path: Path, kind: str = "old") -> None:
    """A run killed while replacing a folder left the old one aside (as temporary
    `kind`): it goes back where the new one never arrived, and is removed where the new
    one did."""
    if os.path.lexists(path):
        remove_stale_temporaries(path, (kind,))
        return
    for entry in _dead_temporaries(path.parent, re.escape(path.name), (kind,))[:1]:
        with contextlib.suppress(OSError):
            os.rename(entry.path, path)


def flush_to_disk(path: Path) -> None:
    """Force a file, or every file of a folder (and the folder), onto the disk: file
    systems may otherwise put a rename on the disk before the data it names (XFS, and
    ext4 for a new name), and a power cut would leave an empty scene or checkpoint."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        for root, _, files in os.walk(path, topdown=False):  # each folder after its files; links not followed
            for name in files:
                item = Path(root, name)
                if not item.is_symlink() and item.is_file():
                    _fsync(item, _file_sync_flags())
            sync_folder(Path(root))
    elif path.is_file():
        _fsync(path, _file_sync_flags())


def _file_sync_flags() -> int:
    # Windows flushes a file only through a handle that may write (FlushFileBuffers); POSIX any.
    return os.O_RDWR | getattr(os, "O_BINARY", 0) if ON_WINDOWS else os.O_RDONLY


def sync_folder(folder: Path) -> None:
    """Put a folder's entries (a rename, a deletion) on the disk; a no-op where folders
    cannot be opened (Windows) or synced."""
    if not ON_WINDOWS:
        _fsync(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # a file system without fsync (some network ones) is no failure; a full disk is
        if exc.errno in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
    finally:
        os.close(fd)


def _pid_namespace() -> str:
    """The process-id namespace this process is in (Linux: "pid:[4026531836]"), "" where
    there is none to tell. A container run with the host's network (`--network host`,
    Kubernetes' hostNetwork) has the host's name but its own process ids: judged by name
    alone, each took the other's live processes for dead."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except (OSError, AttributeError):
        return ""


PID_NAMESPACE = _pid_namespace()
# Whose a temporary is: this machine (a cache may be shared over the network), its
# process ids' namespace, and the process.
HOST_TAG = hashlib.sha256((socket.gethostname() + PID_NAMESPACE).encode()).hexdigest()[:8]


def temporary_beside(path: Path, kind: str = "tmp") -> Path:
    """A temporary name next to `path` that says which run made it (host, process and a
    random part, for threads), so a later run can tell one a dead run left behind."""
    return path.with_name(f".{path.name}.{HOST_TAG}-{os.getpid()}-{secrets.token_hex(2)}.{kind}")


def remove_stale_temporaries(path: Path, kinds: tuple[str, ...] = ("tmp", "tmpdir")) -> None:
    """Delete the temporaries of `path` (files or folders; never a link) whose
    run died on this machine before it could remove them (killed during a write, or
    the machine went down); also those of older versions (`.NAME.PID.tmp`)."""
    for entry in _dead_temporaries(path.parent, re.escape(path.name), kinds):
        with contextlib.suppress(OSError):
            shutil.rmtree(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)


def remove_dead_image_temporaries(folder: Path) -> None:
    """Delete the temporaries of PNGs in `folder` whose run on this machine died while
    writing them (`generate` killed mid-write): the run after it writes other names
    (another seed), so their own clean-up never came."""
    for entry in _dead_temporaries(folder, r".+\.png", ("tmp",), older=False):
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)


def _dead_temporaries(folder: Path, names: str, kinds: tuple[str, ...], older: bool = True) -> list[os.DirEntry]:
    """The temporaries in `folder` of the files whose names match `names` (a regular
    expression), of those `kinds` (never a link), whose run on this machine has died;
    with `older`, also those of older versions (`.NAME.PID.tmp`)."""
    kinds_re = "|".join(map(re.escape, kinds))
    pid = rf"{HOST_TAG}-(\d+)-[0-9a-f]{{4}}" + (r"|(\d+)" if older else "")
    pattern = re.compile(rf"\.(?:{names})\.(?:{pid})\.(?:{kinds_re})")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return [entry for entry in entries if (match := pattern.fullmatch(entry.name)) and not entry.is_symlink()
            and not process_alive(int(match[1] or match[2]))]


def process_alive(pid: int) -> bool:
    """Whether a process of this machine with that id runs (when in doubt: yes)."""
    if pid <= 0:
        return True
    if ON_WINDOWS:
        # Not os.kill(pid, 0): on Windows that terminates the process it asks about.
        return _windows_process_alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process, or asking is not allowed
        return True
    return True


def _windows_process_alive(pid: int, kernel32=None, last_error=None) -> bool:
    """Windows' answer through OpenProcess: a process that cannot be opened for a reason
    other than not existing (another user's) counts as alive, as does one still active."""
    import ctypes

    if kernel32 is None:
        kernel32, last_error = ctypes.WinDLL("kernel32", use_last_error=True), ctypes.get_last_error
    query_limited_information, still_active, invalid_parameter = 0x1000, 259, 87
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return last_error() != invalid_parameter  # ERROR_INVALID_PARAMETER: no such process
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def writer_os_error(exc: BaseException, path: Path) -> OSError | None:
    """The OSError a writer's failure into `path`'s folder was, where it can be told:
    safetensors (Rust) and torch.save report one in words of their own, not as an
    OSError. safetensors names the system's error number ("(os error 28)": ENOSPC,
    EDQUOT, EACCES ...); otherwise a failure while the disk is nearly full counts as a
    full disk. (Judged by free space alone, a full disk was missed when safetensors had
    deleted its part-written file, freeing more than the margin, before it raised.) An
    OSError that says what it is is left as it is."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return None
    code = re.search(r"\(os error (\d+)\)", str(exc))
    if code and int(code[1]) in errno.errorcode:
        return OSError(int(code[1]), os.strerror(int(code[1])), str(path))
    if not _disk_nearly_full(Path(path).parent):
        return None
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def is_regular_file(path: Path) -> bool:
    """Whether `path` is a regular file (or a link to one): never a FIFO, a device or a
    socket, which would block or never end when read. Asks without opening it."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def text_path(path: str | os.PathLike):
    """`path` as text that a library written in Rust (safetensors) can open: the path
    itself, or, for a name that is not UTF-8 (made under another locale, from an old
    disk), the same file opened here and named through /dev/fd: such a scene was
    written, then refused as "truncated or corrupt"."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if os.path.isdir("/dev/fd"):
            fd = os.open(path, os.O_RDONLY)
            try:
                yield f"/dev/fd/{fd}"
            finally:
                os.close(fd)
            return
    yield text


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` are one file (False where either is missing)."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def is_pipe(path: Path) -> bool:
    """Whether `path` is a pipe (a FIFO, or the shell's `<(...)`, /dev/fd/N)."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file or a pipe (`<(...)`) the user named, or of stdin
    for "-"; `what` names it in errors. Reads at most `max_bytes`: a larger file
    (/dev/zero, a log given by mistake) is refused, not read whole into memory."""
    import sys

    if str(path) == "-":
        if sys.stdin is None:  # (`<&-`, a service without one)
            raise InvalidInput(f"{what} is standard input ('-'), which is closed: pipe the text in, or give a file")
        data, name = sys.stdin.buffer.read(max_bytes + 1), "standard input"
    else:
        name = str(path)
        if not Path(path).exists():
            raise InvalidInput(f"{what} {name} not found")
        if not (is_regular_file(Path(path)) or is_pipe(Path(path))):
            raise InvalidInput(f"{what} {name} is not a regular file (to pipe text in, give '-')")
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
    if not probe.is_dir():
        return False
    # A link to nowhere on the way is no folder to be made: mkdir finds it "exists".
    target = missing = Path(folder).expanduser().absolute()
    while missing != probe:
        if missing.is_symlink():
            return False
        missing = missing.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        return False
    # Permissions do not settle it: Windows' os.access reads only the read-only attribute,
    # which folders ignore, and root may write anywhere by them but cannot make a folder
    # in /sys or /proc. So try it (a folder or file made and removed at once).
    import tempfile

    try:
        if probe != target:  # folders to make: try making one (C:\ takes folders, not files)
            os.rmdir(tempfile.mkdtemp(dir=probe))
        else:
            with tempfile.TemporaryFile(dir=probe):
                pass
    except OSError:
        return False
    return True


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
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()  # a link goes, not its target


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False


def fit_file_name(stem: str, suffix: str, longest_suffix: str | None = None) -> str:
    """`stem + suffix` for a file named after another one (a photo's mask, its edits).
    When the stem and `longest_suffix` (default: `suffix`) would not fit a file name
    with write_atomically's temp prefix and suffix (as check_file_name_fits counts),
    the stem is cut to fit and followed by '-' and 8 hex digits of its sha256: the same
    stem always gets the same names, different stems different ones, and names made
    with the same `longest_suffix` share one stem."""
    import hashlib

    room = 255 - 32  # bytes
    longest = os.fsencode(longest_suffix or suffix)
    if len(os.fsencode(stem)) + len(longest) <= room:
        return stem + suffix
    tag = hashlib.sha256(os.fsencode(stem)).hexdigest()[:8]
    room -= len(longest) + len(tag) + 1
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[:-1]  # whole characters, never half of one
    return f"{stem}-{tag}{suffix}" if stem else f"{tag}{suffix}"
