"""Resumable checkpoints of `learn`: when to save one, what it must match to be
resumed, writing and reading it, and the Ctrl-C / SIGTERM handling that asks for one."""

from __future__ import annotations

import contextlib
import hashlib
import signal
import threading
import time
from pathlib import Path

from ..errors import (NO_SPACE, CheckpointMismatch, HungUp, Interrupted, InvalidInput, NoSpace, SceneBreakError,
                      quiet_dead_terminal, stop_signals, stopped_by)
from ..events import Message, Reporter, silent
from ..paths import ON_WINDOWS, checkpoint_path, is_regular_file, write_atomically

# What a checkpoint's training goes on as: raised when the same checkpoint would
# continue differently (2: class images dealt once per round, not drawn), so that a
# resume of an older one says its result will differ from an uninterrupted run's.
CHECKPOINT_FORMAT = 2
# Training time that justifies one more checkpoint before the scene is written.
FINAL_AFTER_SECONDS = 300.0
# Settings a resumed run may change (e.g. add --gradient-checkpointing after running
# out of memory): resuming with less memory is their point. They change the result at
# most by rounding, and a resume says where: the memory switches change the clipping
# of phase 2 (per tensor with the optimizer in the backward pass) and, under half-
# precision autocast with LoRA, whether the frozen weights wait in half precision
# (so does --standalone; learn warns); a change of optimizer (8-bit or not) restarts
# its running averages (Trainer.load_state_dict warns).
RESUMABLE_CHANGES = ("checkpoint_every", "gradient_checkpointing", "save_dtype", "memory", "optimizer_in_backward",
                     "compile", "standalone", "adam_8bit")


class StopFlag:
    """Set by the first Ctrl-C (or SIGTERM, SIGHUP); the loop stops at the next step boundary."""

    def __init__(self, also=None):
        self.requested = False
        self.terminated = None  # by SIGTERM or SIGHUP: the Interrupted it leaves as (exit 143 or 129)
        self.also = also  # another "should I stop?" function, polled too
        self.finishing = False  # the training is done and the scene being written: a stop lets it finish
        self.written = False  # the scene is written: a signal now changes nothing (stops_noted)

    def __call__(self) -> bool:
        return self.requested or bool(self.also and self.also())


@contextlib.contextmanager
def stops_noted(flag: StopFlag, message):
    """Outside the training (catch_interrupts): Ctrl-C raises KeyboardInterrupt at once,
    and SIGTERM, SIGHUP and Ctrl-Break their Interrupted ("terminated (SIGTERM):
    `message()`"), a line and exit 143 where the process would die without a word. Each
    is noted in `flag` too: one that a library's bare `except:` swallowed while the
    models load (mpmath's import of gmpy2 is one) still stops the run where `flag` is
    asked, before the training. Once `flag.written`, a signal is noted only: the scene
    is whole, and the run ends as it would have a moment later."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kinds = stop_signals()

    def note(signum, frame):
        if flag.written:
            return
        flag.requested = True
        flag.terminated = kinds.get(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if flag.terminated is HungUp:
            quiet_dead_terminal()
        raise stopped_by(flag.terminated, message())

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *kinds)}
    previous = {sig: old for sig, old in previous.items() if old not in (signal.SIG_IGN, None)}  # (ignored stays so)
    for sig in previous:
        signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def catch_interrupts(flag: StopFlag, report: Reporter):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    kinds = stop_signals()

    def handler(signum, frame):
        if flag.requested and kinds.get(signum) is not HungUp:
            raise KeyboardInterrupt  # a second Ctrl-C (or SIGTERM) stops at once
        if flag.requested:
            return  # (a hang-up after Ctrl-C: the checkpoint is on its way)
        flag.requested = True
        flag.terminated = kinds.get(signum)
        if flag.terminated is HungUp:  # no terminal to write to: the checkpoint must not fail on it
            quiet_dead_terminal()
        said = ("the training is done: the scene is being written, then the run ends (press Ctrl-C again to abort "
                "now)") if flag.finishing else "stopping after this step to save a checkpoint (press Ctrl-C again to abort now)"
        try:
            report(Message(said, "warning"))
        except Exception:  # (a signal that lands inside the reporter's own write: a print to stdout raises
            pass           # "reentrant call"; the stop must not fail on it, and the closing line says it all)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, *kinds)}
    try:
        yield
    except Interrupted as exc:
        if flag.terminated and not isinstance(exc, flag.terminated):
            raise flag.terminated(str(exc)) from None
        raise
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def identity(prepared, config, fingerprint: str, weights: str | None = None) -> dict:
    """What a checkpoint must match to be resumed: same photo, masks, settings, model
    (its fingerprint, and `weights`, families.base_model.weights_print: a fine-tune
    shares its base's fingerprint)."""
    masks_digest = hashlib.sha256(prepared.masks.tobytes()).hexdigest()
    settings = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    return {"source": prepared.source_sha256, "masks": masks_digest, "config": repr(sorted(settings.items())), "base": fingerprint,
            **({"base_weights": weights} if weights else {})}


def is_last_step(record, steps2: int) -> bool:
    return record.step == record.total and (record.phase == 2 or steps2 == 0)


def should_checkpoint(record, every: int, steps2: int, stop_requested: bool) -> bool:
    """After this step? Never after the very last one (the scene is written instead);
    otherwise when asked to stop, at the end of phase 1, and every `every` steps."""
    if is_last_step(record, steps2):
        return False
    phase1_done = record.phase == 1 and record.step == record.total
    return stop_requested or phase1_done or bool(every and record.step % every == 0)


class Checkpoints:
    """The checkpoint of one scene name: saved by the rule above, loaded on --resume."""

    def __init__(self, name: str, identity: dict, every: int, steps2: int):
        self.name, self.identity, self.every, self.steps2 = name, identity, every, steps2
        self.path: Path = checkpoint_path(name)
        self.saved_at = time.monotonic()  # the run's start counts as saved: nothing to lose yet
        self.saved = None  # (phase, step) of the last checkpoint this run wrote

    def load(self, report: Reporter) -> dict:
        import torch

        if not self.path.exists():
            raise InvalidInput(f"nothing to resume: no checkpoint for scene {self.name!r} (run without --resume)")
        damaged = InvalidInput(f"the checkpoint of {self.name!r} ({self.path}) is damaged (truncated or corrupt): "
                               "start over with --force in place of --resume")
        if not is_regular_file(self.path):
            raise damaged
        # Memory-mapped: a phase-2 checkpoint holds the model and the optimizer state, which
        # must not sit in RAM a second time next to the live ones. Not on Windows: there a
        # mapped file cannot be replaced, and the run's next checkpoint replaces it.
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=not ON_WINDOWS)
        except Exception:  # torch and pickle raise many types for a damaged file
            raise damaged from None
        if not isinstance(state, dict):
            raise damaged
        saved = state.get("identity")
        mine = self.identity
        if isinstance(saved, dict) and "base_weights" not in saved:  # (checkpoints before the weights' print)
            mine = {k: v for k, v in mine.items() if k != "base_weights"}
        if isinstance(saved, dict) and saved.get("base") == mine.get("base") and saved.keys() == mine.keys() and \
                saved.get("base_weights") != mine.get("base_weights"):
            raise CheckpointMismatch(f"the checkpoint of {self.name!r} was made on another base model (the same "
                               "architecture, other weights): pass the --base-model it began with, or start over "
                               "with --force in place of --resume")
        if saved != mine:
            raise CheckpointMismatch(f"the checkpoint of {self.name!r} was made from other inputs or settings: "
                               "run the same command, or start over with --force in place of --resume")
        if not all(isinstance(state.get(key), int) for key in ("phase", "step")):
            raise InvalidInput(f"the checkpoint of {self.name!r} ({self.path}) is damaged or from another version of "
                               "scenebreak: start over with --force in place of --resume")
        report(Message(f"resuming {self.name!r} at phase {state['phase']}, step {state['step']}"))
        if state.get("format", 1) != CHECKPOINT_FORMAT:
            report(Message(f"the checkpoint of {self.name!r} was written by another version of scenebreak, which "
                           "trains on differently from here: the scene will differ from an uninterrupted run's "
                           "(start over with --force in place of --resume for that)", "warning"))
        return state

    def save(self, trainer, report: Reporter = silent) -> None:
        """Write the trainer's state, unless its last loss diverged (Diverged: the
        checkpoint already there is the last good one)."""
        import torch

        trainer.check_finite()
        report(Message(f"saving a checkpoint of {self.name!r}"))  # (gigabytes in phase 2: said before, not silent)
        state = trainer.state_dict()
        state["identity"], state["format"] = self.identity, CHECKPOINT_FORMAT
        write_atomically(self.path, lambda tmp: torch.save(state, tmp))
        self.saved_at, self.saved = time.monotonic(), (trainer.phase, trainer.step)

    def before_final_save(self, trainer, report: Reporter = silent) -> None:
        """Keep the finished training resumable while the scene is written, when more
        than FINAL_AFTER_SECONDS of work would otherwise be lost to a failed write (a
        full disk): a resume then only writes the scene. If this insurance cannot be
        written, the scene is written all the same (it may well fit: a LoRA scene is
        small)."""
        if time.monotonic() - self.saved_at > FINAL_AFTER_SECONDS:
            self._save_or_go_on(trainer, report)

    def after_step(self, trainer, record, stop: StopFlag, report: Reporter = silent) -> None:
        """Save when the rule says so; stop (Interrupted) when asked to. A save on the
        way (every N steps, the end of phase 1) that cannot be written (a full disk) is
        a warning and training goes on: stopping then would lose the steps since the
        last checkpoint, and the scene may still fit. A save to stop must succeed."""
        stopping = stop()
        if should_checkpoint(record, self.every, self.steps2, stopping):
            if stopping:
                try:
                    self.save(trainer, report)
                except OSError as exc:
                    raise self._unsaved_on_stop(exc) from exc
            else:
                self._save_or_go_on(trainer, report)
        if stopping and not is_last_step(record, self.steps2):
            raise Interrupted("interrupted: checkpoint saved; run the same command with --resume to continue")

    def _save_or_go_on(self, trainer, report: Reporter) -> None:
        try:
            self.save(trainer, report)
        except OSError as exc:
            why = exc.strerror or str(exc)
            kept = "the one before it is kept" if self.path.exists() else "there is none"
            report(Message(f"could not write the checkpoint of {self.name!r} ({why}): training goes on; {kept}",
                           "warning"))

    def _unsaved_on_stop(self, exc: OSError) -> SceneBreakError:
        """The checkpoint a stop asked for could not be written: what is kept, and how
        to go on from it."""
        why = NO_SPACE.get(exc.errno, exc.strerror or str(exc))
        if self.saved is not None and self.path.exists():
            kept = (f"the one of phase {self.saved[0]}, step {self.saved[1]} is kept: fix that and run the same command "
                    "with --resume to train on from it")
        elif self.path.exists():
            kept = "the one the run resumed from is kept: fix that and run the same command with --resume"
        else:
            kept = "there is no earlier one: fix that and run the same command again"
        return (NoSpace if exc.errno in NO_SPACE else SceneBreakError)(
            f"stopped, but could not save the checkpoint of {self.name!r} ({why}); {kept}")

    def remove(self) -> None:
        if self.path.exists():
            self.path.unlink()
