"""`scenebreak batch` on this machine: several worker processes over a JOBS file, one
job failing while the others finish, reruns that skip what is done and resume what a
kill cut short, exact shards, and a bad JOBS file refused before anything starts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from scenebreak.batch.jobs import read_jobs, shard_of
from scenebreak.batch.work import claim_path, run_job
from scenebreak.cli.commands import cli
from scenebreak.paths import checkpoint_path, home, scene_path
from scenebreak.train.locks import locked

from helpers import wait_for_checkpoint, write_synthetic_scene
from jobfiles import GENERATE, TINY, files, lines, three_jobs, write_jobs

def test_three_jobs_on_two_workers_one_failing_then_a_rerun_skips_everything(tmp_path, tiny_model):
    jobs = three_jobs(tmp_path, tiny_model)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--devices", "cpu,cpu", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 of 3 job(s) failed" in result.stderr and "Traceback" not in result.output
    got = lines(result.stdout)
    assert {n: r["status"] for n, r in got.items()} == {"a": "done", "b": "failed", "c": "done"}
    assert [got[n]["job"] for n in "abc"] == [1, 2, 3]
    assert "base model folder not found" in got["b"]["error"]
    for name, count in (("a", 1), ("c", 2)):
        assert got[name]["scene"] == str(scene_path(name)) and Path(got[name]["scene"]).is_file()
        assert len(got[name]["images"]) == count and all(Path(p).is_file() for p in got[name]["images"])
        assert all(Path(p).parent == out / name / "images" for p in got[name]["images"])
    assert "2 done, 0 skipped, 1 failed" in result.stderr

    assert got["c"]["paths"] == [got["c"]["scene"], *got["c"]["images"]] and got["b"]["paths"] == []

    before = files(out) | files(home() / "scenes")
    again = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(out), "--json"])  # (as every command takes it)
    assert again.exit_code == 1, again.output
    got = lines(again.stdout)
    assert {n: r["status"] for n, r in got.items()} == {"a": "skipped", "b": "failed", "c": "skipped"}
    assert got["c"]["images"] and all(Path(p).is_file() for p in got["c"]["images"])
    assert got["c"]["paths"] == [got["c"]["scene"], *got["c"]["images"]]
    assert {k: v for k, v in files(out).items() if "/b/" not in k} == {k: v for k, v in before.items() if k.startswith(str(out)) and "/b/" not in k}
    assert files(home() / "scenes") == {k: v for k, v in before.items() if k.startswith(str(home()))}

    # A changed sampling setting makes that job's images again, not its scene (hours of
    # learning for minutes of sampling); the others stay skipped.
    lines_now = jobs.read_text().splitlines()
    job = json.loads(lines_now[2])
    job["generate"] = {**GENERATE, "seed": 4}
    job["learn"] = {**job["learn"], "checkpoint-every": 7}  # (how often it checkpoints is no other scene either)
    jobs.write_text("\n".join([lines_now[0], json.dumps(job)]) + "\n")
    learned = Path(scene_path("c")).stat().st_mtime_ns
    third = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(out), "-q"])
    assert third.exit_code == 0, third.output
    got = lines(third.stdout)
    assert got["a"]["status"] == "skipped" and got["c"]["status"] == "done"
    assert [Path(p).name for p in got["c"]["images"]] == ["c-blue-on-a-table-4.png", "c-blue-in-the-snow-4.png"]
    assert sorted(p.name for p in (out / "c" / "images").iterdir() if not p.name.startswith(".")) == sorted(
        Path(p).name for p in got["c"]["images"])
    assert Path(scene_path("c")).stat().st_mtime_ns == learned
    # A changed learn setting is another scene: learned again, replacing its own.
    job["learn"] = {**job["learn"], "seed": 5}
    jobs.write_text("\n".join([lines_now[0], json.dumps(job)]) + "\n")
    fourth = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(out), "-q"])
    assert fourth.exit_code == 0 and lines(fourth.stdout)["c"]["status"] == "done", fourth.output
    assert Path(scene_path("c")).stat().st_mtime_ns != learned


def test_shards_split_the_jobs_exactly(tmp_path):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": f"j{i}"} for i in range(7)])
    every = read_jobs(jobs)
    assert [j.number for j in every] == list(range(1, 8))
    for count in (1, 2, 3, 7, 9):
        shards = [shard_of(every, (i, count)) for i in range(count)]
        numbers = sorted(j.number for shard in shards for j in shard)
        assert numbers == list(range(1, 8)), count  # each job in exactly one shard
        assert all(len(s) in (len(every) // count, -(-len(every) // count)) for s in shards)
    assert [j.name for j in shard_of(every, (1, 3))] == ["j1", "j4"]
    for bad in ("3/3", "-1/2", "1", "a/b", "0/0"):
        result = CliRunner().invoke(cli, ["batch", str(jobs), "--shard", bad, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and "--shard" in result.stderr, (bad, result.output)
    assert not (tmp_path / "out").exists()


BAD = {
    "not json": ("{photo: x}", 2, "not JSON"),
    "not an object": ('["in/photo.png"]', 2, "JSON object"),
    "unknown key": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "mask_files": []}', 2, "unknown key 'mask_files'"),
    "no photo": ('{"masks": ["in/red.png"]}', 2, 'no "photo"'),
    "missing photo": ('{"photo": "in/nope.png", "masks": ["in/red.png"]}', 2, "photo in/nope.png not found"),
    "missing mask": ('{"photo": "in/photo.png", "masks": ["in/nope.png"]}', 2, "mask in/nope.png not found"),
    "masks and objects": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "objects": ["cat"]}', 2, "either"),
    "unknown option": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"stepz": 3}}', 2, "unknown option 'stepz'"),
    "wrong type": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"steps1": "10"}}', 2, "steps1 takes an integer"),
    "out of bounds": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"lr1": 5}}', 2, "--lr1 must be"),
    "giant integer": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"steps1": 1' + "0" * 400 + '}}', 2,
                      "(401 digits)"),
    "nested deeply": ("[" * 100_000 + "]" * 100_000, 2, "nested too deeply"),
    "same names": ('{"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "names": ["cat", "cat"]}', 2,
                   "learn: duplicate handle name <cat>"),
    "name with a space": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "names": ["my cat"]}', 2,
                          "learn: invalid handle name"),
    "giant number": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"lr1": 1' + "0" * 400 + '}}', 2,
                     "lr1 is far too large"),  # float() of it raised OverflowError: exit 1
    "bad choice": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "generate": {"scheduler": "x"}, "prompts": ["a"]}', 2,
                   "scheduler takes"),
    "names count": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "names": ["a", "b"]}', 2, "--names gives 2"),
    "unknown handle": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "prompts": ["<cat> on a mat"]}', 2, "<cat>"),
    "bad name": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "../x"}', 2, "invalid scene name"),
    "same name": ('{"photo": "in/photo.png", "masks": ["in/blue.png"], "name": "first"}', 2, "also line 1's"),
    "key twice": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "photo": "in/blue.png"}', 2,
                  "'photo' is given twice"),
    "key twice inside": ('{"photo": "in/photo.png", "masks": ["in/red.png"], "learn": {"steps1": 1, "steps1": 2}}', 2,
                         "'steps1' is given twice"),
    "preview as a mask": ('{"photo": "in/photo.png", "masks": ["in/photo.masks-preview.png"]}', 2,
                          "is the preview `scenebreak mask` draws"),
    "photo as a mask": ('{"photo": "in/photo.png", "masks": ["in/red.png", "in/./photo.png"]}', 2,
                        "is the photo itself, not a mask"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_jobs_file_is_exit_2_naming_the_line_and_nothing_starts(case, tmp_path):
    write_synthetic_scene(tmp_path / "in")
    text, line, message = BAD[case]
    good = '{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "first"}'
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(f"{good}\n{text}\n{good.replace('first', 'third')}\n")
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"line {line}:" in result.stderr and message in result.stderr, result.stderr
    if "not found" in message:
        assert f"relative paths start from {tmp_path})" in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not (tmp_path / "out").exists() and not home().exists()


def test_an_empty_jobs_file_and_stdin(tmp_path):
    result = CliRunner().invoke(cli, ["batch", "-", "--out", str(tmp_path / "out")], input="\n\n")
    assert result.exit_code == 2 and "holds no job" in result.stderr
    result = CliRunner().invoke(cli, ["batch", "-", "--out", str(tmp_path / "out")], input='{"photo": "nope.png", "masks": []}\n')
    assert result.exit_code == 2 and "standard input" in result.stderr and "line 1" in result.stderr
    assert f"relative paths start from {Path.cwd()})" in result.stderr  # (not "the JOBS file's folder")


def _feed_fifo(path: Path, text: str) -> threading.Thread:
    """A pipe at `path` (as the shell's `<(...)`) that gives `text` to its first reader."""
    os.mkfifo(path)

    def write():
        with open(path, "w") as f:
            f.write(text)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    return writer


def test_a_jobs_file_from_a_pipe_is_read_with_paths_from_the_current_folder(tmp_path, monkeypatch):
    """`scenebreak batch <(grep cat jobs.jsonl)` was refused ("not a regular file"); its
    relative paths are the current folder's, as for stdin (the pipe's is /dev/fd)."""
    write_synthetic_scene(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    pipe = tmp_path / "pipes" / "jobs"
    pipe.parent.mkdir()
    _feed_fifo(pipe, json.dumps({"photo": "in/photo.png", "masks": ["in/red.png"]}) + "\n")
    [job] = read_jobs(pipe)
    assert job.photo == str(tmp_path / "in" / "photo.png")


@pytest.mark.skipif(sys.platform == "win32", reason="closes the child's stdout with preexec_fn")
def test_a_closed_stdout_costs_the_batch_nothing(tmp_path):
    """`scenebreak batch jobs.jsonl >&-`: flushing the line of the first job that ended
    raised AttributeError (exit 1), and the other jobs never ran."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": name,
                                  "learn": {"base-model": str(tmp_path / "nothing")}} for name in ("a", "b")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "scenebreak", "batch", str(jobs), "--out", str(tmp_path / "out")],
                          stderr=subprocess.PIPE, text=True, env=env, timeout=300, preexec_fn=lambda: os.close(1))
    assert done.returncode == 1 and "2 of 2 job(s) failed" in done.stderr, done.stderr
    assert "AttributeError" not in done.stderr


def test_a_job_another_run_holds_is_put_off_then_waited_for(tmp_path):
    """Two runs at once never run one job twice: the second finds it busy, then waits."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "held",
                                  "learn": {"base-model": str(tmp_path / "nothing")}}])
    job = read_jobs(jobs)[0]
    released = threading.Event()

    def other_run():
        with locked(claim_path("held"), wait=False):
            holding.set()
            released.wait(10)
            time.sleep(0.5)

    holding = threading.Event()
    thread = threading.Thread(target=other_run)
    thread.start()
    holding.wait(10)
    try:
        assert run_job(job, tmp_path / "out").status == "busy"
        messages = []
        released.set()
        result = run_job(job, tmp_path / "out", wait=True, report=messages.append)
    finally:
        released.set()
        thread.join()
    assert any("waiting for it" in m.text and f"process {os.getpid()}" in m.text for m in messages)
    assert result.status == "failed" and "base model folder not found" in result.error  # ran once the other let go


def test_a_batch_killed_mid_learn_resumes_the_job_on_the_rerun(tmp_path, tiny_model):
    """kill -9 of the whole batch (its workers too) inside phase 2; the rerun resumes
    from the checkpoint, taking over the dead run's lock at once."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "name": "k",
                                  "learn": {"steps1": 2, "steps2": 40, "no-prior": True, "checkpoint-every": 1,
                                            "base-model": str(tiny_model)}}])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    process = subprocess.Popen([sys.executable, "-m", "scenebreak", "batch", str(jobs), "--out", str(tmp_path / "out"), "-q"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    ckpt = checkpoint_path("k")
    try:
        wait_for_checkpoint(process, "k")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert claim_path("k").exists()  # left by the killed worker
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    got = lines(result.stdout)["k"]
    assert got["status"] == "done" and got["resumed"] is True and Path(got["scene"]).is_file()
    assert not ckpt.exists() and not claim_path("k").exists()


def _batch_of_one_long_job(tmp_path, tiny_model, name: str, steps2: int) -> subprocess.Popen:
    """`scenebreak batch` in its own process group, learning one job that checkpoints every step."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "name": name,
                                  "learn": {"steps1": 2, "steps2": steps2, "no-prior": True, "checkpoint-every": 1,
                                            "base-model": str(tiny_model)}}])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "scenebreak", "batch", str(jobs), "--out", str(tmp_path / "out"), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def test_a_worker_whose_batch_was_killed_stops_its_job_with_a_checkpoint(tmp_path, tiny_model):
    """kill -9 of the batch process alone: its worker, mid-job, trained on as an orphan
    to the job's end (hours on a GPU, holding it and the job's lock); it looked for its
    parent only between jobs. It now stops at its next step, saving its checkpoint."""
    process = _batch_of_one_long_job(tmp_path, tiny_model, "o", steps2=5000)
    try:
        wait_for_checkpoint(process, "o")
        workers = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                   for pid in (task / "children").read_text().split()]
        process.kill()  # the batch alone, not its process group
        process.wait()
        deadline = time.monotonic() + 90
        while any(Path(f"/proc/{pid}").exists() and
                  Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z" for pid in workers):
            assert time.monotonic() < deadline, "the killed batch's worker trained on"
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    state = torch.load(checkpoint_path("o"), weights_only=True)
    assert state["phase"] == 2 and state["step"] < 5000 and not scene_path("o").exists()


def test_sigterm_to_the_batch_alone_stops_its_workers_with_their_checkpoints(tmp_path, tiny_model):
    """`kill PID` (a supervisor, docker stop) of the batch process: it died at once, its
    workers trained on unwatched and their results were lost. Now the busy workers are
    told as Ctrl-C would (learn saves at its next step), their results come out with how
    to resume, and it exits 143 in one line."""
    process = _batch_of_one_long_job(tmp_path, tiny_model, "t", steps2=400)
    try:
        wait_for_checkpoint(process, "t")
        process.send_signal(signal.SIGTERM)  # the parent alone: its workers hear nothing from the system
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 143, err
    assert err.decode().strip().splitlines()[-1].startswith("Error: terminated (SIGTERM)") and b"Traceback" not in err
    got = lines(out.decode())["t"]
    assert got["status"] == "interrupted" and "rerun the batch to resume it" in got["error"], got
    state = torch.load(checkpoint_path("t"), weights_only=True)
    assert state["phase"] == 2 and 2 <= state["step"] < 400
    deadline = time.monotonic() + 30  # no worker left behind: the whole group goes (multiprocessing's helper last)
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("a process of the batch was still running 30 s after it ended")


def test_ray_missing_is_exit_1_with_the_install_line(tmp_path, monkeypatch):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"]}])
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as when it is not installed
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", "auto", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "pip install 'scenebreak[ray]'" in result.stderr, result.output
    assert "pipx inject --include-apps scenebreak ray" in result.stderr  # (the `ray start` the docs use comes too)


def test_batch_help_loads_no_torch():
    code = ("import sys; from scenebreak.cli.commands import cli\ntry: cli(['batch', '--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'ray' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_a_job_of_words_makes_its_masks_with_mask_then_learns(tmp_path, tiny_model, tiny_segmentation):
    detector, segmenter = tiny_segmentation
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "objects": ["red square", "blue square"], "names": ["red", "blue"],
                                  "mask": {"detector": str(detector), "segmenter": str(segmenter), "threshold": 0.0},
                                  "learn": {"steps1": 1, "steps2": 1, "prior": False, "base-model": str(tiny_model)},
                                  "prompts": ["<red> and <blue>"], "generate": {"steps": 2, "seed": 0}}])
    job = read_jobs(jobs)[0]
    assert job.name == "photo" and job.learn.names == ("red", "blue") and job.mask.threshold == 0.0
    result = run_job(job, tmp_path / "out", tmp_path / "scenes", device="cpu")
    assert result.status == "done", result.error
    masks = tmp_path / "out" / "photo" / "masks"
    assert sorted(p.name for p in masks.glob("*.mask[0-9].png")) == ["photo.mask1.png", "photo.mask2.png"]
    record = json.loads((tmp_path / "out" / "photo" / "job.json").read_text())
    assert record["masks"] == [str(masks / "photo.mask1.png"), str(masks / "photo.mask2.png")]
    assert result.scene == str(tmp_path / "scenes" / "photo.scene") and not scene_path("photo").exists()
    assert run_job(job, tmp_path / "out", tmp_path / "scenes", device="cpu").status == "skipped"


def test_a_rerun_with_another_scenes_folder_puts_the_scene_there(tmp_path, tiny_model, monkeypatch):
    """A rerun with --scenes DIR (the first run wrote to the cache) skipped every job as
    "already done": DIR was never made and the scene stayed where it was. The scene is
    copied there now, without learning it or sampling its images again."""
    import scenebreak.batch.runner as runner
    import scenebreak.sample.generate as generate_module
    import scenebreak.train.learn as learn_module

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "moved",
                                  "learn": {"steps1": 1, "steps2": 1, "prior": False, "base-model": str(tiny_model)},
                                  "prompts": ["<asset1>"], "generate": GENERATE}])
    job = read_jobs(jobs)[0]
    first = run_job(job, tmp_path / "out", device="cpu")
    assert first.status == "done" and first.scene == str(scene_path("moved")), first.error

    class Board:
        def finished(self, result):
            self.result = result

    elsewhere = (tmp_path / "scenes").absolute()
    assert runner._skipped_here(job, (tmp_path / "out").absolute(), None, Board())
    assert not runner._skipped_here(job, (tmp_path / "out").absolute(), elsewhere, Board())
    for module, name in ((learn_module, "learn"), (generate_module, "generate")):
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} ran again"))
    said = []
    again = run_job(job, tmp_path / "out", elsewhere, device="cpu", report=said.append)
    assert again.status == "done" and again.scene == str(elsewhere / "moved.scene"), again.error
    assert (elsewhere / "moved.scene").read_bytes() == scene_path("moved").read_bytes()  # (copied: the first stays)
    assert again.images == first.images and any("copying its scene" in m.text for m in said)
    assert run_job(job, tmp_path / "out", elsewhere, device="cpu").status == "skipped"
    assert runner._skipped_here(job, (tmp_path / "out").absolute(), elsewhere, Board())
    # Only a scene is copied: a record naming another file (edited, or of another tool) learns again.
    from scenebreak.errors import InvalidInput

    record_path = tmp_path / "out" / "moved" / "job.json"
    (tmp_path / "not-a-scene").write_text("hi")
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "scene": str(tmp_path / "not-a-scene")}))

    def learn_again(*args, **kwargs):
        raise InvalidInput("learned again")

    monkeypatch.setattr(learn_module, "learn", learn_again)
    third = run_job(job, tmp_path / "out", tmp_path / "third", device="cpu")
    assert third.status == "failed" and "learned again" in third.error and not (tmp_path / "third" / "moved.scene").exists()


def test_a_scene_this_batch_did_not_make_is_never_replaced(tmp_path):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "mine"}])
    scene_path("mine").parent.mkdir(parents=True)
    scene_path("mine").write_bytes(b"someone's scene")
    result = run_job(read_jobs(jobs)[0], tmp_path / "out")
    assert result.status == "failed" and "was not made by this batch" in result.error and "scenebreak rm mine" in result.error
    assert scene_path("mine").read_bytes() == b"someone's scene"


@pytest.mark.parametrize("part", ["images", "masks"])
def test_a_folder_this_batch_did_not_make_is_never_replaced(tmp_path, part):
    """OUT/NAME/masks or images of the user's own (hand-drawn masks, say) was deleted and
    replaced whole by the job's; now the job fails before any work, the folder kept."""
    write_synthetic_scene(tmp_path / "in")
    job = {"photo": "in/photo.png", "name": "mine", "prompts": ["<asset1>"]}
    job.update({"objects": ["red square"]} if part == "masks" else {"masks": ["in/red.png"]})
    jobs = write_jobs(tmp_path, [job])
    theirs = tmp_path / "out" / "mine" / part
    theirs.mkdir(parents=True)
    (theirs / "drawn.png").write_bytes(b"by hand")
    result = run_job(read_jobs(jobs)[0], tmp_path / "out")
    assert result.status == "failed" and "was not made by scenebreak batch" in result.error, result
    assert [p.name for p in theirs.iterdir()] == ["drawn.png"] and not scene_path("mine").exists()


def test_jobs_of_words_take_the_environments_models_as_mask_does(tmp_path, monkeypatch):
    """SCENEBREAK_DETECTOR / SCENEBREAK_SEGMENTER reached `mask` through its options only:
    a batch on an offline cluster asked for the hub's models."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "objects": ["cat"]},
                                 {"photo": "in/photo.png", "objects": ["cat"], "name": "own", "mask": {"detector": "mine"}}])
    monkeypatch.setenv("SCENEBREAK_DETECTOR", "/models/gdino")
    monkeypatch.setenv("SCENEBREAK_SEGMENTER", "/models/sam")
    first, second = read_jobs(jobs)
    assert (first.mask.detector, first.mask.segmenter) == ("/models/gdino", "/models/sam")
    assert (second.mask.detector, second.mask.segmenter) == ("mine", "/models/sam")


def test_paths_in_a_jobs_file_are_the_jobs_files_and_links_keep_their_names(tmp_path, monkeypatch):
    """A relative --base-model (or detector) was taken from the current folder (a Ray
    worker's own), a photo behind a link was named after its target, and a U+2028 in a
    prompt split its line in two."""
    import os

    write_synthetic_scene(tmp_path / "jobs" / "in")
    (tmp_path / "jobs" / "models" / "sd").mkdir(parents=True)
    (tmp_path / "jobs" / "in" / "my-cat.png").symlink_to(tmp_path / "jobs" / "in" / "photo.png")
    jobs = tmp_path / "jobs" / "jobs.jsonl"
    jobs.write_text(json.dumps({"photo": "in/my-cat.png", "masks": ["in/red.png"], "prompts": ["<asset1>\u2028 at night"],
                                "learn": {"base-model": "models/sd"}}, ensure_ascii=False) + "\n"
                    + json.dumps({"photo": "in/photo.png", "objects": ["cat"], "mask": {"detector": "./gd"},
                                  "learn": {"base-model": "someone/model"}}) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("SCENEBREAK_SEGMENTER", "sam-here")
    (elsewhere / "sam-here").mkdir()
    first, second = read_jobs(jobs)
    assert first.name == "my-cat" and first.photo == str(tmp_path / "jobs" / "in" / "my-cat.png")
    assert first.base_model == str(tmp_path / "jobs" / "models" / "sd") and first.prompts == ("<asset1>\u2028 at night",)
    assert second.base_model == "someone/model" and second.mask.detector == str(tmp_path / "jobs" / "gd")
    assert second.mask.segmenter == os.path.join(str(elsewhere), "sam-here")  # the environment's: from here


def test_a_learn_lock_taken_in_the_gap_is_waited_for_again(tmp_path, tiny_model, monkeypatch):
    """The job waited for the scene's lock, let it go, and then learn took it: a run
    that took it in between made the job "busy", which under Ray was final (exit 0, the
    job never ran)."""
    import scenebreak.train.learn as learn_module
    from scenebreak.train.locks import Busy

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "raced",
                                  "learn": {"steps1": 1, "steps2": 1, "prior": False, "base-model": str(tiny_model)}}])
    real, calls = learn_module.learn, []

    def learn(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise Busy("process 4242")
        return real(*args, **kwargs)

    monkeypatch.setattr(learn_module, "learn", learn)
    result = run_job(read_jobs(jobs)[0], tmp_path / "out", device="cpu")
    assert result.status == "done" and len(calls) == 2, result


def test_a_rerun_with_a_photo_gone_unreadable_fails_that_job_only(tmp_path, tiny_model):
    """The rerun's check for done jobs hashed every photo outside any try: one photo made
    unreadable stopped the whole batch before any job started."""
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "gone",
                                  "learn": {"steps1": 1, "steps2": 1, "prior": False, "base-model": str(tiny_model)}}])
    out = tmp_path / "out"
    assert run_job(read_jobs(jobs)[0], out, device="cpu").status == "done"
    job = read_jobs(jobs)[0]
    (tmp_path / "in" / "photo.png").unlink()
    from scenebreak.batch.runner import Board, _skipped_here

    from scenebreak.events import silent

    assert _skipped_here(job, out, None, Board(1, silent)) is False


@pytest.mark.parametrize("devices", ["tpu", "cuda:7", "cpu,,cpu", "mps:1"])
def test_unknown_devices_are_exit_2_before_anything_starts(devices, tmp_path):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"]}])
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--devices", devices, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--devices" in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_the_learn_lock_of_a_machine_that_died_is_waited_out(tmp_path, monkeypatch):
    """A retried job whose first try died with its machine: its claim and the scene's
    learn lock turn stale a few seconds apart; the job waits for both, then runs."""
    from scenebreak.train import locks

    monkeypatch.setattr(locks, "STALE", 1.0)
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "lost",
                                  "learn": {"base-model": str(tmp_path / "nothing")}}])
    lock = home() / "locks" / "lost.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": "gone", "pid": 7, "token": "t"}))
    messages = []
    result = run_job(read_jobs(jobs)[0], tmp_path / "out", report=messages.append)
    assert any("waiting for the lock of process 7 on gone" in m.text for m in messages)
    assert result.status == "failed" and "base model folder not found" in result.error  # it ran: the lock was taken over


def test_a_worker_forwards_what_a_job_waits_for():
    """A job waiting hours for another run's class images (or a download) showed nothing:
    only warnings and "job ..." notes reached the batch's bar."""
    from scenebreak.batch.work import forwarded
    from scenebreak.events import Message

    assert forwarded(Message("waiting for process 12, which is making the same class images"))
    assert forwarded(Message("downloading the base model x/y from the Hugging Face hub (once: ...)"))
    assert forwarded(Message("anything", "warning")) and forwarded(Message("job 3 (cat): masks of cat"))
    assert not forwarded(Message("memory plan: --memory fast, full tuning"))


def test_a_job_told_to_stop_saves_its_checkpoint_without_any_signal(tmp_path, tiny_model, monkeypatch):
    """A busy worker is stopped through an event its job polls (learn then saves its
    checkpoint, as on Ctrl-C), not by SIGINT: on Windows os.kill terminates the process."""
    import multiprocessing

    from scenebreak.batch import runner

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "told",
                                  "learn": {"steps1": 50, "steps2": 400, "prior": False, "checkpoint-every": 1000,
                                            "base-model": str(tiny_model)}}])
    steps = []

    def should_stop():
        steps.append(1)
        return len(steps) > 2
    result = run_job(read_jobs(jobs)[0], tmp_path / "out", device="cpu", should_stop=should_stop)
    assert result.status == "interrupted" and "rerun the batch to resume it" in result.error, result
    state = torch.load(checkpoint_path("told"), weights_only=True)
    assert state["phase"] == 1 and state["step"] < 10  # saved when told, not at a checkpoint-every

    class Process:  # a worker's process, never signalled
        pid = 4242

        def is_alive(self):
            return True

    monkeypatch.setattr(runner.os, "kill", lambda *a: pytest.fail("a worker was sent a signal"))
    worker = runner._Worker.__new__(runner._Worker)
    worker.process, worker.stop = Process(), multiprocessing.get_context("spawn").Event()
    worker.interrupt()
    assert worker.stop.is_set()


def test_idle_workers_of_a_killed_batch_exit(tmp_path, monkeypatch):
    """A batch killed outright cannot end its workers: each idle one sees its parent gone
    and exits (on Windows a dead parent's id stays the worker's parent id, so the worker
    asks multiprocessing's handle on its parent, not os.getppid)."""
    import multiprocessing

    from scenebreak.batch import runner

    class Parent:
        alive = True

        def is_alive(self):
            return self.alive

    parent = Parent()
    monkeypatch.setattr(multiprocessing, "parent_process", lambda: parent)
    assert not runner.parent_gone(os.getppid())
    parent.alive = False
    assert runner.parent_gone(os.getppid())  # though the id reads the same, as on Windows

    script = tmp_path / "batch.py"
    script.write_text(
        "import multiprocessing, sys, time\n"
        "from scenebreak.batch.runner import worker_main\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    inbox, outbox, stop = ctx.Queue(), ctx.Queue(), ctx.Event()\n"
        "    worker = ctx.Process(target=worker_main, args=(0, 'cpu', inbox, outbox, sys.argv[1], None, 1, stop))\n"
        "    worker.start()\n"
        "    print(worker.pid, flush=True)\n"
        "    time.sleep(600)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out")], env=env, stdout=subprocess.PIPE,
                               start_new_session=True)
    try:
        worker = int(process.stdout.readline())
        time.sleep(1)
        process.kill()
        process.wait()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                break
            if state == "Z":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the killed batch's idle worker still runs")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_a_jobs_switch_takes_the_command_lines_name_for_its_off_side():
    """`mask --keep-holes` is the documented option: `"keep-holes": true` was refused as
    an unknown option (only `fill-holes`/`no-fill-holes` were known)."""
    from scenebreak.batch.jobs import _config
    from scenebreak.config import MaskConfig
    from scenebreak.errors import InvalidInput

    assert _config(MaskConfig, {"keep-holes": True}, "mask").fill_holes is False
    assert _config(MaskConfig, {"--keep-holes": False}, "mask").fill_holes is True
    assert _config(MaskConfig, {"fill-holes": False}, "mask").fill_holes is False
    with pytest.raises(InvalidInput, match="keep-holes takes true or false"):
        _config(MaskConfig, {"keep-holes": "yes"}, "mask")


def test_out_dir_is_batchs_out_too():
    """Every other command writes to --out-dir: batch takes that name as well as --out."""
    result = CliRunner().invoke(cli, ["batch", "-", "--out-dir", "somewhere"], input="\n")
    assert result.exit_code == 2 and "holds no job" in result.stderr, result.output


def test_the_bar_starts_after_the_jobs_already_done_are_skipped():
    """A rerun with most jobs done: the bar counted from 0 and the skipped jobs took no
    time, so its rate (and ETA) promised minutes for hours of work left."""
    from scenebreak.batch.runner import Board
    from scenebreak.batch.work import JobResult
    from scenebreak.events import Message, Progress

    events = []
    board = Board(4, events.append)
    for number in (1, 2, 3):
        board.finished(JobResult(number, f"j{number}", "skipped", None, [], note="already done"))
    assert not [e for e in events if isinstance(e, Progress)]
    assert len([e for e in events if isinstance(e, Message)]) == 3  # (each skip is still said)
    board.start()
    board.phase(0, "j4: learning")
    board.finished(JobResult(4, "j4", "done", None, []))
    progress = [(e.completed, e.total) for e in events if isinstance(e, Progress)]
    assert progress == [(3, 4), (3, 4), (4, 4)]


def test_a_workers_prints_never_reach_the_results_stream():
    """stdout is the batch's JSON Lines; a worker inherits it, and a library's print there
    would break the script reading them: a worker's stdout goes to stderr."""
    code = ("import sys; from scenebreak.batch.runner import results_stream_for_the_batch_alone as f; "
            "print('before'); f(); print('from a library'); sys.stdout.flush()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "before\n" and "from a library" in done.stderr


def test_a_job_interrupted_while_the_batch_went_on_is_no_success(tmp_path, monkeypatch):
    """A job stopped by Ctrl-C or SIGTERM was "failed", its error saying it was
    interrupted; one whose worker alone was stopped (`kill -INT` to it) left the batch
    to exit 0 with the job not done. It is "interrupted", counted apart, and exit 1."""
    from scenebreak.batch import runner
    from scenebreak.batch.work import INTERRUPTED, JobResult

    def stopped_worker(jobs, on_result=None, **kwargs):
        results = [JobResult(1, "a", "done", scene="a.scene"), JobResult(2, "b", "interrupted", error=INTERRUPTED)]
        for result in results:
            on_result(result)
        return runner.BatchResult(results)

    monkeypatch.setattr(runner, "run_batch", stopped_worker)
    result = CliRunner().invoke(cli, ["batch", str(tmp_path / "jobs.jsonl")])
    assert result.exit_code == 1 and "1 of 2 job(s) interrupted: run the same command again" in result.stderr
    assert lines(result.stdout)["b"]["status"] == "interrupted"
    summary = runner.BatchResult([JobResult(2, "b", "interrupted", error=INTERRUPTED)])
    assert "0 failed, 1 interrupted" in summary.summary() and summary.to_dict()["interrupted"] == 1


def test_a_jobs_images_without_a_seed_are_the_same_on_every_run(tmp_path):
    """Its learning is seeded; its images took a random seed, so a rerun (or another
    shard or machine) made other images. Their seed now comes from the job's name."""
    from scenebreak.batch import work
    from scenebreak.config import GenerateConfig

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": n, "prompts": ["<asset1>"],
                                  "generate": g} for n, g in (("cat", {}), ("mug", {}), ("own", {"seed": 7}))])
    seeds = []

    class Image:
        def __init__(self, path):
            self.path = path

    def generate(scene, prompts, config: GenerateConfig, out_dir, **kwargs):
        seeds.append(config.seed)
        (out_dir / f"{config.seed}.png").write_bytes(b"")
        return type("Result", (), {"images": [Image(out_dir / f"{config.seed}.png")]})

    for run in range(2):
        for job in read_jobs(jobs):
            work._generate(job, tmp_path / "x.scene", tmp_path / str(run) / job.name, "cpu", lambda e: None, generate, None)
    cat, mug, own = seeds[:3]
    assert seeds[3:] == seeds[:3] and cat != mug and own == 7 and cat == work.name_seed("cat")


def test_a_jobs_failure_line_is_worded_as_the_command_lines_naming_the_fix():
    """A full disk met outside learn and generate (writing the job's record, moving its
    images into place) was "[Errno 28] No space left on device": no path, no fix."""
    import errno

    from scenebreak.batch.work import one_line
    from scenebreak.errors import InvalidInput

    full = one_line(OSError(errno.ENOSPC, "No space left on device", "/data/out/job.json"))
    assert full.startswith("no space left on device (/data/out/job.json): free some space"), full
    assert one_line(InvalidInput("bad photo")) == "bad photo"
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"


def test_a_local_worker_killed_mid_job_is_tried_again_and_resumes(tmp_path, tiny_model):
    """--retries (1 by default) on this machine: a worker process that dies mid-job (the
    system's OOM killer) is replaced, and the job given to it resumes from its checkpoint."""
    process = _batch_of_one_long_job(tmp_path, tiny_model, "r", steps2=30)
    try:
        wait_for_checkpoint(process, "r")
        [worker] = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]  # (not the resource tracker)
        os.kill(worker, signal.SIGKILL)
        out, err = process.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err
    assert b"job 1 (r): its worker process died (exit code -9); trying again" in err
    got = lines(out.decode())["r"]
    assert got["status"] == "done" and got["resumed"] is True and Path(got["scene"]).is_file()


def test_a_handle_past_the_prompt_limit_is_refused_before_any_job_learns(tmp_path, tiny_model):
    """generate refuses it before loading; batch found it only after the job had learned
    its scene (hours, overnight), then failed the job's images."""
    write_synthetic_scene(tmp_path / "in")
    learn = {**TINY, "base-model": str(tiny_model)}
    jobs = write_jobs(tmp_path, [
        {"photo": "in/photo.png", "masks": ["in/red.png"], "name": "fine", "learn": learn, "prompts": ["<asset1>"]},
        {"photo": "in/photo.png", "masks": ["in/red.png"], "name": "long", "names": ["bowl"], "learn": learn,
         "prompts": ["word " * 80 + "<bowl>"]},
    ])
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: JOBS file {jobs}, line 2: prompt 'word word")
    assert "handle <bowl> falls past the text encoder's 77 tokens" in result.stderr
    assert not (tmp_path / "out").exists() and not scene_path("fine").exists()


def test_a_job_that_fails_after_learning_names_the_scene_it_kept(tmp_path, tiny_model, monkeypatch):
    import scenebreak.sample.generate as generate_module

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "kept",
                                  "learn": {**TINY, "base-model": str(tiny_model)}, "prompts": ["<asset1>"],
                                  "generate": GENERATE}])

    def fail(*args, **kwargs):
        raise OSError("the disk went away")

    monkeypatch.setattr(generate_module, "generate", fail)
    result = run_job(read_jobs(jobs)[0], tmp_path / "out", device="cpu")
    assert result.status == "failed" and "the disk went away" in result.error
    assert result.scene == str(scene_path("kept")) and scene_path("kept").is_file()
