"""`run_batch()`: every job of a JOBS file, on this machine (one worker process per
device, each running one job at a time) or on a Ray cluster (ray_runner), with one
result per job as it finishes and a summary at the end.

A worker process that dies (killed, out of host memory) takes only its job with it:
the job is given to a fresh worker up to `retries` more times, and resumes from its
checkpoint there; the other workers go on. A job another run holds is put off until
the rest are done, then waited for (and skipped if that run finished it)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInput, sigterm_stops
from ..events import Message, Progress, Reporter, silent
from ..paths import is_writable_folder
from .jobs import Job, check_prompts_fit, parse_shard, read_jobs, shard_of
from .work import (INTERRUPTED, STOP_WAIT, JobResult, is_done, job_folder, job_reporter, read_record, run_job,
                   scene_out)



@dataclass
class BatchResult:
    results: list[JobResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> int:
        return self.count("failed")

    def summary(self) -> str:
        from ..estimates import format_duration

        stopped = f", {self.count('interrupted')} interrupted" if self.count("interrupted") else ""
        return (f"{len(self.results)} job(s): {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.failed} failed{stopped} in {format_duration(self.seconds)}")

    def to_dict(self) -> dict:
        return {"jobs": [r.to_dict() for r in self.results], "done": self.count("done"), "skipped": self.count("skipped"),
                "failed": self.failed, "interrupted": self.count("interrupted"), "seconds": round(self.seconds, 2)}


def run_batch(jobs_file: str | os.PathLike, *, devices: str | list[str] | None = None, ray: str | None = None,
              gpus_per_job: float | None = None, shard: str | tuple[int, int] | None = None,
              out: str | os.PathLike = "batch-out", scenes: str | os.PathLike | None = None, retries: int = 1,
              report: Reporter = silent, on_result=None) -> BatchResult:
    """Run the jobs of `jobs_file` ("-": stdin). Everything is checked before the first
    job starts. `on_result(JobResult)` is called in this process as each job ends."""
    from ..arguments import function_argument, path_argument

    started = time.perf_counter()
    jobs_file, out = path_argument(jobs_file, "jobs_file"), path_argument(out, "out")
    scenes = path_argument(scenes, "scenes") if scenes is not None else None
    report = function_argument(report, "report") or silent
    on_result = function_argument(on_result, "on_result")
    if isinstance(shard, (tuple, list)):  # (I, N) from Python: checked as "I/N" is
        shard = "/".join(map(str, shard)) if len(shard) == 2 else str(shard)
    shard = parse_shard(shard)
    if retries < 0 or retries > 100:
        raise InvalidInput(f"--retries must be from 0 to 100, not {retries}")
    if gpus_per_job is not None and not (0 <= gpus_per_job <= 1024):
        raise InvalidInput(f"--gpus-per-job must be from 0 (train on CPUs) to 1024, not {gpus_per_job:g}")
    if gpus_per_job is not None and gpus_per_job > 1 and gpus_per_job != int(gpus_per_job):
        raise InvalidInput(f"--gpus-per-job {gpus_per_job:g}: Ray shares a GPU (a fraction up to 1) or gives "
                           "whole ones (2, 3, ...), not a fraction above 1")
    if gpus_per_job is not None and ray is None:
        raise InvalidInput("--gpus-per-job applies to --ray; on this machine use --devices")
    if ray is not None and devices is not None:
        raise InvalidInput("--devices applies to this machine; with --ray the cluster places the jobs")
    out, scenes = Path(out).absolute(), Path(scenes).absolute() if scenes else None
    for folder, what in ((out, "--out"), (scenes, "--scenes")):
        if folder is not None and not is_writable_folder(folder):
            raise InvalidInput(f"{what} {folder} is not a folder you can write to: choose another")
    jobs = shard_of(read_jobs(jobs_file), shard)
    check_prompts_fit(jobs, jobs_file)
    worker_devices = None if ray is not None else resolve_devices(devices)
    where = f"Ray ({ray})" if ray is not None else ", ".join(worker_devices)
    report(Message(f"batch: {len(jobs)} job(s){f' (shard {shard[0]}/{shard[1]})' if shard else ''} on {where}"))
    board = Board(len(jobs), report, on_result)
    jobs = [job for job in jobs if not _skipped_here(job, out, scenes, board)]
    board.start()  # (the bar's rate and ETA count from here: the skipped jobs took no time)
    if jobs:
        # SIGTERM (a supervisor, `kill`, `docker stop`) stops the batch through the runners'
        # clean-up, as Ctrl-C does: it died at once, its workers training on unwatched.
        with sigterm_stops("the running jobs saved their checkpoints; rerun the batch to "
                           "resume them"):
            if ray is not None:
                from .ray_runner import run_on_ray

                run_on_ray(jobs, ray, gpus_per_job, retries, out, scenes, board)
            else:
                run_locally(jobs, worker_devices, retries, out, scenes, board)
    result = BatchResult(sorted(board.results, key=lambda r: r.job), time.perf_counter() - started)
    report(Message(f"batch: {result.summary()}"))
    return result


def _skipped_here(job: Job, out: Path, scenes: Path | None, board: "Board") -> bool:
    """A job already done is skipped without a worker (the worker checks again under its lock)."""
    record = read_record(job_folder(job, out))
    try:
        done = bool(record) and is_done(record, job.key(), scene_out(job, scenes))
    except OSError:  # a photo or mask unreadable now: the job's own failure, said by its worker
        return False
    if done:
        board.finished(JobResult(job.number, job.name, "skipped", record.get("scene"), list(record.get("images", [])),
                                 note="already done with the same inputs and settings"))
        return True
    return False


class Board:
    """What the batch reports: each result as it comes, and one bar over the jobs whose
    text says what each running job is doing. The bar starts (start()) once the jobs
    already done are skipped: counted from 0, a rerun with 90 of 100 jobs done showed
    an ETA of minutes for hours of work left."""

    def __init__(self, total: int, report: Reporter, on_result=None):
        self.total, self.report, self.on_result = total, report, on_result
        self.results: list[JobResult] = []
        self.phases: dict[int, str] = {}  # worker -> its job's phase
        self.started = False

    def start(self) -> None:
        self.started = True
        self.show()

    def finished(self, result: JobResult) -> None:
        self.results.append(result)
        line = f"job {result.job} ({result.name}): {result.status}"
        line += f": {result.error}" if result.error else f" ({result.note})" if result.note else ""
        self.report(Message(line, "warning" if result.status in ("failed", "interrupted") else "info"))
        self.show()
        if self.on_result:
            self.on_result(result)

    def phase(self, worker: int, text: str | None) -> None:
        if text is None:
            self.phases.pop(worker, None)
        else:
            self.phases[worker] = text
        self.show()

    def show(self) -> None:
        if not self.started:
            return
        phase = "; ".join(self.phases[i] for i in sorted(self.phases))
        self.report(Progress("batch", len(self.results), self.total, {"phase": phase}))


def resolve_devices(devices: str | list[str] | None) -> list[str]:
    """One worker per entry: `cuda:0,cuda:1`, `auto` (one worker on SCENEBREAK_DEVICE
    where it is set, else every visible GPU, else one on MPS or the CPU), or a device repeated for several workers
    on it (`cpu,cpu`). Checked here, without opening a GPU in this process."""
    import torch

    from ..device import DEVICES

    names = [d.strip().lower() for d in (devices.split(",") if isinstance(devices, str) else devices or ["auto"])]
    if any(not d for d in names):
        raise InvalidInput(f"--devices {devices!r}: an entry is empty; give e.g. cuda:0,cuda:1 or auto")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if names == ["auto"]:
        chosen = os.environ.get("SCENEBREAK_DEVICE", "auto").lower()
        if chosen not in ("", "auto"):
            names = [chosen]
        else:
            mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
            return [f"cuda:{i}" for i in range(gpus)] or (["mps"] if mps else ["cpu"])
    for name in names:
        kind, _, index = name.partition(":")
        if kind not in DEVICES or kind == "auto" or (index and kind != "cuda"):
            raise InvalidInput(f"--devices: unknown device {name!r}: use cuda:N, cuda, mps or cpu (or auto alone)")
        if kind == "cuda" and ((index and not index.isdigit()) or int(index or 0) >= gpus):
            raise InvalidInput(f"--devices: no CUDA device {name!r} ({gpus} present)")
    return names


def run_locally(jobs: list[Job], devices: list[str], retries: int, out: Path, scenes: Path | None, board: Board) -> None:
    """The jobs on worker processes, one per device, each result passed to the board."""
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold CUDA or threads
    outbox = context.Queue()
    threads = max(1, (os.cpu_count() or 1) // max(1, devices.count("cpu")))
    workers = [_Worker(context, i, device, outbox, out, scenes, threads) for i, device in enumerate(devices)]
    todo = [(job, 0, False) for job in jobs]  # (job, tries so far, wait for another run's)
    report = board.report
    try:
        while todo or any(w.job for w in workers):
            for worker in workers:
                if worker.job is None and todo:
                    # Jobs another run holds are put off; waited for only once nothing else is left.
                    ready = next((t for t in todo if not t[2]), None) or todo[0]
                    todo.remove(ready)
                    worker.give(*ready)
            try:
                kind, index, payload = outbox.get(timeout=0.5)
            except queue.Empty:
                kind = None
            if kind == "result" and (workers[index].job is None or payload.get("job") != workers[index].job.number):
                # From a worker process that died just after sending it, whose job was given
                # out again (the rerun skips or finishes it): not this worker's job now.
                continue
            if kind == "result":
                worker = workers[index]
                result = JobResult.from_dict(payload)
                job, tries = worker.job, worker.tries
                worker.job = None
                board.phase(index, None)
                if result.status == "busy":
                    report(Message(f"job {job.number} ({job.name}) is {result.note}: coming back to it at the end"))
                    todo.append((job, tries, True))
                else:
                    board.finished(result)
            elif kind == "event" and payload[0] == "message":
                report(Message(payload[1], payload[2]))
            elif kind == "event" and workers[index].job is not None:
                job = workers[index].job
                board.phase(index, f"job {job.number} {job.name}: {payload[1]} {payload[2]}/{payload[3]}")
            for worker in workers:
                if worker.job is not None and not worker.alive():
                    job, tries, code = worker.job, worker.tries, worker.exitcode()
                    board.phase(worker.index, None)
                    worker.restart()
                    why = f"its worker process died (exit code {code})"
                    if tries < retries:
                        report(Message(f"job {job.number} ({job.name}): {why}; trying again (it resumes from its checkpoint)",
                                       "warning"))
                        todo.insert(0, (job, tries + 1, True))
                    else:
                        board.finished(JobResult(job.number, job.name, "failed",
                                           error=f"{why} on each of {tries + 1} tries; rerun the batch to resume it"))
    except BaseException as exc:
        # Each busy worker is told through its event, as Ctrl-C would (learn saves its checkpoint
        # at its next step): SIGTERM to the batch alone, a closed stdout or a failure here reach
        # no worker, nor does SIGINT sent to the batch alone (`kill -INT`, a notebook's interrupt);
        # a Ctrl-C at the terminal reached them too (one process group), and an event, unlike a
        # second SIGINT, aborts no save.
        busy = [worker for worker in workers if worker.job is not None]
        if busy and not isinstance(exc, KeyboardInterrupt):
            report(Message(f"stopping: waiting for {len(busy)} worker(s) to save their checkpoints"))
        for worker in busy:
            worker.interrupt()
        raise
    finally:
        _stop_all(workers, outbox, board)


def _stop_all(workers: list["_Worker"], outbox, board: "Board") -> None:
    """End every worker once its job is over, reading what they still send meanwhile: a
    job's result (an interrupted one's says how to resume it) and its notes; a worker
    cannot even exit while its messages wait unread in the queue."""
    for worker in workers:
        worker.ask_to_end()
    deadline = time.monotonic() + (STOP_WAIT if any(w.job is not None for w in workers) else 30)
    while any(worker.alive() for worker in workers) and time.monotonic() < deadline:
        try:
            kind, index, payload = outbox.get(timeout=0.5)
        except queue.Empty:
            continue
        with contextlib.suppress(Exception):  # (stdout may be what failed: the rest still ends)
            if kind == "result" and workers[index].job is not None:
                workers[index].job = None
                board.finished(JobResult.from_dict(payload))
            elif kind == "event" and payload[0] == "message":
                board.report(Message(payload[1], payload[2]))
    for worker in workers:
        worker.end()


class _Worker:
    """One worker process on one device, fed one job at a time."""

    def __init__(self, context, index: int, device: str, outbox, out: Path, scenes: Path | None, threads: int):
        self.context, self.index, self.device, self.outbox = context, index, device, outbox
        self.out, self.scenes, self.threads = out, scenes, threads
        self.job: Job | None = None
        self.tries = 0
        self.start()

    def start(self) -> None:
        self.inbox = self.context.Queue()
        self.stop = self.context.Event()
        self.process = self.context.Process(target=worker_main, daemon=True, name=f"scenebreak batch worker {self.index}",
                                            args=(self.index, self.device, self.inbox, self.outbox, str(self.out),
                                                  str(self.scenes) if self.scenes else None, self.threads, self.stop))
        self.process.start()

    def give(self, job: Job, tries: int, wait: bool) -> None:
        self.job, self.tries = job, tries
        self.inbox.put((job, wait))

    def alive(self) -> bool:
        return self.process.is_alive()

    def exitcode(self):
        return self.process.exitcode

    def restart(self) -> None:
        self.job = None
        self.process.join(1)
        self.start()

    def interrupt(self) -> None:
        """Ask the job to stop as Ctrl-C would: learn saves its checkpoint at its next step.
        (An event the job polls, not SIGINT: on Windows os.kill terminates the process.)"""
        self.stop.set()

    def ask_to_end(self) -> None:
        """End the process once its job is over. On Ctrl-C the workers got it too (one
        process group): a `learn` saves its checkpoint at the next step and stops, so
        no signal is added anywhere, which would count as a second Ctrl-C and abort that."""
        if self.process.is_alive():
            self.inbox.put(None)

    def end(self) -> None:
        """A worker still there after its time to end is terminated (then killed)."""
        self.process.join(1)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def parent_gone(parent: int) -> bool:
    """Whether the batch process that started this worker has died (killed: it could not
    end its workers). Through multiprocessing's handle on it where there is one: on
    Windows a dead parent's id stays this process's parent id."""
    import multiprocessing

    process = multiprocessing.parent_process()
    if process is not None:
        return not process.is_alive()
    return os.getppid() != parent


def results_stream_for_the_batch_alone() -> None:
    """What this process (a worker) writes to stdout goes to stderr: stdout is the
    batch's JSON Lines of results, which a library's print in a worker (inherited fd 1)
    would break for the script reading them."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stdout.flush()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def worker_main(index: int, device: str, inbox, outbox, out: str, scenes: str | None, threads: int, stop) -> None:
    """A worker process: run each job it is given on `device`, sending its progress
    and result back; None ends it. `stop` (an event) set: the job stops as on Ctrl-C."""
    results_stream_for_the_batch_alone()
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)  # the CPU's cores shared among its workers
    current = [None]
    report = job_reporter(lambda: current[0], lambda event: outbox.put(("event", index, event)))

    try:
        parent = os.getppid()
        while True:
            try:
                item = inbox.get(timeout=1.0)
            except queue.Empty:
                if parent_gone(parent):
                    outbox.cancel_join_thread()  # nobody reads it any more: exit without waiting to flush
                    return  # the batch process is gone (killed): nothing will come
                continue
            if item is None:
                return
            job, wait = item
            current[0] = job
            try:
                # A batch killed outright (SIGKILL) ends no worker: one in a job stops as told
                # (saving its checkpoint), not hours later with the GPU and the job's lock held.
                result = run_job(job, out, scenes, device=device, wait=wait, report=report,
                                 should_stop=lambda: stop.is_set() or parent_gone(parent))
            except KeyboardInterrupt:
                result = JobResult(job.number, job.name, "interrupted", error=INTERRUPTED)
            outbox.put(("result", index, result.to_dict()))
    except KeyboardInterrupt:  # Ctrl-C reaches the workers too; the batch itself says so
        return
