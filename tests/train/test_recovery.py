"""No training is lost: a run killed anywhere (kill -9 included) resumes to the same
scene, a failed final write stays resumable, a diverged loss stops with the last good
checkpoint, and parallel runs do not trip over each other."""

from __future__ import annotations

import dataclasses
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

from scenebreak import LearnConfig, learn, load_scene
from scenebreak.cli.commands import cli
from scenebreak.errors import CheckpointMismatch
from scenebreak.events import Progress
from scenebreak.paths import checkpoint_path

from helpers import Killed, kill_at, wait_for_checkpoint


def _same(a_path, b_path, component: str) -> None:
    a, b = load_scene(a_path, weights=True), load_scene(b_path, weights=True)
    assert torch.allclose(a.embeddings, b.embeddings, atol=1e-6)
    for key, value in a.weights[component].items():
        assert torch.allclose(value, b.weights[component][key], atol=1e-6), key


MODES = {
    "fast": dict(memory="fast"),
    "low": dict(memory="low"),  # the optimizer inside the backward pass
    "lora": dict(tune="lora", rank=2),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_run_killed_in_phase_2_resumes_to_the_same_scene(mode, scene_files, tiny_model):
    """Killed once after the automatic end-of-phase-1 checkpoint (the optimizer state
    there is phase 1's and must not reach phase 2), once after a periodic phase-2 one."""
    base = dict(steps1=2, steps2=4, prior=False, lr2=1e-3, save_dtype="fp32", **MODES[mode])
    args = (scene_files["image"], scene_files["masks"])
    straight = learn(*args, LearnConfig(**base), base_model=str(tiny_model), name=f"straight-{mode}")
    component = "unet_lora" if mode == "lora" else "unet"
    for every, kill_step in ((0, 3), (2, 3)):
        name = f"killed-{mode}-{every}"
        config = LearnConfig(**base, checkpoint_every=every)
        with pytest.raises(Killed):
            learn(*args, config, base_model=str(tiny_model), name=name, report=kill_at(2, kill_step))
        saved = torch.load(checkpoint_path(name), weights_only=True)
        assert (saved["phase"], saved["step"]) == ((1, 2) if every == 0 else (2, 2))
        resumed = learn(*args, config, base_model=str(tiny_model), name=name, resume=True)
        _same(straight.path, resumed.path, component)


def test_kill_9_in_phase_2_then_resume(scene_files, tiny_model, tmp_path):
    """A real process, killed with SIGKILL once it has checkpointed inside phase 2."""
    common = ["--masks", *map(str, scene_files["masks"]), "--base-model", str(tiny_model), "--steps1", "2", "--steps2", "30",
              "--no-prior", "--lr2", "1e-3", "--save-dtype", "fp32", "--memory", "fast"]
    # The same number of threads as this process, which trains the runs to compare with:
    # a float sum split another way rounds differently.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "scenebreak", "learn", str(scene_files["image"]), *common, "--name", "k",
                                "--checkpoint-every", "1", "-q"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(process, "k")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    resumed = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), *common, "--name", "k", "--resume", "-q"])
    assert resumed.exit_code == 0, resumed.output
    straight = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), *common, "--name", "straight", "-q"])
    _same(straight.stdout.strip(), resumed.stdout.strip(), "unet")


def test_a_failed_final_write_keeps_the_training_and_says_how_to_finish(scene_files, tiny_model, monkeypatch):
    import errno

    import scenebreak.train.checkpoints
    import scenebreak.train.learn

    args = (scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, prior=False, lr2=1e-3, save_dtype="fp32"))
    straight = learn(*args, base_model=str(tiny_model), name="straight")
    real_save = scenebreak.train.learn.save_scene

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scenebreak.train.learn, "save_scene", full_disk)
    command = ["learn", str(args[0]), "--masks", *map(str, args[1]), "--base-model", str(tiny_model), "--steps1", "2",
               "--steps2", "2", "--no-prior", "--lr2", "1e-3", "--save-dtype", "fp32"]
    # A short run keeps no checkpoint of its end: its last one (phase 1's) is said to be that,
    # not "the trained model" (a --resume trains phase 2 again).
    short = CliRunner().invoke(cli, [*command, "--name", "short"])
    assert short.exit_code == 1 and "the run's last checkpoint is kept" in short.stderr, short.output
    assert "trained model" not in short.stderr
    monkeypatch.setattr(scenebreak.train.checkpoints, "FINAL_AFTER_SECONDS", -1.0)  # as if training had taken long
    result = CliRunner().invoke(cli, [*command, "--name", "full"])
    assert result.exit_code == 1 and "no space left on device" in result.stderr and "--resume" in result.stderr, result.output
    assert "the trained model is kept" in result.stderr
    monkeypatch.setattr(scenebreak.train.learn, "save_scene", real_save)
    steps = []
    resumed = learn(*args, base_model=str(tiny_model), name="full", resume=True,
                    report=lambda e: steps.append(e) if isinstance(e, Progress) and e.task.startswith("phase") else None)
    assert not steps  # nothing trained again: only the scene was written
    _same(straight.path, resumed.path, "unet")


def test_a_checkpoint_that_cannot_be_written_is_a_warning_and_the_scene_is_written(scene_files, tiny_model, monkeypatch):
    """A full disk at a periodic checkpoint ended the run (the steps since the last one
    lost, every resume failing the same way), and at the insurance before the scene was
    written threw away the finished training without trying the scene."""
    import errno

    import torch as torch_module

    import scenebreak.train.checkpoints as checkpoints

    args = (scene_files["image"], scene_files["masks"])
    config = LearnConfig(steps1=2, steps2=3, prior=False, lr2=1e-3, save_dtype="fp32", checkpoint_every=1)
    straight = learn(*args, config, base_model=str(tiny_model), name="straight")
    real_save, saves = torch_module.save, []

    def full_disk_in_phase_2(state, path, *a, **k):
        saves.append(state["phase"])
        if state["phase"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, path, *a, **k)

    monkeypatch.setattr(checkpoints, "FINAL_AFTER_SECONDS", -1.0)  # the insurance save is tried too
    monkeypatch.setattr(torch_module, "save", full_disk_in_phase_2)
    messages = []
    result = learn(*args, config, base_model=str(tiny_model), name="full", report=messages.append)
    warnings = [m.text for m in messages if "could not write the checkpoint" in getattr(m, "text", "")]
    assert saves.count(2) == 3 and len(warnings) == 3, (saves, warnings)  # steps 1 and 2, and the insurance
    assert all("no space left on device" in w.lower() and "training goes on" in w for w in warnings)
    _same(straight.path, result.path, "unet")
    assert not checkpoint_path("full").exists()


def test_a_rerun_without_resume_never_replaces_an_interrupted_runs_checkpoint(scene_files, tiny_model, tmp_path):
    """Up-arrow and Enter after a Ctrl-C (no --resume) replaced the checkpoint at the end
    of phase 1, with all the training it held; it is refused, before any model loads,
    and --force starts over. The dead run's temporaries are cleared first."""
    from scenebreak.paths import HOST_TAG

    args = ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]), "--base-model", str(tiny_model),
            "--steps1", "1", "--steps2", "2", "--no-prior", "--name", "cut"]
    with pytest.raises(Killed):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=2, prior=False),
              base_model=str(tiny_model), name="cut", report=kill_at(2, 1))
    checkpoint = checkpoint_path("cut")
    before = checkpoint.read_bytes()
    stale = checkpoint.parent / f".{checkpoint.name}.{HOST_TAG}-999999999-abcd.tmp"
    stale.write_bytes(b"x" * 1000)  # a checkpoint write a kill cut short
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 2 and "left a checkpoint" in again.stderr and "--resume" in again.stderr, again.output
    assert checkpoint.read_bytes() == before and not stale.exists()
    forced = CliRunner().invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0 and "starting over" in forced.stderr, forced.output
    assert not checkpoint.exists()


@pytest.mark.parametrize("damage", ["no seconds", "no phase"])
def test_a_checkpoint_of_another_version_is_one_line(scene_files, tiny_model, damage):
    """A checkpoint missing a part (another version of scenebreak) was `KeyError: 'seconds'`."""
    from scenebreak.errors import InvalidInput

    args = (scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=2, prior=False))
    with pytest.raises(Killed):
        learn(*args, base_model=str(tiny_model), name="old", report=kill_at(2, 1))
    state = torch.load(checkpoint_path("old"), weights_only=True)
    state.pop("seconds" if damage == "no seconds" else "phase")
    torch.save(state, checkpoint_path("old"))
    with pytest.raises(InvalidInput, match="damaged or from another version of scenebreak.*--force in place of --resume"):
        learn(*args, base_model=str(tiny_model), name="old", resume=True)


def test_room_is_asked_for_what_tune_auto_chooses(scene_files, tiny_model, monkeypatch):
    """--tune auto counted as full tuning before the model loaded: FLUX.1 (always LoRA
    under auto) was asked for some 220 GiB of disk, SDXL for 48 GiB where auto picks
    LoRA. LoRA's room is asked first, full tuning's once auto has chosen it."""
    import scenebreak.train.learn as learn_module
    from scenebreak.paths import checkpoints_dir

    asked = []
    monkeypatch.setattr(learn_module, "check_room", lambda needs, fix: asked.append(
        {str(folder): count for folder, count in needs}))
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                   base_model=str(tiny_model), name="roomy")
    assert load_scene(result.path).meta["tuning"] == "full" and len(asked) == 2  # LoRA's, then full tuning's
    folder = str(checkpoints_dir())
    assert asked[1][folder] > asked[0][folder]
    asked.clear()
    learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False, tune="full"),
          base_model=str(tiny_model), name="full-asked")
    assert len(asked) == 1  # asked for full tuning: its room at once, once


def test_room_is_asked_for_two_checkpoints_when_one_replaces_another(scene_files, tiny_model, monkeypatch):
    import scenebreak.train.learn as learn_module

    asked = {}

    def check_room(needs, fix):
        asked[len(asked)] = dict((str(folder), count) for folder, count in needs)
        raise learn_module.InvalidInput("stop here")

    monkeypatch.setattr(learn_module, "check_room", check_room)
    for every in (0, 10):
        with pytest.raises(learn_module.InvalidInput):
            learn(scene_files["image"], scene_files["masks"], LearnConfig(checkpoint_every=every), base_model=str(tiny_model))
    folder = str(checkpoint_path("x").parent)
    assert asked[1][folder] == 2 * asked[0][folder] > 0


def test_a_nan_loss_stops_with_the_last_good_checkpoint(scene_files, tiny_model, monkeypatch):
    import scenebreak.train.trainer

    real = scenebreak.train.trainer.masked_diffusion_loss
    calls = []

    def goes_nan(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("nan") if len(calls) >= 5 else loss  # phase 2, step 3

    monkeypatch.setattr(scenebreak.train.trainer, "masked_diffusion_loss", goes_nan)
    result = CliRunner().invoke(cli, ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                                      "--base-model", str(tiny_model), "--steps1", "2", "--steps2", "4", "--no-prior",
                                      "--checkpoint-every", "1", "--name", "nan"])
    assert result.exit_code == 1 and "lower learning rate" in result.stderr.replace("a lower", "lower"), result.output
    state = torch.load(checkpoint_path("nan"), weights_only=True)
    assert (state["phase"], state["step"]) == (2, 2)
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in state["history"][2])


def test_resume_across_an_optimizer_change_warns_and_finishes(scene_files, tiny_model):
    """Out of memory, then --memory low with 8-bit AdamW: the moments cannot be carried
    over, so they start fresh, with a warning (here a checkpoint marked as 8-bit)."""
    config = LearnConfig(steps1=2, steps2=3, prior=False, checkpoint_every=1)
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(Killed):
        learn(*args, base_model=str(tiny_model), name="kind", report=kill_at(2, 2))
    state = torch.load(checkpoint_path("kind"), weights_only=True)
    state["optimizer_kind"] = "adamw8bit"
    torch.save(state, checkpoint_path("kind"))
    messages = []
    learn(*args, base_model=str(tiny_model), name="kind", resume=True, report=messages.append)
    assert any("optimizer changed" in getattr(m, "text", "") for m in messages)
    # From the end of phase 1, whose optimizer phase 2 replaces anyway: nothing is lost, no warning.
    with pytest.raises(Killed):
        learn(*args, base_model=str(tiny_model), name="boundary", report=kill_at(2, 1))
    state = torch.load(checkpoint_path("boundary"), weights_only=True)
    assert (state["phase"], state["step"]) == (1, 2)
    state["optimizer_kind"] = "adamw8bit"
    torch.save(state, checkpoint_path("boundary"))
    messages = []
    learn(*args, base_model=str(tiny_model), name="boundary", resume=True, report=messages.append)
    assert not any("optimizer changed" in getattr(m, "text", "") for m in messages)
    assert not any("another version" in getattr(m, "text", "") for m in messages)


def test_a_checkpoint_of_another_version_resumes_saying_the_result_will_differ(scene_files, tiny_model):
    """A checkpoint from before the class images were dealt once per round resumed with
    another sequence of them, silently: its result matched neither version's run."""
    config = LearnConfig(steps1=2, steps2=2, num_class_images=2, checkpoint_every=1)
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(Killed):
        learn(*args, base_model=str(tiny_model), name="old", report=kill_at(2, 1))
    state = torch.load(checkpoint_path("old"), weights_only=True)
    assert state["format"] == 2
    del state["format"]  # as written before formats were numbered
    torch.save(state, checkpoint_path("old"))
    messages = []
    learn(*args, base_model=str(tiny_model), name="old", resume=True, report=messages.append)
    assert any("another version of scenebreak" in getattr(m, "text", "") and m.level == "warning" for m in messages)


def test_optimizer_in_backward_refuses_another_layout():
    from scenebreak.train.optim import OptimizerInBackward

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    make = lambda groups: torch.optim.AdamW(groups, lr=1e-3)  # noqa: E731
    one_group = OptimizerInBackward([{"params": [a]}], make, None).state_dict()
    two_groups = OptimizerInBackward([{"params": [a], "lr": 1}, {"params": [b], "lr": 2}], make, None)
    with pytest.raises(ValueError, match="does not fit"):
        two_groups.load_state_dict(one_group)


def test_a_second_learn_of_the_same_name_is_refused_at_once(scene_files, tiny_model):
    code = ("import sys, time\nfrom scenebreak.train.locks import scene_lock\nwith scene_lock('busy'):\n"
            "    print('locked', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = ["learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]), "--base-model", str(tiny_model),
                "--steps1", "1", "--steps2", "0", "--no-prior", "--name", "busy"]
        started = time.monotonic()
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1 and f"process {holder.pid}" in result.stderr and "--force" in result.stderr
        assert time.monotonic() - started < 10  # at once, before any model loads
        forced = CliRunner().invoke(cli, [*args, "--force"])
        assert forced.exit_code == 0 and "--force runs anyway" in forced.stderr, forced.output
    finally:
        holder.kill()
        holder.wait()


def test_a_forced_learn_holds_the_lock_when_it_is_free(scene_files, tiny_model, monkeypatch):
    """--force skipped the lock altogether: a third run of the name was not refused while
    the forced one ran, and the two wrote one checkpoint."""
    from scenebreak.train import learn as learn_module
    from scenebreak.train.locks import Busy, scene_lock

    seen = []

    def during(*args, **kwargs):
        with pytest.raises(Busy):
            with scene_lock("forced"):
                pass
        seen.append("refused")
        raise learn_module.InvalidInput("stop here")

    monkeypatch.setattr(learn_module, "_learn", during)
    with pytest.raises(learn_module.InvalidInput, match="stop here"):
        learn(scene_files["image"], scene_files["masks"], LearnConfig(), base_model=str(tiny_model), name="forced",
              force=True)
    assert seen == ["refused"]


def test_replace_replaces_but_never_runs_beside_another_learn_of_the_name(scene_files, tiny_model, monkeypatch):
    """`batch` replaces its own earlier scene: with force it also ran past another
    `learn` of that name that took the lock in the gap, the two sharing a checkpoint."""
    from scenebreak.train import learn as learn_module
    from scenebreak.train.locks import Busy, scene_lock

    monkeypatch.setattr(learn_module, "_learn", lambda *args, **kwargs: "ran")
    args = (scene_files["image"], scene_files["masks"], LearnConfig())
    with scene_lock("held"):
        with pytest.raises(Busy):
            learn(*args, base_model=str(tiny_model), name="held", replace=True)
        assert learn(*args, base_model=str(tiny_model), name="held", force=True) == "ran"
    assert learn(*args, base_model=str(tiny_model), name="held", replace=True) == "ran"


def _another_run_holding(folder, then) -> threading.Thread:
    """A thread that holds `folder`'s class-image lock (as another run making them),
    does `then()` half a second later and lets go; returned once it holds the lock."""
    from scenebreak.train.locks import class_images_lock

    holding = threading.Event()

    def run():
        with class_images_lock(folder):
            holding.set()
            time.sleep(0.5)
            then()

    thread = threading.Thread(target=run)
    thread.start()
    holding.wait()
    return thread


def test_class_images_made_by_another_run_are_waited_for_and_reused(tiny_model):
    from scenebreak.train.classimages import class_image_paths, ensure_class_images
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components

    components = load_components(str(tiny_model))
    paths = class_image_paths(components.base.fingerprint, "a photo", 64, 2, components.family)
    paths[0].parent.mkdir(parents=True)

    def other_run():
        from PIL import Image

        for path in paths:
            Image.new("RGB", (64, 64)).save(path)

    thread = _another_run_holding(paths[0].parent, other_run)
    messages = []
    assert ensure_class_images(components, choose_device("cpu"), "a photo", 2, 64, report=messages.append) == paths
    thread.join()
    texts = [m.text for m in messages]
    assert any("waiting for" in t for t in texts) and not any("generating" in t for t in texts)


def test_class_images_claimed_by_a_fine_tune_while_this_run_waited_are_made_in_a_folder_of_its_own(tiny_model,
                                                                                                       monkeypatch):
    """A fine-tune of the same base (same fingerprint, other weights) took the shared
    folder while this run waited on its lock: this run's images are not mixed into it."""
    from PIL import Image

    import scenebreak.train.classimages as classimages
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components

    components = load_components(str(tiny_model))
    assert components.base.weights
    shared = classimages.class_image_paths(components.base.fingerprint, "a photo", 64, 2, components.family,
                                           weights=components.base.weights)
    shared[0].parent.mkdir(parents=True)

    def fine_tunes_run():
        (shared[0].parent / classimages.MADE_BY).write_text("the fine-tune's weights\n")
        for path in shared:
            Image.new("RGB", (64, 64), (9, 9, 9)).save(path)

    made = []

    def make(components, device, prompt, resolution, amp_dtype, todo, *rest):
        classimages.claim(todo[0][1].parent, components.base.weights)
        for _, path in todo:
            made.append(path)
            Image.new("RGB", (64, 64), (1, 2, 3)).save(path)

    monkeypatch.setattr(classimages, "_make", make)
    thread = _another_run_holding(shared[0].parent, fine_tunes_run)
    paths = classimages.ensure_class_images(components, choose_device("cpu"), "a photo", 2, 64)
    thread.join()
    assert paths[0].parent != shared[0].parent and made == paths
    assert classimages._made_by(paths[0].parent) == components.base.weights
    with Image.open(shared[0]) as image:
        assert image.getpixel((0, 0)) == (9, 9, 9)  # the fine-tune's images untouched


def test_a_damaged_cached_class_image_is_made_again(tiny_model):
    """An empty or cut PNG in the cache (a power cut, a full disk) made every later learn
    of that base and prompt fail reading it; it is made again instead."""
    from PIL import Image

    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components
    from scenebreak.train.classimages import class_image_paths, ensure_class_images

    components = load_components(str(tiny_model))
    paths = class_image_paths(components.base.fingerprint, "a photo", 64, 3, components.family)
    paths[0].parent.mkdir(parents=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(paths[0])
    paths[1].write_bytes(b"")
    paths[2].write_bytes(paths[0].read_bytes()[:40])
    messages = []
    assert ensure_class_images(components, choose_device("cpu"), "a photo", 3, 64, report=messages.append) == paths
    assert any("generating 2 class images" in getattr(m, "text", "") for m in messages)
    for path in paths:
        with Image.open(path) as image:
            image.load()
    with Image.open(paths[0]) as image:
        assert image.getpixel((0, 0)) == (1, 2, 3)  # the whole one is kept


def test_a_write_reaches_the_disk_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    """No fsync anywhere: after a power cut a rename could publish an empty scene or
    checkpoint (XFS; ext4 for new names), and the checkpoint was deleted after it."""
    import os

    import scenebreak.paths as paths

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("names open files through /proc (Linux)")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(paths.os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(paths.os, "replace", lambda a, b: events.append(("replace", str(b))) or real_replace(a, b))
    paths.write_atomically(tmp_path / "a.scene", lambda tmp: tmp.write_bytes(b"weights"))
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace", "fsync"], events
    assert events[0][1].endswith(".tmp") and events[2][1] == str(tmp_path)

    def folder(tmp):
        (tmp / "sub").mkdir(parents=True)
        (tmp / "sub" / "x.png").write_bytes(b"x")
    events.clear()
    paths.write_atomically(tmp_path / "images", folder)
    synced = [where for kind, where in events if kind == "fsync"]
    assert any(where.endswith("x.png") for where in synced) and synced[-1] == str(tmp_path)


def test_a_folder_is_replaced_by_renames_and_a_kill_between_loses_neither(tmp_path, monkeypatch):
    """The old folder was deleted before the new one was renamed in: a kill between lost
    the old, and the new sat in a temporary the next write removed as stale."""
    import os

    import scenebreak.paths as paths

    def images(names):
        def write(tmp):
            tmp.mkdir()
            for name in names:
                (tmp / name).write_text(name)
        return write

    target = tmp_path / "images"
    paths.write_atomically(target, images(["a.png"]))
    paths.write_atomically(target, images(["b.png"]))
    assert sorted(p.name for p in target.iterdir()) == ["b.png"] and sorted(tmp_path.iterdir()) == [target]

    real_replace = os.replace

    def killed(source, destination):  # the old folder is aside, the new one never arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(paths.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        paths.write_atomically(target, images(["c.png"]))
    assert sorted(p.name for p in target.iterdir()) == ["b.png"]  # put back at once
    # A kill -9 at that point: the old folder aside under a dead process's name.
    monkeypatch.setattr(paths.os, "replace", real_replace)
    aside = tmp_path / f".images.{paths.HOST_TAG}-999999999-abcd.old"
    os.rename(target, aside)
    paths.settle_replaced_folder(target)
    assert sorted(p.name for p in target.iterdir()) == ["b.png"] and not aside.exists()


def test_class_images_of_a_quantised_base_are_kept_apart():
    """Class images made by the base in 4 bits were reused by full-precision runs."""
    from scenebreak.families import family_named
    from scenebreak.train.classimages import cache_folder

    family = family_named("SD 2.x")
    plain = cache_folder("f", "a photo", 512, family)
    assert plain == cache_folder("f", "a photo", 512, family, quantized="none")  # earlier caches keep their folder
    assert len({plain, cache_folder("f", "a photo", 512, family, quantized="nf4"),
                cache_folder("f", "a photo", 512, family, quantized="int8")}) == 3


def test_two_learns_in_parallel_share_the_class_images(scene_files, tiny_model, tmp_path):
    """The batch recipe (`xargs -P 2`): two photos at once, one cache of class images."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-m", "scenebreak", "learn", str(scene_files["image"]), "--masks",
                              *map(str, scene_files["masks"]), "--base-model", str(tiny_model), "--steps1", "1", "--steps2", "1",
                              "--num-class-images", "2", "--name", f"p{i}"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sum("generating 2 class images" in err for _, err in outputs) == 1, outputs
    folder = Path(os.environ["SCENEBREAK_HOME"]) / "class-images"
    assert len(list(folder.rglob("*.png"))) == 2


def test_a_ctrl_c_during_the_trainers_clean_up_propagates_instead_of_printing_a_traceback(capsys):
    """The second Ctrl-C of a quick pair can land while the trainer's generator cleans
    up after the checkpoint; closed when collected, Python would print it as
    "Exception ignored in <generator>" with a traceback (seen once in CI)."""
    from types import SimpleNamespace

    from scenebreak.device import choose_device
    from scenebreak.errors import Interrupted
    from scenebreak.train.learn import _train

    class Trainer:
        config, phase, step = SimpleNamespace(steps1=2, steps2=0, compile=False), 1, 0

        def run(self):
            try:
                yield SimpleNamespace(phase=1, step=1, total=2, loss=0.5, losses={})
                yield SimpleNamespace(phase=1, step=2, total=2, loss=0.5, losses={})
            finally:
                raise KeyboardInterrupt  # the second Ctrl-C, during the clean-up

    class Checkpoints:
        def after_step(self, trainer, record, stop):
            raise Interrupted("interrupted: checkpoint saved")

    with pytest.raises(KeyboardInterrupt):
        _train(Trainer(), Checkpoints(), lambda: True, choose_device("cpu"), lambda event: None)
    assert "Exception ignored" not in capsys.readouterr().err


def test_class_images_out_of_memory_are_made_fewer_at_a_time_to_the_same_images(tiny_model, tmp_path, monkeypatch):
    """A pass of several class images that runs out of GPU memory is made again with half
    as many at a time, down to one; each image is its seed's either way. Any other error,
    or running out with one image a pass, still stops."""
    import numpy as np
    from PIL import Image

    import scenebreak.sample.pipeline as pipeline
    from helpers import out_of_memory_above_one_image
    from scenebreak.device import choose_device
    from scenebreak.families.base_model import load_components
    from scenebreak.train.classimages import ensure_class_images

    components, cpu = load_components(str(tiny_model)), choose_device("cpu")
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "one-by-one"))
    single = ensure_class_images(components, cpu, "a photo", 3, 64, batch_size=1)
    expected = [np.asarray(Image.open(p)) for p in single]

    passes = out_of_memory_above_one_image(monkeypatch)
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "shrinking"))
    messages = []
    paths = ensure_class_images(components, cpu, "a photo", 3, 64, batch_size=4, report=messages.append)
    assert passes == [3, 2, 1, 1, 1]
    assert [m.text for m in messages if "out of memory" in getattr(m, "text", "")] == [
        "out of memory making 3 class images at a time: 2 at a time now",
        "out of memory making 2 class images at a time: 1 at a time now"]
    assert all(np.array_equal(np.asarray(Image.open(p)), e) for p, e in zip(paths, expected))

    monkeypatch.setattr(pipeline, "sample", lambda *args, **kwargs: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "too-big"))
    with pytest.raises(torch.OutOfMemoryError):
        ensure_class_images(components, cpu, "a photo", 1, 64, batch_size=1)
    monkeypatch.setattr(pipeline, "sample", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("a shape")))
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "other"))
    with pytest.raises(RuntimeError, match="a shape"):
        ensure_class_images(components, cpu, "a photo", 2, 64, batch_size=2)


def test_on_windows_a_checkpoint_is_read_whole_and_files_are_flushed_through_a_writable_handle(monkeypatch, tmp_path):
    """Windows cannot replace a file that is memory-mapped, and a resumed run's next
    checkpoint replaces the one it resumed from (every later save failed there, the one on
    Ctrl-C with it); and it flushes a file only through a handle that may write (fsync of
    a read-only one fails, and was silently skipped)."""
    from scenebreak import paths
    from scenebreak.train import checkpoints

    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or {"identity": "other"})
    saved = checkpoints.Checkpoints("win", {"source": "x"}, every=1, steps2=1)
    saved.path.parent.mkdir(parents=True, exist_ok=True)
    saved.path.write_bytes(b"checkpoint")
    for windows in (False, True):
        monkeypatch.setattr(checkpoints, "ON_WINDOWS", windows)
        with pytest.raises(CheckpointMismatch, match="other inputs"):
            saved.load(lambda event: None)
    assert [k["mmap"] for k in loads] == [True, False]

    synced = []
    monkeypatch.setattr(paths, "_fsync", lambda path, flags: synced.append((Path(path).name, flags)))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_bytes(b"x")
    for windows in (False, True):
        monkeypatch.setattr(paths, "ON_WINDOWS", windows)
        paths.flush_to_disk(tmp_path / "d")
    assert synced[:2] == [("f", os.O_RDONLY), ("d", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))]
    assert synced[2:] == [("f", os.O_RDWR)]  # and no folder: Windows cannot open one to sync it


def test_sigterm_stops_learn_as_ctrl_c_does_but_exits_143(monkeypatch):
    """SIGTERM (a supervisor, `kill`, `docker stop`) saves a checkpoint as Ctrl-C does; it
    then left with Ctrl-C's 130, not the 143 the docs and a shell give SIGTERM. SIGHUP
    (the ssh session closed) killed learn with no checkpoint at all: it saves one too,
    and from then on writes nowhere (the terminal is gone: writing to it fails)."""
    import scenebreak.train.checkpoints as checkpoints
    from scenebreak.errors import HungUp, Interrupted, Terminated
    from scenebreak.train.checkpoints import StopFlag, catch_interrupts

    quieted = []
    monkeypatch.setattr(checkpoints, "quiet_dead_terminal", lambda: quieted.append(True))
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)):
        flag, heard = StopFlag(), []
        with pytest.raises(Interrupted) as stopped:
            with catch_interrupts(flag, heard.append):
                os.kill(os.getpid(), sig)
                while not flag():  # the handler runs between bytecodes of the main thread
                    time.sleep(0.01)
                raise Interrupted("interrupted: checkpoint saved; run the same command with --resume to continue")
        assert stopped.value.exit_code == code and isinstance(stopped.value, Terminated) == (code != 130), sig
        assert isinstance(stopped.value, HungUp) == (code == 129) and bool(quieted) == (code == 129)
        assert "--resume" in str(stopped.value) and len(heard) == 1


def test_a_ctrl_c_that_lands_inside_the_reporters_write_still_stops_with_a_checkpoint():
    """The handler says "stopping after this step" through the reporter; a Python
    caller's `print` reporter, interrupted inside its own write to stdout, raises
    "reentrant call" there, and learn died of it without its checkpoint."""
    from scenebreak.errors import Interrupted
    from scenebreak.train.checkpoints import StopFlag, catch_interrupts

    def print_to_stdout(event):  # as print does when the signal landed inside print
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

    flag = StopFlag()
    with pytest.raises(Interrupted):
        with catch_interrupts(flag, print_to_stdout):
            os.kill(os.getpid(), signal.SIGINT)
            while not flag():
                time.sleep(0.01)
            raise Interrupted("interrupted: checkpoint saved; run the same command with --resume to continue")


def test_a_hang_up_stops_a_batch_or_the_page_as_sigterm_does(monkeypatch):
    import scenebreak.errors as errors

    monkeypatch.setattr(errors, "quiet_dead_terminal", lambda: None)
    for sig, kind, said in ((signal.SIGTERM, errors.Terminated, "terminated (SIGTERM): "),
                            (signal.SIGHUP, errors.HungUp, "the terminal closed (SIGHUP): ")):
        with pytest.raises(kind) as stopped:
            with errors.sigterm_stops("the running jobs saved their checkpoints"):
                os.kill(os.getpid(), sig)
                time.sleep(5)
        assert str(stopped.value) == said + "the running jobs saved their checkpoints"


def test_a_resume_whose_frozen_weights_wait_in_another_precision_is_warned_about(scene_files, tiny_model, monkeypatch):
    """Under bf16 autocast, LoRA with --memory low keeps the frozen base in bf16 on a
    CPU, with --memory fast in fp32: a resume that changes --memory (allowed: after
    running out of memory) changes the numbers, as a resume on another device does,
    and now says so as that one does."""
    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")
    config = LearnConfig(steps1=2, steps2=2, prior=False, tune="lora", rank=2, memory="fast", checkpoint_every=1)
    args = (scene_files["image"], scene_files["masks"])
    with pytest.raises(Killed):
        learn(*args, config, base_model=str(tiny_model), name="held", report=kill_at(2, 2))
    messages = []
    learn(*args, dataclasses.replace(config, memory="low"), base_model=str(tiny_model), name="held", resume=True,
          report=messages.append)
    assert any("frozen weights held in bf16" in getattr(m, "text", "") for m in messages)


def test_ctrl_break_on_windows_stops_learn_and_a_batch_as_ctrl_c_does(monkeypatch):
    """Windows' Ctrl-Break (SIGBREAK) ended the process on the spot: no checkpoint, no
    line. (Played here by SIGUSR1 standing in for a SIGBREAK this platform lacks.)"""
    import scenebreak.errors as errors
    from scenebreak.train.checkpoints import StopFlag, catch_interrupts

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    assert errors.stop_signals()[signal.SIGBREAK] is errors.Interrupted
    flag, heard = StopFlag(), []
    with pytest.raises(errors.Interrupted) as stopped:
        with catch_interrupts(flag, heard.append):
            os.kill(os.getpid(), signal.SIGBREAK)
            while not flag():
                time.sleep(0.01)
            raise errors.Interrupted("interrupted: checkpoint saved; run the same command with --resume to continue")
    assert stopped.value.exit_code == 130 and "--resume" in str(stopped.value) and len(heard) == 1
    with pytest.raises(errors.Interrupted) as stopped:
        with errors.sigterm_stops("the running jobs saved their checkpoints"):
            os.kill(os.getpid(), signal.SIGBREAK)
            time.sleep(5)
    assert str(stopped.value) == "interrupted (Ctrl-Break): the running jobs saved their checkpoints"
    assert type(stopped.value) is errors.Interrupted


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("swallowed", [False, True])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_while_the_models_load_ends_the_run_before_training(signum, swallowed, scene_files, tiny_model,
                                                                    monkeypatch):
    """SIGTERM while the base loaded killed learn without a word (and in the seconds of
    an import no handler was set); a Ctrl-C that landed inside a library's bare
    `except:` (mpmath's import of gmpy2) was lost, and the run trained on to exit 0."""
    from scenebreak.errors import Interrupted, Terminated
    from scenebreak.train import learn as learn_module

    loading = learn_module._load_inputs

    def load_and_be_stopped(*args, **kwargs):
        if swallowed:
            try:
                os.kill(os.getpid(), signum)
                time.sleep(0.5)  # (the handler runs here)
            except BaseException:  # noqa: BLE001 - a library's bare except
                pass
        else:
            os.kill(os.getpid(), signum)
            time.sleep(0.5)
        return loading(*args, **kwargs)

    monkeypatch.setattr(learn_module, "_load_inputs", load_and_be_stopped)
    kind = Terminated if signum == signal.SIGTERM else Interrupted
    before = signal.getsignal(signal.SIGTERM)  # (default, or what an earlier test's Ray set)
    with pytest.raises(BaseException) as stopped:
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=2, prior=False),
              base_model=str(tiny_model), name="stopped-early")
    if signum == signal.SIGINT and not swallowed:
        assert isinstance(stopped.value, KeyboardInterrupt)  # (at once, as ever)
    else:
        assert isinstance(stopped.value, kind), stopped.value
        assert "stopped before the training began: nothing was learned or saved" in str(stopped.value)
        if kind is Terminated:
            assert str(stopped.value).startswith("terminated (SIGTERM): ")
    assert not checkpoint_path("stopped-early").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # (the handlers are put back)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_before_learn_begins_is_one_line_and_143(monkeypatch):
    """While torch imports, before learn's own handling: the process died without a line."""
    import scenebreak.train.learn as learn_module

    def terminated_at_once(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        raise AssertionError("not stopped")

    monkeypatch.setattr(learn_module, "learn", terminated_at_once)
    result = CliRunner().invoke(cli, ["learn", "photo.png", "--masks", "m.png"])
    assert result.exit_code == 143, result.output
    assert result.stderr.strip().splitlines()[-1] == ("Error: terminated (SIGTERM): stopped before the training began: "
                                                      "nothing was learned or saved")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_stop_while_the_scene_is_written_says_what_happens():
    """It said "stopping after this step to save a checkpoint", then wrote the scene and
    ended well, with no checkpoint saved."""
    from scenebreak.events import Message
    from scenebreak.train.checkpoints import StopFlag, catch_interrupts

    said, flag = [], StopFlag()
    flag.finishing = True
    with catch_interrupts(flag, said.append):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
    assert flag.requested and [m.text for m in said if isinstance(m, Message)] == [
        "the training is done: the scene is being written, then the run ends (press Ctrl-C again to abort now)"]


def test_a_stop_whose_checkpoint_cannot_be_written_says_what_is_kept(scene_files, tiny_model, monkeypatch):
    """A full disk when Ctrl-C's checkpoint was written said only "no space left on
    device": not that the run's earlier checkpoint is kept, nor how to go on from it."""
    import errno

    from scenebreak.errors import NoSpace
    from scenebreak.train.checkpoints import Checkpoints

    polls = []

    def stop_after_three_steps() -> bool:
        polls.append(1)
        return len(polls) > 3  # (the first poll comes before the training)

    saving, saves = Checkpoints.save, []

    def full_on_the_second(self, trainer, report=None):
        saves.append(1)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return saving(self, trainer, report)

    monkeypatch.setattr(Checkpoints, "save", full_on_the_second)
    with pytest.raises(NoSpace) as failed:
        learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=6, steps2=0, prior=False, checkpoint_every=2),
              base_model=str(tiny_model), name="full-stop", should_stop=stop_after_three_steps)
    assert str(failed.value) == ("stopped, but could not save the checkpoint of 'full-stop' (no space left on device); "
                                 "the one of phase 1, step 2 is kept: fix that and run the same command with --resume "
                                 "to train on from it")
    assert checkpoint_path("full-stop").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_stop_once_the_scene_is_written_changes_nothing(scene_files, tiny_model, monkeypatch):
    """Past the write (the memory given back, seconds on a big model), SIGTERM ended the
    run as "stopped before the training began", the scene written but not said."""
    from scenebreak.train import learn as learn_module

    from scenebreak.paths import scene_path

    def free_and_be_stopped():
        if scene_path("written-then-stopped").exists():  # (the call once the scene is written)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)

    monkeypatch.setattr(learn_module.kept, "free_memory", free_and_be_stopped)
    result = learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=1, steps2=1, prior=False),
                   base_model=str(tiny_model), name="written-then-stopped")
    assert load_scene(result.path).tokens == result.handles
