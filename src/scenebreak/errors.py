"""Error types. Every message is meant to be shown to the user as it is."""

import contextlib
import errno


class SceneBreakError(Exception):
    """Base class. `exit_code` 1: a runtime failure the user can fix."""

    exit_code = 1


class UsageError(SceneBreakError):
    """Bad input or bad usage (exit code 2)."""

    exit_code = 2


class InvalidInput(UsageError):
    """An image, a mask or an option value that cannot be used."""


class InvalidMask(InvalidInput):
    """A mask that is missing, empty or of the wrong size."""


class UnknownHandle(UsageError):
    """A prompt names a handle the scene does not have."""


class BundleError(UsageError):
    """A `.scene` file that is missing, truncated, foreign or from a newer version."""


class DeviceNotAvailable(UsageError):
    """The requested device does not exist on this machine."""


class ModelNotAvailable(SceneBreakError):
    """The base model's weights are not here and cannot be downloaded."""


class NoSpace(SceneBreakError):
    """Not enough room on the disk (or a file-size limit) for what must be written."""


class Diverged(SceneBreakError):
    """The training loss became NaN or infinite (a lower learning rate fixes it)."""


class OutOfMemory(SceneBreakError):
    """The device ran out of memory."""


class CheckpointMismatch(InvalidInput):
    """`--resume` of a checkpoint made from other inputs, settings or base model."""


class Interrupted(SceneBreakError):
    """The user interrupted a long operation (exit code 130). `partial`: what it had
    made by then, where that is worth showing (generate's images written), or None."""

    exit_code = 130

    def __init__(self, message: str = "interrupted", partial=None):
        super().__init__(message)
        self.partial = partial


class Terminated(Interrupted):
    """Stopped by SIGTERM (a supervisor, `kill`, `docker stop`): exit code 143, as a shell reports it."""

    exit_code = 143


class HungUp(Terminated):
    """Stopped by SIGHUP (the terminal or ssh session it ran in closed): exit code 129."""

    exit_code = 129


STOPPED_BY = {Terminated: "terminated (SIGTERM)", HungUp: "the terminal closed (SIGHUP)",
              Interrupted: "interrupted (Ctrl-Break)"}  # (the Interrupted of each of stop_signals)


def stopped_by(kind: type, why: str) -> Interrupted:
    """The Interrupted a stop signal leaves as (`kind`: stop_signals' value), saying `why`."""
    return kind(f"{STOPPED_BY[kind]}: {why}")


def stop_signals() -> dict:
    """The signals that stop a long command cleanly, as Ctrl-C does, each with the
    Interrupted it leaves as: SIGTERM, SIGHUP where there is one (not on Windows), and
    Windows' Ctrl-Break (SIGBREAK), which would otherwise end the process on the spot,
    checkpoint unsaved."""
    import signal

    found = {signal.SIGTERM: Terminated}
    if hasattr(signal, "SIGHUP"):
        found[signal.SIGHUP] = HungUp
    if hasattr(signal, "SIGBREAK"):
        found[signal.SIGBREAK] = Interrupted
    return found


def quiet_dead_terminal() -> None:
    """After SIGHUP the terminal is gone and writing to it fails (EIO), which would
    break the saving of a checkpoint with an error: stdout and stderr that were that
    terminal write nowhere from now on (a file or a pipe they were stays)."""
    import os

    for fd in (1, 2):
        try:
            if os.isatty(fd):
                write_nowhere(fd)
        except OSError:
            pass


def write_nowhere(fd: int) -> None:
    """Point the file descriptor `fd` at the null device (OSError where it cannot be)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA raises OutOfMemoryError, and cuBLAS/cuDNN a RuntimeError naming their failed
    allocation near a full card (CUBLAS_STATUS_ALLOC_FAILED, CUDNN_STATUS_NOT_ENOUGH_WORKSPACE);
    MPS a plain RuntimeError that says so, or "Invalid buffer size" for one tensor larger
    than the GPU's biggest buffer (8-16 GB Macs); torch's CPU allocator a RuntimeError
    that it "can't allocate memory"; numpy and Python MemoryError."""
    text = str(exc).lower()
    return type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(
            words in text for words in ("out of memory", "can't allocate memory", "invalid buffer size",
                                        "status_alloc_failed", "not_enough_workspace")))


NO_SPACE = {code: what for code, what in ((errno.ENOSPC, "no space left on device"),
                                          (errno.EFBIG, "file too large for this file system"),
                                          (getattr(errno, "EDQUOT", None), "disk quota exceeded")) if code}


def fixable_error(exc: BaseException) -> "SceneBreakError | None":
    """`exc` as the SceneBreakError it amounts to (a full disk: NoSpace; the GPU or the
    machine out of memory: OutOfMemory), each naming the fix; None for anything else."""
    if isinstance(exc, SceneBreakError):
        return exc
    if isinstance(exc, OSError) and exc.errno in NO_SPACE:
        where = exc.filename or "while writing"
        return NoSpace(f"{NO_SPACE[exc.errno]} ({where}): free some space, or write to a bigger disk (SCENEBREAK_HOME "
                       "for the cache; the command's --out-dir or -o for its files)")
    if is_out_of_memory(exc):
        if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc):  # the machine's memory, not a GPU's
            return OutOfMemory("out of memory (RAM): try a smaller --batch-size, -n or --resolution, or close other "
                               "programs")
        return OutOfMemory("out of memory on the GPU: try a smaller --batch-size where it is above 1, close what else "
                           "uses the GPU, or --device cpu")
    return None


@contextlib.contextmanager
def fixable_failures():
    """Failures the user can fix (a full disk, out of memory) leave the block as the
    SceneBreakError that names the fix, so that a Python caller catches SceneBreakError
    for each of them, as the command line shows them. (Also a decorator.)"""
    try:
        yield
    except KeyboardInterrupt as exc:
        let_go(exc)
        raise
    except Exception as exc:
        error = fixable_error(exc)
        if isinstance(error, (OutOfMemory, Interrupted)):
            let_go(exc, unload=isinstance(error, OutOfMemory))
        if error is None or error is exc:
            raise
        if getattr(exc, "partial", None) is not None:  # what was made before it (generate's images written)
            error.partial = exc.partial
        try:
            raise error from exc
        finally:
            del error  # (else the error's own traceback holds this frame, which holds the error: a cycle)


def let_go(exc: BaseException, unload: bool = False) -> None:
    """Free the models and activations that the frames of a call stopped by `exc` still
    hold: a notebook keeps the last exception (for %debug), and with it every frame's
    locals, so the next call ran out of memory on what the last left on the GPU. Only
    for an interruption or running out of memory, where the frames are not a bug's
    evidence. `unload`: the models kept between calls (kept.py) go too."""
    import traceback

    from . import kept

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # the chain: what it was raised from, or while handling
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # (frames still running are left as they are)
        exc = exc.__cause__ or exc.__context__
    if unload:
        kept.unload()
    else:
        kept.free_memory()


@contextlib.contextmanager
def deferred_signals():
    """Ctrl-C, SIGTERM and SIGHUP inside the block are held until the block asks for them:
    it gets a function that raises, where it is called, what the signal's own handler
    would have raised (KeyboardInterrupt; Terminated where sigterm_stops is set). A
    handler that raises runs wherever Python happens to be, and inside a finalizer
    (`__del__`, which a library's calls can run) Python prints its exception and drops
    it: the Ctrl-C is lost, and a batch trains on. A second signal of a kind already held
    acts at once. In a thread other than the main one, nothing is held."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    held: list[int] = []

    def act(signum: int) -> None:
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt
        else:  # the system's default (the process ends): as it would have without the block
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def hold(signum, frame):
        if signum in held:
            act(signum)
        held.append(signum)

    def deliver() -> None:
        while held:
            act(held.pop(0))

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *stop_signals())}
    previous = {sig: old for sig, old in previous.items() if old not in (signal.SIG_IGN, None)}  # (ignored stays so)
    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield deliver
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def sigterm_stops(message):
    """Within the block, SIGTERM raises Terminated("terminated (SIGTERM): `message`") in
    the main thread, and SIGHUP HungUp, so that a long-running command unwinds through
    its clean-up as on Ctrl-C (by default the process would die at once, with no
    clean-up and no line). `message` may be a function, asked when the signal comes.
    Elsewhere: nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = stop_signals()

    def stop(signum, frame):
        if kinds[signum] is HungUp:
            quiet_dead_terminal()
        raise stopped_by(kinds[signum], message() if callable(message) else message)  # (Ctrl-Break: as Ctrl-C)

    previous = {sig: signal.signal(sig, stop) for sig in kinds}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
