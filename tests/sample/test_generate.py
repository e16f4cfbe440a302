import pathlib

import numpy as np
import pytest
from PIL import Image

from scenebreak import GenerateConfig, generate
from scenebreak.errors import UnknownHandle

FAST = dict(steps=3)


def test_same_seed_same_image_and_paths(learned, tmp_path):
    first = generate(learned.path, ["<asset1> on the moon"], GenerateConfig(num_images=2, seed=11, **FAST), out_dir=tmp_path / "a")
    again = generate(learned.path, "<asset1> on the moon", GenerateConfig(num_images=1, seed=12, **FAST), out_dir=tmp_path / "b")
    assert [i.seed for i in first.images] == [11, 12]
    for image in first.images:
        assert image.path.exists() and Image.open(image.path).size == (64, 64)
    second_of_first = np.asarray(Image.open(first.images[1].path))
    assert np.array_equal(second_of_first, np.asarray(Image.open(again.images[0].path)))  # image i = seed + i
    assert not np.array_equal(np.asarray(Image.open(first.images[0].path)), second_of_first)


def test_files_are_never_overwritten(learned, tmp_path):
    config = GenerateConfig(seed=1, **FAST)
    a = generate(learned.path, "<asset2>", config, out_dir=tmp_path)
    b = generate(learned.path, "<asset2>", config, out_dir=tmp_path)
    assert a.images[0].path != b.images[0].path and a.images[0].path.exists()


def test_unknown_handle_lists_the_scene_handles(learned, tmp_path):
    with pytest.raises(UnknownHandle, match=r"<asset3>.*<asset1>, <asset2>"):
        generate(learned.path, ["<asset1> fine", "<asset3> on the moon"], GenerateConfig(**FAST), out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # checked before any image is made


def test_guidance_and_negative_prompt_change_the_image(learned, tmp_path):
    base = generate(learned.path, "<asset1>", GenerateConfig(seed=3, **FAST), out_dir=tmp_path)
    neg = generate(learned.path, "<asset1>", GenerateConfig(seed=3, negative="blue", **FAST), out_dir=tmp_path)
    low = generate(learned.path, "<asset1>", GenerateConfig(seed=3, guidance=1.5, **FAST), out_dir=tmp_path)
    a, b, c = (np.asarray(Image.open(r.images[0].path)) for r in (base, neg, low))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)  # each reaches the sampler


def test_batch_size_does_not_change_the_images(learned, tmp_path):
    one = generate(learned.path, "<asset1>", GenerateConfig(num_images=2, seed=4, batch_size=1, **FAST), out_dir=tmp_path / "one")
    two = generate(learned.path, "<asset1>", GenerateConfig(num_images=2, seed=4, batch_size=2, **FAST), out_dir=tmp_path / "two")
    for a, b in zip(one.images, two.images):
        diff = np.abs(np.asarray(Image.open(a.path), dtype=int) - np.asarray(Image.open(b.path), dtype=int))
        assert diff.max() <= 1  # the same image, up to rounding


def test_cpu_users_are_told_how_long_sampling_takes():
    from types import SimpleNamespace

    import torch

    from scenebreak.device import choose_device
    from scenebreak.families import family_named
    from scenebreak.sample.sampling import warn_cpu_time

    pipe = SimpleNamespace(unet=SimpleNamespace(parameters=lambda: [torch.empty(865_910_724, dtype=torch.uint8)]),
                           device=choose_device("cpu").torch)
    sd21 = SimpleNamespace(pipe=pipe, autocast_dtype=None, scene=SimpleNamespace(family=family_named("SD 2.x")))
    messages = []
    warn_cpu_time(sd21, 50, 512 * 512, messages.append)  # one image, 50 steps in fp32
    assert len(messages) == 1 and "roughly 10 min" in messages[0].text and messages[0].level == "warning"
    warn_cpu_time(sd21, 2, 64 * 64, messages.append)  # seconds: nothing to say
    assert len(messages) == 1
    warn_cpu_time(SimpleNamespace(pipe=pipe, autocast_dtype=torch.bfloat16, scene=sd21.scene), 25, 512 * 512, messages.append)
    assert "roughly 3 min" in messages[-1].text  # the default: DPM-Solver++ 25 steps under bf16


def test_large_batches_are_decoded_a_few_images_at_a_time_to_the_same_pixels(tiny_model):
    """The VAE decodes at most PIXELS_PER_DECODE output pixels per call (four 1024x1024
    images at once would want ~10 GB beside the denoiser): a batch decoded image by
    image gives the pixels of the batch decoded whole."""
    import torch
    from diffusers import AutoencoderKL

    from scenebreak.sample import pipeline

    vae = AutoencoderKL.from_pretrained(tiny_model / "vae")
    calls = []
    real = vae.decode
    vae.decode = lambda x: calls.append(len(x)) or real(x)
    latents = torch.randn(5, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    whole = pipeline.decode_latents(vae, latents)
    assert calls == [5]  # 5 images of 64x64: one call
    calls.clear()
    one_by_one = pipeline.decode_latents(vae, latents, max_pixels=64 * 64)
    assert calls == [1] * 5 and one_by_one.shape == whole.shape == (5, 3, 64, 64)
    assert torch.allclose(one_by_one, whole, atol=1e-5)
    calls.clear()
    pipeline.decode_latents(vae, latents, max_pixels=2 * 64 * 64 + 1)
    assert calls == [2, 2, 1]
    # The default: eight 512x512 images per call, two at 1024x1024.
    assert pipeline.PIXELS_PER_DECODE // (512 * 512) == 8 and pipeline.PIXELS_PER_DECODE // (1024 * 1024) == 2


def test_generate_makes_fewer_images_a_pass_after_running_out_of_memory(learned, tmp_path, monkeypatch):
    """`generate -n 3` with passes of 4 that run out of GPU memory: halved passes with a
    note, the same three images as one at a time."""
    from helpers import out_of_memory_above_one_image

    config = GenerateConfig(num_images=3, steps=2, seed=5, batch_size=1)
    expected = [np.asarray(Image.open(i.path)) for i in generate(learned.path, "a photo of <asset1>", config,
                                                                   out_dir=tmp_path / "single", device="cpu").images]
    passes = out_of_memory_above_one_image(monkeypatch)
    messages = []
    result = generate(learned.path, "a photo of <asset1>", GenerateConfig(num_images=3, steps=2, seed=5, batch_size=4),
                      out_dir=tmp_path / "shrinking", device="cpu", report=messages.append)
    assert passes == [3, 2, 1, 1, 1]
    assert [m.text for m in messages if "out of memory" in getattr(m, "text", "")] == [
        "out of memory making 3 images at a time: 2 at a time now",
        "out of memory making 2 images at a time: 1 at a time now"]
    assert [i.seed for i in result.images] == [5, 6, 7]
    assert all(np.array_equal(np.asarray(Image.open(i.path)), e) for i, e in zip(result.images, expected))


def test_generate_stops_after_a_pass_when_asked_keeping_what_it_wrote(learned, tmp_path):
    """The page's Ctrl-C (and its Cancel) waited, silent, for every image of a generate."""
    from scenebreak.errors import Interrupted

    asked = []

    def should_stop():
        asked.append(1)
        return True

    with pytest.raises(Interrupted, match=r"stopped: 1 image\(s\) written"):
        generate(learned.path, "a photo of <asset1>", GenerateConfig(num_images=3, steps=2, batch_size=1),
                 out_dir=tmp_path, should_stop=should_stop)
    assert len(asked) == 1 and len(list(tmp_path.glob("*.png"))) == 1
    # Asked after the last pass too, it has nothing left to stop: the result comes back.
    result = generate(learned.path, "a photo of <asset1>", GenerateConfig(num_images=1, steps=2), out_dir=tmp_path / "b",
                      should_stop=lambda: True)
    assert len(result.images) == 1


@pytest.mark.parametrize("command, args, written", [
    ("generate", ["<asset1>", "-n", "3", "--batch-size", "1"], 1),
    ("extract-bg", ["-n", "3", "--batch-size", "1"], 2),  # the plate, then one variation
])
@pytest.mark.parametrize("json_", [False, True])
@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "SIGHUP", "full disk"])
def test_ctrl_c_prints_the_images_already_written(learned_background, tmp_path, monkeypatch, command, args, written,
                                                  json_, stop):
    """Ctrl-C kept the images written so far but printed none: exit 130 with stdout
    empty, so a script reading it lost them. They are printed as a whole run's. So
    with SIGTERM (`timeout`, `docker stop`) and SIGHUP, which killed the run at once,
    and with a failure part-way (a full disk)."""
    import errno
    import json
    import os
    import signal

    from click.testing import CliRunner

    import scenebreak.sample.pipeline as pipeline
    from scenebreak.cli.commands import cli

    real, calls = pipeline.sample, []

    def sample(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            if stop == "SIGINT":
                raise KeyboardInterrupt  # (as Python's own handler does)
            if stop == "full disk":  # (a failure part-way: the images written are printed too)
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "next.png"))
            os.kill(os.getpid(), getattr(signal, stop))
        return real(*a, **k)

    def unhandled(signum, frame):  # (the default would kill the test run itself)
        raise AssertionError(f"{stop} was not turned into a clean stop")

    monkeypatch.setattr(pipeline, "sample", sample)
    before = {sig: signal.signal(sig, unhandled) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        result = CliRunner().invoke(cli, [command, str(learned_background.path), *args, "--steps", "1", "--seed", "0",
                                          "--out-dir", str(tmp_path), *(["--json"] if json_ else [])])
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert result.exit_code == {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129, "full disk": 1}[stop], result.output
    paths = json.loads(result.stdout)["paths"] if json_ else result.stdout.splitlines()
    assert len(paths) == written and all(pathlib.Path(p).is_file() for p in paths)
    assert sorted(map(str, tmp_path.glob("*.png"))) == sorted(paths)


def test_each_image_carries_what_made_it(learned, tmp_path):
    """A1111's "parameters" (its PNG Info tab reads them) and scenebreak's own JSON: the
    image can be made again from the file alone."""
    import json

    from PIL import Image

    from scenebreak import GenerateConfig, generate
    from scenebreak.device import cpu_has_bf16

    result = generate(learned.path, "<asset1> on the moon", GenerateConfig(steps=2, seed=7, negative="blurry"),
                      out_dir=tmp_path)
    info = Image.open(result.images[0].path).info
    assert info["parameters"].startswith("<asset1> on the moon\nNegative prompt: blurry\nSteps: 2, Sampler: DPM++ 2M, ")
    assert "Seed: 7" in info["parameters"] and "Model: photo" in info["parameters"]
    settings = json.loads(info["scenebreak"])
    assert settings["seed"] == 7 and settings["scene"] == "photo" and settings["steps"] == 2
    # What `auto` came to here (it recorded "auto": another machine's auto samples otherwise).
    assert settings["precision"] == result.settings["precision"] == ("bf16" if cpu_has_bf16() else "fp32")
    again = generate(learned.path, settings["prompt"], GenerateConfig(steps=settings["steps"], seed=settings["seed"],
                     scheduler=settings["scheduler"], negative=settings["negative"], precision=settings["precision"]),
                     out_dir=tmp_path / "again")
    assert (np.asarray(Image.open(again.images[0].path)) == np.asarray(Image.open(result.images[0].path))).all()


def test_image_names_fold_accents_as_scene_names_do():
    """"<asset1> in München" was named asset1-in-m-nchen, "café" caf."""
    from scenebreak.sample.sampling import slug

    assert slug("<asset1> in München") == "asset1-in-munchen"
    assert slug("a café in Zürich, ﬁne") == "a-cafe-in-zurich-fine"
    assert slug("<asset1> 東京") == "asset1" and slug("東京") == "image"


def test_a_generate_killed_mid_write_leaves_no_temporary_for_good(learned, tmp_path):
    """A killed run's half-written PNG stayed hidden in --out-dir: only a run writing the
    same name again removed it, and the next run (another seed) writes other names.
    A live run's temporary, and anything not scenebreak's, is left alone."""
    import os
    import subprocess
    import sys

    from scenebreak import GenerateConfig, generate
    from scenebreak.paths import HOST_TAG

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    left = out / f".photo-asset1-7.png.{HOST_TAG}-{dead_pid}-abcd.tmp"
    live = out / f".photo-asset1-8.png.{HOST_TAG}-{os.getpid()}-abcd.tmp"
    mine = out / ".my-notes.png.tmp"
    for path in (left, live, mine):
        path.write_bytes(b"half a png")
    generate(learned.path, "<asset1>", GenerateConfig(steps=1, seed=1), out_dir=out)
    assert not left.exists() and live.exists() and mine.exists()
