"""Drawing progress and messages on stderr: rich bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time

from ..estimates import format_duration
from ..events import Event, Message, Progress, printable


PROGRESS_ENV = "SCENEBREAK_PROGRESS"
RATE_WINDOW = 3600.0  # seconds of progress a bar's rate and ETA average


def progress_style() -> str:
    """"bars" (live, where the terminal redraws) or "plain" (periodic lines):
    $SCENEBREAK_PROGRESS, else plain in Google Colab, whose cells print every redraw of
    a `!scenebreak` bar as new lines (thousands in a learn), else bars."""
    import os

    chosen = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if chosen in ("bars", "plain"):
        return chosen
    return "plain" if os.environ.get("COLAB_RELEASE_TAG") or os.environ.get("COLAB_GPU") else "bars"


def _nowhere():
    import os

    return open(os.devnull, "w")


def stderr_console(file, **options):
    """A rich Console on `file` (stderr) that outlives its reader. Where the reader goes
    away (`learn ... 2>&1 | tee log` and tee dies with the ssh session, `|& head`),
    rich's own exits 1 at once, pointing stdout at /dev/null: a learn lost the steps
    since its last checkpoint, and a generate its images. This one goes quiet and the
    work goes on: the results still go to stdout, a stop still saves its checkpoint."""
    from rich.console import Console

    class StderrConsole(Console):
        def on_broken_pipe(self) -> None:
            from ..errors import write_nowhere

            self.quiet = True
            try:  # (what Python still holds for stderr must flush somewhere at exit)
                write_nowhere(self.file.fileno())
            except (OSError, ValueError, AttributeError):  # no real file descriptor (a test's stream)
                pass

    return StderrConsole(file=file, **options)


class ConsoleReporter:
    """A Reporter for the CLI. Stdout is never touched: it carries only results."""

    PLAIN_EVERY = 30.0  # seconds between plain progress lines

    def __init__(self, quiet: bool = False, stream=None):
        self.quiet = quiet
        # stderr=True: with fd 2 closed (`2>&-`, a service) sys.stderr is None, and rich
        # would write to stdout, into the results. emoji=False: a prompt's ":fire:" stays text.
        self.console = stderr_console(stream or sys.stderr or _nowhere(), stderr=True, highlight=False, soft_wrap=True,
                                      emoji=False)  # (soft_wrap: one line per message)
        # Live bars only on a real terminal that can redraw: not TERM=dumb (an editor's
        # shell: nothing would show until the end), not a file FORCE_COLOR points rich at.
        isatty = getattr(self.console.file, "isatty", lambda: False)
        self.tty = self.console.is_interactive and isatty() and progress_style() == "bars"
        self.progress = None
        self.losses: dict[str, float] = {}  # task -> its last loss (a GPU reads it once a second, not each step)
        self.tasks: dict[str, int] = {}
        # task -> (started, last printed, completed at the start, completed last seen)
        self.plain: dict[str, tuple[float, float, int, int]] = {}
        import os

        setting = os.environ.get(PROGRESS_ENV, "").strip()
        if setting and setting.lower() not in ("bars", "plain"):  # (a typo was taken silently for the default)
            self(Message(f"{PROGRESS_ENV}={setting[:20]!r} is neither bars nor plain: ignored", "warning"))

    def __call__(self, event: Event) -> None:
        if isinstance(event, Message):
            text = printable(event.text, keep_newlines=True)  # (it may quote a scene's or a file's text)
            if event.level == "warning":
                if self.tty:
                    from rich.markup import escape

                    self.console.print(f"[yellow]warning:[/yellow] {escape(text)}")
                else:
                    self.console.print(f"warning: {text}", markup=False)
            elif not self.quiet:
                self.console.print(text, markup=False)
        elif isinstance(event, Progress) and not self.quiet:
            if event.info.get("loss") is not None:  # (kept: on a GPU only some steps carry it)
                self.losses[event.task] = event.info["loss"]
            (self._bar if self.tty else self._line)(event)

    def _bar(self, event: Progress) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as RichProgress

        if self.progress is None:
            self.progress = RichProgress(
                TextColumn("{task.description:<13}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[phase]}"),
                console=self.console, transient=False, refresh_per_second=4,  # (a step takes a second or more)
                # rich's rate (and ETA) averages the last 30 s by default: with steps further
                # apart (a CPU's phase 2, 45 s each; a batch's jobs) it had no rate at all.
                speed_estimate_period=RATE_WINDOW, get_time=lambda: time.monotonic(),
            )
            self.progress.start()
        if event.task not in self.tasks:
            self.tasks[event.task] = self.progress.add_task(event.task, total=event.total, loss="", rate="", phase="")
        task_id = self.tasks[event.task]
        if event.completed < self.progress.tasks[task_id].completed:  # the task again (ui's next job): times afresh
            self.progress.reset(task_id, total=event.total)
        loss = self._loss(event)
        self.progress.update(task_id, completed=event.completed, total=event.total,
                             loss=f"loss {loss:.4f}" if loss is not None else "", phase=event.info.get("phase", ""))
        speed = self.progress.tasks[task_id].speed if task_id < len(self.progress.tasks) else None
        if speed:
            self.progress.update(task_id, rate=f"{speed:.2f} it/s" if speed >= 1 else f"{1 / speed:.1f} s/it")

    def _line(self, event: Progress) -> None:
        now = time.monotonic()
        if event.task in self.plain and event.completed < self.plain[event.task][3]:
            del self.plain[event.task]  # the task again (ui's next job): its rate afresh
        # The rate counts from the first event seen: a resumed run starts at step 201.
        started, last, base, _ = self.plain.setdefault(event.task, (now, 0.0, event.completed, event.completed))
        self.plain[event.task] = (started, last, base, event.completed)
        finished = event.completed >= event.total
        if event.completed and not finished and now - last < self.PLAIN_EVERY:
            return
        if "phase" in event.info and event.task in self.plain and not finished and now - last < self.PLAIN_EVERY:
            return  # the batch's phases change often: a line per PLAIN_EVERY, as for counts
        self.plain[event.task] = (started, now, base, event.completed)
        text = f"{event.task}: {event.completed}/{event.total}"
        loss = self._loss(event)
        if loss is not None:
            text += f" loss {loss:.4f}"
        if event.completed > base and now > started:
            rate = (event.completed - base) / (now - started)
            text += f" {rate:.2f} it/s" if rate >= 1 else f" {1 / rate:.1f} s/it"
            if not finished:
                text += f" eta {format_duration((event.total - event.completed) / rate, clock=True)}"
        if event.info.get("phase"):
            text += f" ({event.info['phase']})"
        self.console.print(text, markup=False)

    def _loss(self, event: Progress) -> float | None:
        """The task's last loss: on a GPU only every second step or so carries one, and a
        blank in between made the line flicker."""
        return self.losses.get(event.task)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

