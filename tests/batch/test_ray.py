"""`batch --ray` on a real Ray cluster started here (a head node with 2 CPUs and its own
GCS, raylet and worker processes, as `ray start --head` makes; not `ray.init`'s local
mode): the same three jobs as Ray tasks, and a worker process killed with SIGKILL in
the middle of a job, which Ray retries and which resumes from its checkpoint."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest
from click.testing import CliRunner

from scenebreak.batch.work import claim_path
from scenebreak.cli.commands import cli
from scenebreak.paths import checkpoint_path, scene_path
from scenebreak.train.locks import read_owner

from helpers import write_synthetic_scene
from jobfiles import lines, three_jobs, write_jobs

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[test,ray]')")


@pytest.fixture(scope="module")
def cluster():
    """A one-node cluster on this machine, 2 CPUs, no dashboard; its workers import this
    checkout's scenebreak."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("PYTHONPATH", os.pathsep.join(sys.path))
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    yield head
    head.shutdown()


def test_three_jobs_as_ray_tasks(cluster, tmp_path, tiny_model):
    import logging

    ray_logger = logging.getLogger("ray")
    logging_before = ray_logger.level, list(ray_logger.handlers), ray_logger.propagate
    jobs = three_jobs(tmp_path, tiny_model)
    out = tmp_path / "out"
    # A cluster without GPUs is no default for GPU jobs (its GPU workers may not have
    # joined): each of its cores would have taken a training of its own.
    refused = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(out)])
    assert refused.exit_code == 1 and "has no GPU now" in refused.stderr and "--gpus-per-job 0" in refused.stderr
    assert not out.exists() or not any(out.iterdir())
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(out),
                                      "--gpus-per-job", "0"])
    assert result.exit_code == 1, result.output
    got = lines(result.stdout)
    assert {n: r["status"] for n, r in got.items()} == {"a": "done", "b": "failed", "c": "done"}
    assert "base model folder not found" in got["b"]["error"]
    assert got["a"]["scene"] == str(scene_path("a")) and len(got["c"]["images"]) == 2
    assert "Ray cluster: 1 node(s), 2 CPU(s), 0 GPU(s); no GPU: 2 CPU(s) per job" in result.stderr
    again = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(out), "-q",
                                     "--gpus-per-job", "0"])
    assert {n: r["status"] for n, r in lines(again.stdout).items()} == {"a": "skipped", "b": "failed", "c": "skipped"}
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--gpus-per-job", "1"])
    assert result.exit_code == 1 and "at most 0 GPU(s) each" in result.stderr, result.output
    # (ray.init set up the "ray" logger of this process, the caller's: left as it was)
    assert (ray_logger.level, list(ray_logger.handlers), ray_logger.propagate) == logging_before


def test_a_ray_tasks_notes_and_progress_reach_the_batchs_stderr(cluster, tmp_path, tiny_model):
    """Under --ray stderr showed nothing of a job until its end: not its warnings, not
    what it was doing, for hours."""
    from jobfiles import GENERATE, TINY

    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"], "name": "w",
                                  "learn": {**TINY, "base-model": str(tiny_model)}, "prompts": ["a plain photo"],
                                  "generate": GENERATE}])
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(tmp_path / "out"),
                                      "--gpus-per-job", "0"])
    assert result.exit_code == 0, result.output
    assert "job 1 (w): prompt 'a plain photo' uses none of the scene's handles" in result.stderr, result.stderr


def _long_job(tmp_path, tiny_model, name: str, steps2: int):
    write_synthetic_scene(tmp_path / "in")
    return write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "name": name,
                                  "learn": {"steps1": 2, "steps2": steps2, "no-prior": True, "checkpoint-every": 1,
                                            "base-model": str(tiny_model)}}])


def _once_in_phase_2(name: str, act, on_deadline=None) -> threading.Thread:
    """A thread that calls `act(state, lock owner)` once job `name` has checkpointed
    inside phase 2 (step 2 or later) and holds its job lock. If that is not seen within
    two minutes it calls `on_deadline()` (so that a job waiting for `act` to end it does
    not run its thousands of steps) and records what it saw last in `.last_seen`."""
    import torch

    def watch():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                state = torch.load(checkpoint_path(name), weights_only=True)
            except Exception as exc:  # not there yet, or replaced while reading
                state, watcher.last_seen = None, f"no checkpoint read ({type(exc).__name__}: {exc})"[:300]
            owner = read_owner(claim_path(name))
            if state:
                watcher.last_seen = f"phase {state['phase']} step {state['step']}, lock owner {owner}"
            if state and state["phase"] == 2 and state["step"] >= 2 and owner:
                act(state, owner)
                return
            time.sleep(0.05)
        if on_deadline is not None:
            on_deadline()

    watcher = threading.Thread(target=watch)
    watcher.last_seen = "nothing"
    watcher.start()
    return watcher


def test_a_ray_worker_killed_during_a_job_is_retried_and_resumes(cluster, tmp_path, tiny_model):
    jobs = _long_job(tmp_path, tiny_model, "k", 40)
    killed = []

    def kill_the_worker(state, owner):  # SIGKILL the Ray worker running it (the process its job lock names)
        os.kill(owner["pid"], signal.SIGKILL)
        killed.append(owner["pid"])

    watcher = _once_in_phase_2("k", kill_the_worker)
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(tmp_path / "out"),
                                      "--retries", "2", "--gpus-per-job", "0"])
    watcher.join()
    assert killed, f"the job was never seen in phase 2 holding its lock; last seen: {watcher.last_seen}"
    assert killed[0] != os.getpid()
    assert result.exit_code == 0, result.output
    got = lines(result.stdout)["k"]
    assert got["status"] == "done" and got["resumed"] is True
    assert not checkpoint_path("k").exists() and not claim_path("k").exists()


def test_an_address_nobody_answers_is_exit_1_at_once(tmp_path):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"]}])
    started = time.monotonic()
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", "127.0.0.1:1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "no Ray cluster answers at 127.0.0.1:1" in result.stderr, result.output
    assert time.monotonic() - started < 30


def test_ctrl_c_on_a_ray_batch_lets_its_tasks_save_their_checkpoints(cluster, tmp_path, tiny_model):
    """The tasks run in Ray's processes, which hear nothing of the batch's Ctrl-C, and Ray's
    shutdown killed them mid-step. They are now cancelled as Ctrl-C would (learn saves at
    its next step) and waited for; the job's line says how to resume."""
    import _thread

    import torch

    jobs = _long_job(tmp_path, tiny_model, "c", 1500)
    interrupted = []

    def ctrl_c(state, owner):
        interrupted.append(state["step"])
        _thread.interrupt_main()  # Ctrl-C in the batch (the driver)

    watcher = _once_in_phase_2("c", ctrl_c, on_deadline=_thread.interrupt_main)  # (never 1500 steps)
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", cluster.address, "--out", str(tmp_path / "out"),
                                      "--gpus-per-job", "0"])
    watcher.join()
    assert interrupted, f"the job was never seen in phase 2 holding its lock; last seen: {watcher.last_seen}"
    assert result.exit_code == 130, result.output
    got = lines(result.stdout)["c"]
    assert got["status"] == "interrupted" and "rerun the batch to resume it" in got["error"], got
    state = torch.load(checkpoint_path("c"), weights_only=True)
    assert state["phase"] == 2 and interrupted[0] <= state["step"] < 1500
    deadline = time.monotonic() + 30  # the task ended: its job lock is released
    while claim_path("c").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not claim_path("c").exists()


def test_the_tasks_environment_has_absolute_paths_and_no_token(tmp_path, monkeypatch):
    """Ray's tasks run in its own working folder, and their environment shows on its dashboard."""
    from scenebreak.batch.ray_runner import task_environment

    (tmp_path / "models" / "sd").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    env = task_environment({"SCENEBREAK_HOME": "cache", "SCENEBREAK_BASE_MODEL": "./models/sd", "HF_HOME": "~/hf",
                            "SCENEBREAK_DETECTOR": "IDEA-Research/grounding-dino-tiny", "HF_TOKEN": "hf_secret",
                            "HUGGING_FACE_HUB_TOKEN": "hf_secret", "HF_HUB_OFFLINE": "1", "PATH": "/bin"})
    assert env == {"SCENEBREAK_HOME": str(tmp_path / "cache"), "SCENEBREAK_BASE_MODEL": str(tmp_path / "models" / "sd"),
                   "HF_HOME": os.path.expanduser("~/hf"), "SCENEBREAK_DETECTOR": "IDEA-Research/grounding-dino-tiny",
                   "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("value, phrase", [("-1", "at least 0 and at most 1024"), ("1.5", "not a fraction above 1")])
def test_gpus_per_job_ray_cannot_place_is_refused_up_front(tmp_path, value, phrase):
    write_synthetic_scene(tmp_path / "in")
    jobs = write_jobs(tmp_path, [{"photo": "in/photo.png", "masks": ["in/red.png"]}])
    result = CliRunner().invoke(cli, ["batch", str(jobs), "--ray", "127.0.0.1:1", "--gpus-per-job", value])
    assert result.exit_code == 2 and phrase in result.stderr, result.output
