"""One `batch` job from start to finish, wherever it runs (a local worker or a Ray
task): masks from words, `learn` (resumed from its checkpoint when an earlier try was
cut short), `generate`; each step's results recorded in OUT/NAME/job.json with the
job's key, so a rerun skips what is done for the same inputs and settings.

One runner per job across processes and machines: a lock file (train/locks: O_EXCL
with a heartbeat, safe on NFS) named after the scene, in the shared cache. The images
and made masks are written as whole folders (OUT/NAME/images, OUT/NAME/masks), placed
atomically: a folder is there complete, or not at all."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointMismatch, InvalidInput, Interrupted, fixable_error
from ..events import Message, Progress, Reporter, silent
from ..paths import checkpoint_path, home, is_regular_file, scene_path, write_atomically
from .jobs import Job

RECORD = "job.json"
MAX_LOCK_RACES = 20  # times a job waits again for a learn lock another run took first
STOP_WAIT = 300  # seconds an interrupted job gets to finish its step and save its checkpoint
# An interrupted job's result, however it was stopped (learn's own line says --resume: batch has none).
INTERRUPTED = "interrupted: rerun the batch to resume it (what a learn had done is kept in its checkpoint)"
# Left in each folder a batch writes (masks/, images/): only such a folder, or one the
# job's record lists, is ever replaced; a folder of the user's at that place is not.
MADE_BY_BATCH = ".scenebreak-batch"
MAX_RECORD_BYTES = 1 << 22


@dataclass
class JobResult:
    job: int
    name: str
    # done | failed | skipped | interrupted (stopped by Ctrl-C or SIGTERM: a rerun resumes it)
    # | busy (another run holds it: the runner asks again later)
    status: str
    scene: str | None = None
    images: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    resumed: bool = False
    note: str = ""  # why skipped

    def to_dict(self) -> dict:
        data = {"job": self.job, "name": self.name, "status": self.status, "scene": self.scene, "images": self.images,
                "paths": [*([self.scene] if self.scene and self.status in ("done", "skipped") else []), *self.images]}
        if self.error is not None:
            data["error"] = self.error
        data["seconds"] = round(self.seconds, 2)
        if self.resumed:
            data["resumed"] = True
        if self.note:
            data["note"] = self.note
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "JobResult":
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def one_line(exc: BaseException) -> str:
    """A failure as the command line would say it (a full disk: naming the fix)."""
    error = fixable_error(exc)
    if error is not None:
        return str(error)
    text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0] if text else type(exc).__name__


def claim_path(name: str) -> Path:
    return home() / "locks" / "batch" / f"{name}.lock"


def job_folder(job: Job, out: Path) -> Path:
    return Path(out) / job.name


def scene_out(job: Job, scenes: Path | None) -> Path:
    return Path(scenes) / f"{job.name}.scene" if scenes else scene_path(job.name)


def read_record(folder: Path) -> dict:
    path = folder / RECORD
    try:
        if is_regular_file(path) and path.stat().st_size <= MAX_RECORD_BYTES:
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        pass
    return {}


def is_done(record: dict, key: str, scene: Path) -> bool:
    """Done for this key: recorded so, the scene where it goes now (`--scenes` may have
    changed) and every image still there."""
    return (record.get("key") == key and record.get("state") == "done" and record.get("scene") == str(scene)
            and scene.is_file() and all(Path(p).is_file() for p in record.get("images", [])))


def run_job(job: Job, out: str | Path, scenes: str | Path | None = None, *, device=None, wait: bool = False,
            report: Reporter = silent, should_stop=None) -> JobResult:
    """Run `job` (or skip it when its results are there); never raises for the job's own
    failure: that is a "failed" result with its one-line error (an "interrupted" one
    when it was stopped). `wait=False`: when
    another process runs the same job, return "busy" at once; `wait=True`: wait for it
    (saying so), then skip what it did. `should_stop()` turning true stops it as Ctrl-C
    would (learn saves its checkpoint; the result says to rerun)."""
    from ..train.locks import Busy, locked

    started = time.perf_counter()
    out = Path(out)
    try:
        key, scene = job.key(), scene_out(job, scenes)
        if is_done(read_record(job_folder(job, out)), key, scene):  # no lock needed to see that
            return _skipped(job, read_record(job_folder(job, out)), "already done with the same inputs and settings")
        waiting = lambda holder: report(Message(f"job {job.number} ({job.name}) is being run by {holder}: "  # noqa: E731
                                                "waiting for it"))
        with locked(claim_path(job.name), wait=wait, on_wait=waiting, busy_message="{holder}", should_stop=should_stop):
            record = read_record(job_folder(job, out))
            if is_done(record, key, scene):
                return _skipped(job, record, "done by another run meanwhile")
            result = _run(job, out, scenes, key, record, device, report, should_stop)
    except Busy as exc:
        return JobResult(job.number, job.name, "busy", note=f"being run by {exc}")
    except Interrupted:
        return JobResult(job.number, job.name, "interrupted", error=INTERRUPTED, seconds=time.perf_counter() - started)
    except Exception as exc:  # the job's failure is its result; the batch goes on
        return JobResult(job.number, job.name, "failed", _learned_scene(job, out), error=one_line(exc),
                         seconds=time.perf_counter() - started)
    result.seconds = time.perf_counter() - started
    return result


def _learned_scene(job: Job, out: Path) -> str | None:
    """The scene a failed job had learned before it failed (say, making its images):
    kept, and a rerun takes it up, so its result names it."""
    record = read_record(job_folder(job, out))  # ({} where it cannot be read)
    scene = record.get("scene")
    learned = record.get("state") in ("learned", "done") and isinstance(scene, str) and is_regular_file(Path(scene))
    return scene if learned else None


def _stop_if_asked(should_stop) -> None:
    """Raise Interrupted between a job's parts once `should_stop()` is true."""
    if should_stop is not None and should_stop():
        raise Interrupted("stopped")


def _skipped(job: Job, record: dict, why: str) -> JobResult:
    return JobResult(job.number, job.name, "skipped", record.get("scene"), list(record.get("images", [])), note=why)


def _run(job: Job, out: Path, scenes, key: str, record: dict, device, report: Reporter, should_stop) -> JobResult:
    from ..sample.generate import generate
    from ..scenes.bundle import is_scene
    from ..train.learn import learn
    from ..train.locks import Busy, scene_lock

    folder = job_folder(job, out)
    scene = scene_out(job, scenes)
    scene_key = job.scene_key()
    # The same scene: its photo, masks, base and learn settings unchanged (a record from
    # before scene keys: the whole line unchanged). Only the images are then made again.
    same = record.get("scene_key", record.get("key")) == (scene_key if "scene_key" in record else key)
    state = dict(record) if same else {}
    state.update(key=key, scene_key=scene_key, job=job.raw, line=job.line)
    ours = record.get("scene") == str(scene)  # a scene at that path that an earlier batch run wrote
    if scene.exists() and not ours:
        raise InvalidInput(f"scene {scene} already exists and was not made by this batch: remove it (scenebreak rm "
                           f"{job.name}), or give the job another \"name\"")
    # The folders it will replace, checked before any work: a user's own there is left alone.
    for part, needed in (("masks", job.objects), ("images", job.prompts)):
        if needed:
            check_folder_is_ours(folder / part, record.get(part))

    masks = list(job.masks)
    if job.objects:
        _stop_if_asked(should_stop)
        masks = state.get("masks") if same and state.get("masks") and all(Path(m).is_file() for m in state["masks"]) else None
        if masks is None:
            report(Message(f"job {job.number} ({job.name}): masks of {', '.join(job.objects)}"))
            masks = _make_masks(job, folder / "masks", device, report, record.get("masks"))
            state["masks"] = masks
            _write_record(folder, state)

    resumed = False
    _stop_if_asked(should_stop)  # (the masks took a while; learn itself stops at its steps)
    learned = same and state.get("state") in ("learned", "done")
    earlier = Path(str(record.get("scene") or ""))
    if learned and not scene.exists() and record.get("scene") and is_scene(earlier):  # (the record's: only a scene)
        # The batch's scenes go elsewhere now (another --scenes): this one is copied there,
        # not learned again (and not moved: the earlier place is left as it is).
        report(Message(f"job {job.number} ({job.name}): copying its scene from {earlier} to {scene}"))
        write_atomically(scene, lambda tmp: shutil.copyfile(earlier, tmp))
        state["scene"] = str(scene)
        _write_record(folder, state)
    relearned = not (learned and scene.is_file())
    if relearned:
        state["state"] = "learning"
        state["scene"] = str(scene)
        _write_record(folder, state)
        args = dict(name=job.name, output=scene if scenes else None, base_model=job.base_model, revision=job.revision,
                    device=device, report=report, replace=scene.exists(), should_stop=should_stop)
        for _ in range(MAX_LOCK_RACES):
            # A learn of this name on a machine that died holds its lock until that turns stale: wait for it.
            with scene_lock(job.name, wait=True, should_stop=should_stop, on_wait=lambda holder: report(Message(
                    f"job {job.number} ({job.name}): waiting for the lock of {holder} on scene {job.name!r}"))):
                pass
            resumed = checkpoint_path(job.name).exists()
            try:
                learn(job.photo, masks, job.learn, resume=resumed, **args)
            except Busy:
                continue  # another run took the lock between the wait and learn's own: wait again
            except CheckpointMismatch as exc:
                if not resumed:
                    raise
                # Its checkpoint is from other inputs or settings (the JOBS line changed): start over.
                report(Message(f"job {job.number} ({job.name}): not resumed ({exc}); starting over", "warning"))
                resumed = False
                learn(job.photo, masks, job.learn, resume=False, **{**args, "replace": True})  # (the scene is ours: checked)
            break
        else:
            raise Busy(f"scene {job.name!r}: its lock kept being taken by other runs")
        state["state"] = "learned"
        state.pop("images", None)
        _write_record(folder, state)

    images: list[str] = []
    kept_images = record.get("images") or []
    if not relearned and record.get("key") == key and record.get("state") == "done" and \
            all(Path(p).is_file() for p in kept_images):
        images = list(kept_images)  # only the scene's place changed: the same images
    elif job.prompts:
        images = _generate(job, scene, folder / "images", device, report, generate, record.get("images"), should_stop)
    state.update(state="done", images=images)
    _write_record(folder, state)
    return JobResult(job.number, job.name, "done", str(scene), images, resumed=resumed)


def _make_masks(job: Job, target: Path, device, report: Reporter, recorded) -> list[str]:
    """The job's words made into masks by `mask`, written as one folder."""
    from ..masks.masking import make_masks

    config = dataclasses.replace(job.mask, device=getattr(device, "name", device))
    return _write_folder(target, recorded, lambda tmp: [p.name for p in make_masks(
        job.photo, prompts=job.objects, config=config, out_dir=tmp, report=report).paths])


def _generate(job: Job, scene: Path, target: Path, device, report: Reporter, generate, recorded,
              should_stop=None) -> list[str]:
    """The job's prompts sampled, written as one folder."""
    config = job.generate
    if config.seed is None:  # a batch is repeatable, as its learning is (a random seed made other images per rerun)
        config = dataclasses.replace(config, seed=name_seed(job.name))
    return _write_folder(target, recorded, lambda tmp: [Path(image.path).name for image in generate(
        str(scene), list(job.prompts), config, out_dir=tmp, device=device, report=report,
        should_stop=should_stop).images])


def name_seed(name: str) -> int:
    """The seed of a job's images where its line sets none: from its name, so that a
    rerun, another machine or another shard makes the same images."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big") % 2**31


def _write_folder(target: Path, recorded, fill) -> list[str]:
    """The folder `target` made whole by `fill(tmp)` (which returns the names of the
    files it made) and put in place of an earlier one, which must be a batch's own:
    `write_atomically` replaces a whole folder, and a user's folder there (say
    OUT/cat/masks of hand-drawn masks) is refused instead, exit 2."""
    check_folder_is_ours(target, recorded)
    made: list[str] = []

    def write(tmp: Path) -> None:
        tmp.mkdir()
        made.extend(fill(tmp))
        (tmp / MADE_BY_BATCH).write_text("made by scenebreak batch: replaced when the job runs again\n",
                                         encoding="utf-8")

    write_atomically(target, write)
    return [str(target / name) for name in made]


def check_folder_is_ours(target: Path, recorded) -> None:
    """`target` is not there, or a batch made it (its mark, or the record lists files in it)."""
    listed = isinstance(recorded, list) and any(Path(str(p)).parent == target for p in recorded)
    if target.is_symlink() or (target.exists() and not ((target / MADE_BY_BATCH).is_file() or listed)):
        raise InvalidInput(f"{target} exists and was not made by scenebreak batch: move it away, or give the job "
                           "another \"name\" (or the batch another --out)")


def _write_record(folder: Path, state: dict) -> None:
    record = json.dumps(state, indent=2, default=str)
    write_atomically(folder / RECORD, lambda tmp: tmp.write_text(record, encoding="utf-8"))


PROGRESS_EVERY = 0.5  # seconds between a job's progress events sent to the batch


def forwarded(message: Message) -> bool:
    """A worker's note the batch shows: warnings, the batch's own notes about the job,
    and what a job may wait long for (another run's class images, a download); the rest
    (memory plans, seeds) would flood the bar."""
    return message.level == "warning" or message.text.startswith(("job ", "waiting for", "downloading"))


def job_reporter(job_now, send):
    """A job's reporter that passes on, through `send`, what the batch shows of it:
    ("message", text, level) for its forwarded notes (named by its job, `job_now()`),
    ("progress", task, completed, total) at most every PROGRESS_EVERY seconds."""
    last = [0.0]

    def report(event) -> None:
        if isinstance(event, Message) and forwarded(event):
            job = job_now()
            text = event.text if event.text.startswith("job ") else f"job {job.number} ({job.name}): {event.text}"
            send(("message", text, event.level))
        elif isinstance(event, Progress):
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY or event.completed == event.total:
                last[0] = now
                send(("progress", event.task, event.completed, event.total))

    return report
