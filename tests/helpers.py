"""Plain helpers the tests share (the fixtures are in conftest.py): the synthetic photo
and its masks, learning a scene once, killing a learn at a given step, faking a card
that runs out of memory, and crafting hostile scenes from a real one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"  # files kept with the tests (a scene written by an older version)


def write_synthetic_scene(folder, size=(96, 80)):
    """A light photo with a red and a blue square of equal size, and their exact masks."""
    width, height = size
    image = np.full((height, width, 3), 230, np.uint8)
    m1 = np.zeros((height, width), np.uint8)
    m2 = np.zeros((height, width), np.uint8)
    image[8:40, 12:44] = (220, 30, 30)
    m1[8:40, 12:44] = 255
    image[42:74, 52:84] = (30, 30, 220)
    m2[42:74, 52:84] = 255
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "photo.png", folder / "red.png", folder / "blue.png"
    Image.fromarray(image).save(paths[0])
    Image.fromarray(m1).save(paths[1])
    Image.fromarray(m2).save(paths[2])
    return paths


class Killed(BaseException):
    """Stands for kill -9: nothing in scenebreak catches it, so no handler saves anything."""


def learn_whole_and_resumed(scene_files, base_model, config, kill: tuple[int, int] = (2, 2)):
    """The scene learned straight through ("whole"), and learned again ("cut"), killed at
    `kill` (phase, step) and resumed: their LearnResults, to compare."""
    from scenebreak import learn

    args = (scene_files["image"], scene_files["masks"], config)
    whole = learn(*args, base_model=str(base_model), name="whole")
    with pytest.raises(Killed):
        learn(*args, base_model=str(base_model), name="cut", report=kill_at(*kill))
    return whole, learn(*args, base_model=str(base_model), name="cut", resume=True)


def wait_for_checkpoint(process, name: str, phase: int = 2, step: int = 2, timeout: float = 120) -> None:
    """Wait until the process `process` (a learn or batch in another process) has
    checkpointed scene `name` at `phase`, step >= `step`; it must still be running then."""
    import time

    import torch

    from scenebreak.paths import checkpoint_path

    ckpt, deadline = checkpoint_path(name), time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if ckpt.exists():
            try:
                state = torch.load(ckpt, weights_only=True)
            except Exception:  # replaced while reading: look again
                continue
            if state["phase"] == phase and state["step"] >= step:
                break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"


def kill_at(phase: int, step: int):
    """A reporter that 'kills' the run (raises Killed) when it reports `step` of `phase`."""
    from scenebreak.events import Progress

    def report(event):
        if isinstance(event, Progress) and event.task == f"phase {phase}" and event.completed == step:
            raise Killed

    return report


def out_of_memory_above_one_image(monkeypatch) -> list[int]:
    """Sampling runs out of GPU memory for passes of more than one image (as a card the
    weights only just fit does at 1024); returns the size of every pass tried."""
    import torch

    import scenebreak.sample.pipeline as pipeline

    real_sample, passes = pipeline.sample, []

    def sample(pipe, family, prompt, seeds, **kwargs):
        passes.append(len(seeds))
        if len(seeds) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_sample(pipe, family, prompt, seeds, **kwargs)

    monkeypatch.setattr(pipeline, "sample", sample)
    return passes


# Few steps, few class images: enough to exercise every part of the method.
SMALL = dict(steps1=3, steps2=3, num_class_images=2)


def learn_once(root, tiny_model, config):
    """Learn the synthetic scene into `root` with its own scenebreak home."""
    import os

    from scenebreak import learn

    image, red, blue = write_synthetic_scene(root / "inputs")
    old = os.environ.get("SCENEBREAK_HOME")
    os.environ["SCENEBREAK_HOME"] = str(root / "home")
    try:
        return learn(image, [red, blue], config, base_model=str(tiny_model), device="cpu", output=root / "photo.scene")
    finally:
        if old is None:
            os.environ.pop("SCENEBREAK_HOME", None)
        else:
            os.environ["SCENEBREAK_HOME"] = old


def craft(source, target, meta=None, drop=(), add=None, tensors=None, text=None):
    """A copy of scene `source` with its metadata changed in place by `meta(dict)` (or
    replaced by the dict or list it returns), then as JSON text by `text(str)`, tensors
    dropped, added or replaced."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as f:
        header = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    data.update(add or {})
    data.update(tensors or {})
    info = json.loads(header["scenebreak"])
    if meta:
        returned = meta(info)
        info = returned if isinstance(returned, (dict, list)) else info
    written = json.dumps(info)
    save_file(data, str(target), metadata={"format": header["format"], "scenebreak": text(written) if text else written})
    return target


def set_meta(path: str, value):
    """A metadata edit: set the dotted `path` (list indices allowed) to `value`."""
    def edit(meta):
        node, keys = meta, path.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(keys[-1]) if isinstance(node, list) else keys[-1]] = value
    return edit


def tuned_copy(model: Path, folder: Path) -> Path:
    """A copy of the model folder `model` whose UNet weights moved a little: a fine-tune,
    with its base's configs and token table (its fingerprint), other weights."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    shutil.copytree(model, folder, dirs_exist_ok=True)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(1e-3)
    unet.save_pretrained(folder / "unet")
    return folder


def count_loads(monkeypatch, *classes) -> list[str]:
    """The names of `classes` in the order their instances are made (models loaded)."""
    loads: list[str] = []
    for cls in classes:
        original = cls.__init__

        def counting(self, *args, _original=original, _name=cls.__name__, **kwargs):
            loads.append(_name)
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return loads


def stop_after_first_step():
    """A `should_stop` for learn without class images to make (`prior=False`) that lets
    the training begin, then stops it after its first step (a checkpoint saved): its
    first poll, once the models have loaded, says go on."""
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 1

    return should_stop


def windows_file_rules(monkeypatch) -> None:
    """Windows' rule, kept on Linux: a file this process has mapped (safetensors' tensors
    are views of their file while they live) cannot be replaced or deleted there
    (PermissionError, "Access is denied"). Reads Linux's /proc/self/maps."""
    import os

    real_replace, real_unlink = os.replace, os.unlink

    def mapped(path) -> bool:
        target = os.path.realpath(path)
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any(len(fields := line.split(maxsplit=5)) == 6 and fields[5].rstrip("\n") == target for line in maps)

    def replace(src, dst, **kwargs):
        if os.path.exists(dst) and mapped(dst):
            raise PermissionError(13, "Access is denied (the file is mapped)", str(dst))
        return real_replace(src, dst, **kwargs)

    def unlink(path, **kwargs):
        if kwargs.get("dir_fd") is None and mapped(path):
            raise PermissionError(13, "Access is denied (the file is mapped)", str(path))
        return real_unlink(path, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(os, "remove", unlink)
