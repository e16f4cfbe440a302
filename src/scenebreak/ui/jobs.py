"""The page's long actions (embedding a photo, learn, generate) run one at a time in a
background thread; their progress is the same `events.Progress`/`Message` records the
command line draws as bars, kept here with a sequence number for the page to stream."""

from __future__ import annotations

import itertools
import math
import threading
from typing import Callable

from ..errors import Interrupted, fixable_error
from ..events import Event, Progress

MAX_EVENTS = 2000  # a job's records kept for the page; older progress is dropped first
TERMINAL = ("done", "failed", "cancelled")
_ids = itertools.count(1)  # a job's id in this server: a page's stream follows its own job, not whichever runs


def one_line(exc: BaseException) -> tuple[str, int]:
    """The one line and exit code the command line would give for `exc`."""
    error = fixable_error(exc)
    if error is not None:
        return str(error), error.exit_code
    return (str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"), 1


def _plain(value):
    """JSON-safe: non-finite floats (a diverged loss) become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def event_record(event: Event) -> dict:
    if isinstance(event, Progress):
        return {"type": "progress", "task": event.task, "completed": event.completed, "total": event.total,
                "info": _plain(event.info)}
    return {"type": "message", "text": event.text, "level": event.level}


class Job:
    """One action running in its own thread. `work(report, should_stop)` returns a
    JSON-ready result; `cancel()` makes `should_stop()` true (learn then saves a
    checkpoint and stops; `resume` continues it). `writes`: it writes files, so
    the server waits for it before it exits (an action that writes nothing is
    simply dropped)."""

    def __init__(self, kind: str, work: Callable, echo: Callable[[Event], None] | None = None, cancellable: bool = False,
                 writes: bool = True):
        self.kind, self.work, self.echo, self.cancellable, self.writes = kind, work, echo, cancellable, writes
        self.id = next(_ids)
        self.records: list[dict] = []
        self.seq = 0
        self.state = "running"
        self.result = None
        self.error: str | None = None
        self.changed = threading.Condition()
        self.stop = threading.Event()
        self.closing = False  # stopped because the server stops: its last record says so
        self.thread = threading.Thread(target=self._run, name=f"scenebreak-ui-{kind}", daemon=True)

    def start(self) -> "Job":
        self.thread.start()
        return self

    def report(self, event: Event) -> None:
        if self.echo:
            self.echo(event)
        self._add(event_record(event))

    def _add(self, record: dict) -> None:
        with self.changed:
            self.seq += 1
            self.records.append({"seq": self.seq, "job": self.kind, **record})
            if len(self.records) > MAX_EVENTS:
                drop = next((i for i, r in enumerate(self.records) if r["type"] == "progress"), 0)
                del self.records[drop]
            self.changed.notify_all()

    def cancel(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        try:
            result = self.work(self.report, self.stop.is_set)
            state, error = "done", None
        except Interrupted as exc:  # (what it made by then, if worth showing: a generate's images written)
            partial = getattr(exc, "partial", None)
            result = partial.to_dict() if hasattr(partial, "to_dict") else None
            state, error = "cancelled", str(exc)
        except BaseException as exc:  # noqa: BLE001 - the page shows it in one line, as the command line would
            result, state, error = None, "failed", one_line(exc)[0]
        with self.changed:  # the state and its record together: a reader never sees one without the other
            self.state, self.result, self.error = state, _plain(result), error
            self._add({"type": "state", "state": state, "result": self.result, "error": error,
                       **({"server": "stopped"} if self.closing else {})})

    @property
    def running(self) -> bool:
        return self.state not in TERMINAL

    def records_after(self, seq: int, timeout: float) -> list[dict]:
        """The records after `seq`, waiting up to `timeout` seconds for one."""
        with self.changed:
            if self.seq <= seq and self.running:
                self.changed.wait(timeout)
            return [r for r in self.records if r["seq"] > seq]

    def summary(self) -> dict:
        with self.changed:
            return {"id": self.id, "kind": self.kind, "state": self.state, "result": self.result, "error": self.error,
                    "seq": self.seq, "cancellable": self.cancellable}

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
