"""`batch --ray`: each job a Ray task on an existing cluster (`ray start`), asking for
`--gpus-per-job` GPUs (default: 1 where the cluster has GPUs, else none). Ray places
the tasks and retries one whose worker or node died (`max_retries`); the retried task
resumes its `learn` from the checkpoint. Coordination between tasks and with other
runs is the shared cache's lock files (train/locks), not Ray's: the same rules hold
for Slurm shards and local runs. The workers need scenebreak installed and the same
paths (photos, --out, SCENEBREAK_HOME) on a shared file system.

Ray is an optional extra: `pipx inject --include-apps scenebreak ray` (in a venv: `pip install 'scenebreak[ray]'`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

from ..errors import SceneBreakError, deferred_signals
from ..events import Message, silent
from .jobs import Job
from .work import INTERRUPTED, STOP_WAIT, JobResult, job_reporter, run_job

INSTALL = "pipx inject --include-apps scenebreak ray (or in a venv: pip install 'scenebreak[ray]')"
# Passed to the tasks: where the cache is, and the hub settings (offline, tokens' home).
ENV_PREFIXES = ("SCENEBREAK_", "HF_", "HUGGINGFACE_")


def job_task(job: Job, out: str, scenes: str | None, events=None) -> dict:
    """A Ray task: one job on whatever device Ray gave it, its notes and progress put in
    `events` (a ray.util.queue.Queue the batch reads; what does not fit is dropped).
    Another run holding the job is waited for (the task keeps its place on the cluster)."""
    def send(event) -> None:
        with contextlib.suppress(Exception):  # (full, or the batch gone: the job goes on regardless)
            events.put_nowait((job.number, event))

    report = job_reporter(lambda: job, send) if events is not None else silent
    device = os.environ.get("SCENEBREAK_DEVICE") or None
    return run_job(job, out, scenes, device=device, wait=True, report=report).to_dict()


def import_ray():
    try:
        import ray
    except ImportError:
        raise SceneBreakError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
    return ray


def run_on_ray(jobs: list[Job], address: str, gpus_per_job: float | None, retries: int, out: Path, scenes: Path | None,
               board) -> None:
    """The jobs as Ray tasks on the cluster at `address` ("auto": RAY_ADDRESS, or the
    cluster started on this machine); each result passed to the board as it comes
    (`board.on_result` must write to a stream it holds: sys.stdout is Ray's stderr here)."""
    ray = import_ray()
    # Ray's own notes (a worker died, ...) are printed on stdout, which carries only results.
    with contextlib.redirect_stdout(sys.stderr):
        _run(ray, jobs, address, gpus_per_job, retries, out, scenes, board)


def _run(ray, jobs, address, gpus_per_job, retries, out, scenes, board) -> None:
    started_here = not ray.is_initialized()
    with _ray_logging_kept(started_here):
        _run_on(ray, jobs, address, gpus_per_job, retries, out, scenes, board, started_here)


@contextlib.contextmanager
def _ray_logging_kept(started_here: bool):
    """ray.init(configure_logging=True) sets up the "ray" logger of the calling process
    (its level, a handler); a Python caller's own use of Ray after the batch gets it back
    as it was."""
    logger = logging.getLogger("ray")
    kept = logger.level, list(logger.handlers), logger.propagate
    try:
        yield
    finally:
        if started_here:
            logger.setLevel(kept[0])
            logger.handlers[:] = kept[1]
            logger.propagate = kept[2]


def _run_on(ray, jobs, address, gpus_per_job, retries, out, scenes, board, started_here: bool) -> None:
    if started_here:
        _check_reachable(address)
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=True)
        except ConnectionError as exc:
            raise SceneBreakError(f"no Ray cluster at {address!r} ({str(exc).splitlines()[0]}): start one with "
                                  "`ray start --head` (see docs/usage.md), or give its address") from None
    try:
        gpus, cpus = _task_resources(ray, gpus_per_job)
        board.report(Message(f"Ray cluster: {_resources(ray)}; " + (f"{gpus:g} GPU(s) per job" if gpus else
                                                                     f"no GPU: {cpus:g} CPU(s) per job")))
        env = task_environment(os.environ)
        if gpus:
            env.pop("SCENEBREAK_DEVICE", None)  # a GPU task uses the GPU Ray gives it
        task = ray.remote(job_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries, name="scenebreak-job",
                                            runtime_env={"env_vars": env})
        from ray.util.queue import Queue

        # The tasks' notes and progress, as a local worker sends them (a small actor on the cluster).
        events = Queue(maxsize=EVENTS_HELD, actor_options={"num_cpus": 0})
        pending = {task.remote(job, str(out), str(scenes) if scenes else None, events): job for job in jobs}
        board.phase(0, f"{len(jobs)} task(s) on the cluster")
        try:
            # Ctrl-C and SIGTERM act between waits (Python drops a KeyboardInterrupt raised
            # inside a finalizer, which Ray's calls can run: the tasks would train on).
            with deferred_signals() as deliver_signals:
                while pending:
                    deliver_signals()
                    _show_events(events, board)
                    for ref in ray.wait(list(pending), num_returns=1, timeout=1.0)[0]:
                        board_result(board, pending.pop(ref), ref, ray, events, retries)
        except BaseException:
            _stop_tasks(ray, pending, board)
            raise
    finally:
        if started_here:
            ray.shutdown()


def board_result(board, job: Job, ref, ray, events, retries: int) -> None:
    """The result of the task of `job` that ended, on the board, after its last notes."""
    try:
        result = JobResult.from_dict(ray.get(ref))
    except Exception as exc:  # the task's worker died on every try, or Ray failed it
        text = str(exc).strip().splitlines()
        result = JobResult(job.number, job.name, "failed", error=f"Ray task failed after {retries + 1} tries: "
                           f"{text[0] if text else type(exc).__name__}")
    _show_events(events, board)  # (its last notes before its end)
    board.phase(job.number, None)
    board.finished(result)


EVENTS_HELD = 10_000  # notes and progress waiting for the batch; more are dropped (the jobs go on)


def _show_events(events, board) -> None:
    """What the tasks sent since: notes as notes, progress as each running job's phase
    (the first line, "N task(s) on the cluster", gives way to them)."""
    try:
        items = events.get_nowait_batch(events.qsize())
    except Exception:  # (the queue's actor gone: nothing more to show)
        return
    for number, (kind, *rest) in items:
        if kind == "message":
            board.report(Message(rest[0], rest[1]))
        elif kind == "progress":
            board.phases.pop(0, None)
            board.phase(number, f"job {number}: {rest[0]} {rest[1]}/{rest[2]}")


def _stop_tasks(ray, pending: dict, board) -> None:
    """Ctrl-C or SIGTERM on the batch: the tasks run in Ray's own processes, which heard
    nothing, and shutting Ray down would kill them mid-step. Each is asked to stop as
    Ctrl-C would (Ray's non-forced cancel: learn saves its checkpoint at its next step),
    and waited for, a bounded time."""
    import time

    if not pending:
        return
    board.report(Message(f"stopping: asking {len(pending)} Ray task(s) to stop and save their checkpoints"))
    for ref in pending:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=False)
    deadline = time.monotonic() + STOP_WAIT
    while pending and time.monotonic() < deadline:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
        for ref in ready:
            job = pending.pop(ref)
            try:
                result = JobResult.from_dict(ray.get(ref))
            except Exception:  # (a cancelled task's result is Ray's TaskCancelledError)
                result = JobResult(job.number, job.name, "interrupted", error=INTERRUPTED)
            with contextlib.suppress(Exception):  # (stdout may be what failed)
                board.finished(result)


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """A HOST:PORT that nothing answers on is said at once: Ray itself retries it for minutes."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return  # auto, or a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as exc:
        raise SceneBreakError(f"no Ray cluster answers at {address} ({exc.strerror or exc}): start one with "
                              "`ray start --head` (see docs/usage.md), or check the address") from None


def _task_resources(ray, gpus_per_job: float | None) -> tuple[float, float]:
    """(GPUs, CPUs) each task asks for. A GPU job: its GPUs (default 1) and one CPU. A
    CPU job (--gpus-per-job 0) a whole node's CPUs, as many as the smallest node has:
    a CPU training uses every core, and one per core would load a model per core. A
    cluster without GPUs is no default for a GPU job: its GPU workers may not have
    joined yet, and every core would take a training of its own."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    most = max((node.get("GPU", 0) for node in nodes), default=0)
    if gpus_per_job is None and not most:
        raise SceneBreakError(f"the Ray cluster has no GPU now ({_resources(ray)}; are its GPU workers started?): "
                              "start them, or pass --gpus-per-job 0 to train on its CPUs (one job per node, slow)")
    gpus = 1 if gpus_per_job is None else gpus_per_job
    if gpus > most:
        raise SceneBreakError(f"--gpus-per-job {gpus:g}: the cluster's nodes have at most {most:g} GPU(s) each "
                              f"({_resources(ray)}): start workers with more, or ask for fewer")
    cpus = 1 if gpus else max(1, int(min((node.get("CPU", 1) for node in nodes), default=1)))
    return gpus, cpus


# The tasks run in Ray's own working folder: paths in the environment must not be relative.
_FOLDER_VARIABLES = ("SCENEBREAK_HOME", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")
_MODEL_VARIABLES = ("SCENEBREAK_BASE_MODEL", "SCENEBREAK_DETECTOR", "SCENEBREAK_SEGMENTER")  # a hub id or a folder


def task_environment(environ) -> dict[str, str]:
    """The run's SCENEBREAK_* and HF_* settings for the tasks, with relative paths made
    absolute (a model's only where it is a folder, not a hub id), and no token: a
    task's environment is part of its spec, which Ray's dashboard shows to whoever
    reaches it (a shared HF_HOME holds the token the hub needs)."""
    from .jobs import model_ref

    env = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIXES) and "TOKEN" not in k.upper()}
    for key in _FOLDER_VARIABLES:
        if env.get(key):
            env[key] = os.path.abspath(os.path.expanduser(env[key]))
    for key in _MODEL_VARIABLES:
        if env.get(key):
            env[key] = model_ref(Path.cwd(), env[key])
    return env


def _resources(ray) -> str:
    resources = ray.cluster_resources()
    return f"{len(ray.nodes())} node(s), {resources.get('CPU', 0):g} CPU(s), {resources.get('GPU', 0):g} GPU(s)"
