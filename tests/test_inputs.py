"""Inputs as people have them (16-bit, CMYK, palette and alpha images, bombs, non-ASCII
names), shell etiquette (closed pipes, Ctrl-C, quoted hints) and method details."""

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak.cli.commands import cli
from scenebreak.errors import InvalidInput
from scenebreak.images import load_image, load_masks, mask_array, prepare
from scenebreak.train.learn import default_name
from scenebreak.paths import check_name


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_png16(path, array: np.ndarray) -> None:
    """A 16-bit PNG (grey for (H, W), RGB for (H, W, 3)), written by hand: Pillow
    cannot save 16-bit colour."""
    height, width = array.shape[:2]
    colour_type = {2: 0, 3: 2}[array.ndim]
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# -- images as people have them ------------------------------------------------------------------

def test_16_bit_grey_photo_keeps_its_tones(scene_files, tmp_path):
    grey = np.asarray(Image.open(scene_files["image"]).convert("L")).astype(np.uint16) * 257
    grey[:4, :4] = 0
    write_png16(tmp_path / "photo16.png", grey)
    assert Image.open(tmp_path / "photo16.png").mode.startswith("I")
    loaded = np.asarray(load_image(tmp_path / "photo16.png"))
    assert np.abs(loaded[..., 0].astype(int) - grey // 257).max() <= 1  # not clipped to white
    prepared = prepare(tmp_path / "photo16.png", scene_files["masks"], 64)
    inside = np.asarray(prepared.image)[prepared.masks[0] == 1].mean()
    assert 60 < inside < 110  # the red square is mid-grey (Pillow's own conversion gave 255)


def test_16_bit_colour_photo_is_right(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 32896
    write_png16(tmp_path / "rgb16.png", rgb)
    assert tuple(np.asarray(load_image(tmp_path / "rgb16.png"))[0, 0]) == (255, 128, 0)


def test_cmyk_palette_and_alpha_photos_convert(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = np.asarray(load_image(tmp_path / "cmyk.jpg"))[4, 4]
    assert red[0] > 230 and red[1] < 30 and red[2] < 30

    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert tuple(np.asarray(load_image(tmp_path / "palette.png"))[0, 0]) == (0, 0, 255)
    palette.save(tmp_path / "palette-t.png", transparency=1)
    assert tuple(np.asarray(load_image(tmp_path / "palette-t.png"))[0, 0]) == (255, 255, 255)

    Image.new("LA", (8, 8), (100, 255)).save(tmp_path / "la.png")
    assert tuple(np.asarray(load_image(tmp_path / "la.png"))[0, 0]) == (100, 100, 100)
    Image.new("LA", (8, 8), (100, 0)).save(tmp_path / "la-clear.png")
    assert tuple(np.asarray(load_image(tmp_path / "la-clear.png"))[0, 0]) == (255, 255, 255)

    pa = Image.new("PA", (8, 8), (1, 128))  # PNG cannot hold PA: straight from Pillow
    pa.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    assert mask_array(pa).all()
    assert not mask_array(Image.new("PA", (8, 8), (1, 0))).any()


def test_mask_drawn_as_alpha_over_black_uses_its_alpha(tmp_path):
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[2:6, 3:9, 3] = 255  # black, opaque on the object, transparent elsewhere
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    mask = load_masks([tmp_path / "alpha.png"], (12, 10))[0]
    assert mask.sum() == 24 and mask[2:6, 3:9].all()

    la = np.zeros((10, 12, 2), np.uint8)
    la[5:, :, 1] = 200
    assert mask_array(Image.fromarray(la, "LA")).sum() == 60

    # Colour where it is visible still decides, and opaque black stays empty.
    rgba[2:4, 3:9, 0] = 255
    assert mask_array(Image.fromarray(rgba, "RGBA")).sum() == 12
    assert not mask_array(Image.new("RGBA", (4, 4), (0, 0, 0, 255))).any()


def test_16_bit_mask_is_read(tmp_path):
    mask = np.zeros((8, 8), np.uint16)
    mask[2:4, 2:4] = 1  # 1/65535: barely visible, but non-zero is inside
    write_png16(tmp_path / "mask16.png", mask)
    assert load_masks([tmp_path / "mask16.png"], (8, 8))[0].sum() == 4


def test_decompression_bomb_is_exit_2_with_size_and_fix(scene_files, tiny_model, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the photo is 96x80 = 7680 pixels
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model)
    assert result.exit_code == 2, result.output
    assert "96x80" in result.stderr and "downscale" in result.stderr
    assert "Traceback" not in result.output and "DecompressionBomb" not in result.stderr
    assert Image.MAX_IMAGE_PIXELS == 1000  # reading the size left the limit as it was

    with pytest.raises(InvalidInput, match="96x80"):
        load_image(scene_files["image"])


def test_big_photo_below_the_limit_loads_without_a_warning(scene_files, monkeypatch, recwarn):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # warning from 5000, error from 10000
    assert load_image(scene_files["image"]).size == (96, 80)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize("file_name, expected", [
    ("photo.jpg", "photo"),
    ("café au lait.jpg", "cafe-au-lait"),
    ("naïve résumé.png", "naive-resume"),
    ("x.scene.jpg", "x"),
    ("con.jpg", "con-scene"),  # Windows keeps CON, NUL, COM1, ... for devices
    ("NUL.backup.png", "NUL-scene.backup"),
    ("console.jpg", "console"),
])
def test_default_name_transliterates(file_name, expected):
    assert default_name(file_name) == expected
    assert check_name(expected, new=True) == expected


@pytest.mark.parametrize("name", ["con", "Aux", "nul.v2", "com1", "LPT9.x", "trailing."])
def test_names_windows_cannot_hold_are_refused_for_new_scenes_and_handles(name):
    """A scene travels: a name Windows keeps for a device (con.scene is the console there)
    or one ending in a dot (Windows drops it) could not be saved, nor its batch folder or
    exported files made, on Windows. A scene made before the rule still opens (and can
    be removed) by its name."""
    from scenebreak.handles import check_handle_tokens

    with pytest.raises(InvalidInput, match=f"invalid scene name {name!r}: Windows"):
        check_name(name, new=True)
    assert check_name(name) == name
    with pytest.raises(InvalidInput, match="invalid handle name .*Windows.*choose other --names"):
        check_handle_tokens(["<cat>", f"<{name}>"])


def test_default_name_of_unspellable_file_names_is_valid_and_distinct():
    names = [default_name(n) for n in ("фото.jpg", "дом.jpg", "写真.png", "🐱.png", "\udcff.jpg")]
    for name in names:
        check_name(name)
        assert name.startswith("scene-") and len(name) == len("scene-") + 8
    assert len(set(names)) == len(names)
    one, two = default_name("фото-1.jpg"), default_name("дом-1.jpg")
    assert one != two and one.startswith("1-") and check_name(one)


def test_default_name_of_a_long_file_name_fits_and_stays_distinct():
    """Scene names have at most 200 characters: a longer file name is cut, and the hash
    of the whole name keeps photos that differ only past the cut apart."""
    long = "p" * 230
    names = [default_name(f"{long}{end}.jpg") for end in ("a", "b")] + [default_name(f"фото-{long}.jpg")]
    for name in names:
        assert check_name(name) == name and name.startswith("p" * 150)
    assert len(set(names)) == 3
    assert default_name(f"{long}a.jpg") == names[0]  # the same photo, the same name
    assert default_name("p" * 200 + ".jpg") == "p" * 200  # short enough: as it was


def test_learn_non_ascii_photo_gets_a_valid_scene_name(scene_files, tiny_model, tmp_path):
    photo = tmp_path / "фото.png"
    photo.write_bytes(scene_files["image"].read_bytes())
    result = run("learn", photo, "--masks", *scene_files["masks"], "--base-model", tiny_model,
                 "--steps1", "1", "--steps2", "0", "--no-prior", "--json")
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(result.stdout)["name"] == default_name(photo)


# -- shell etiquette -----------------------------------------------------------------------------

def _closed_pipe_run(args, env=None):
    """Run the command line with a stdout whose reader is already gone."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "scenebreak", *map(str, args)], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=env)
    finally:
        os.close(write)


def _assert_quiet(stderr: str):
    for noise in ("Error", "Traceback", "Exception ignored", "BrokenPipe"):
        assert noise not in stderr, stderr


def test_closed_stdout_stops_quietly(tmp_path):
    scenes = tmp_path / "home" / "scenes"
    scenes.mkdir(parents=True)
    for i in range(3):
        (scenes / f"s{i}.scene").write_bytes(b"not a scene")
    listed = _closed_pipe_run(["list"])
    assert listed.returncode in (0, 141)
    _assert_quiet(listed.stderr)
    shown = _closed_pipe_run(["list", "--json"])
    assert shown.returncode in (0, 141)
    _assert_quiet(shown.stderr)
    for args in (["--help"], ["learn", "--help"]):  # Click prints help itself (`scenebreak --help | head -0`)
        helped = _closed_pipe_run(args)
        assert helped.returncode == 141 and helped.stderr == "", (args, helped.returncode, helped.stderr)


def test_closed_stdout_in_a_command_is_quiet_even_with_debug(monkeypatch):
    import scenebreak.scenes.catalog

    def rows():
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(scenebreak.scenes.catalog, "scene_rows", rows)
    for args in (["list"], ["--debug", "list"]):
        result = run(*args)
        assert result.exit_code == 141, result.output
        assert result.stderr == "", result.stderr


def test_a_closed_stdout_on_windows_is_quiet_too_but_not_a_bad_file_name(monkeypatch):
    """Windows has no SIGPIPE: a write to a stdout whose reader went away fails with
    EINVAL there; a bad file name fails with EINVAL too, but names the file."""
    import errno

    import scenebreak.paths
    import scenebreak.scenes.catalog

    monkeypatch.setattr(scenebreak.paths, "ON_WINDOWS", True)
    failure = {}

    def rows():
        raise failure["exc"]

    monkeypatch.setattr(scenebreak.scenes.catalog, "scene_rows", rows)
    failure["exc"] = OSError(errno.EINVAL, "Invalid argument")
    result = run("list")
    assert result.exit_code == 141 and result.stderr == "", result.output
    failure["exc"] = OSError(errno.EINVAL, "Invalid argument", "C:\\scenes\\a:b.scene")
    result = run("list")
    assert result.exit_code == 1 and result.stderr.startswith("Error: ") and "a:b.scene" in result.stderr, result.output


def test_ctrl_c_while_reporting_a_failure_is_still_one_line_and_130(monkeypatch):
    import os
    import signal

    import scenebreak.scenes.catalog
    import scenebreak.cli.commands

    def interrupted():
        raise KeyboardInterrupt

    describe = scenebreak.cli.commands.describe

    def describe_then_ctrl_c(exc, *more):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C lands while the first is reported
        return describe(exc, *more)

    monkeypatch.setattr(scenebreak.scenes.catalog, "scene_rows", interrupted)
    monkeypatch.setattr(scenebreak.cli.commands, "describe", describe_then_ctrl_c)
    # Ctrl-C must work at the start: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored (as `cmd &` in a script does).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run("list")
        assert result.exit_code == 130, result.output
        assert result.stderr.strip() == "Error: interrupted"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works again in this process
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_signals_held_for_a_loop_are_not_lost_in_a_finalizer_and_act_where_it_asks():
    """The Ray batch's loop: a Ctrl-C whose KeyboardInterrupt was raised inside a
    finalizer (`__del__`, run inside Ray's calls) was printed as "Exception ignored" and
    dropped, and the tasks trained on. Held, it acts where the loop asks; SIGTERM raises
    what the batch's own handler raises; the handlers are put back after."""
    import _thread
    import signal

    from scenebreak.errors import Terminated, deferred_signals, sigterm_stops

    class Finalized:
        def __del__(self):
            _thread.interrupt_main()  # Ctrl-C, handled while this finalizer runs
            sum(range(1000))

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with sigterm_stops("stopped"):
            terminate = signal.getsignal(signal.SIGTERM)
            with deferred_signals() as deliver:
                Finalized()
                sum(range(1000))
                with pytest.raises(KeyboardInterrupt):
                    deliver()
                deliver()  # (nothing more held)
                signal.raise_signal(signal.SIGTERM)
                with pytest.raises(Terminated, match="stopped"):
                    deliver()
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is terminate
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_in_the_reporters_close_is_130(monkeypatch):
    import scenebreak.sample.generate
    from scenebreak.cli.console import ConsoleReporter

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scenebreak.sample.generate, "generate", interrupted)
    monkeypatch.setattr(ConsoleReporter, "close", interrupted)
    result = run("generate", "nowhere", "a prompt")
    assert result.exit_code == 130 and result.stderr.strip() == "Error: interrupted", result.output


def test_two_quick_ctrl_c_to_the_console_script_never_print_a_traceback(scene_files, tiny_model, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    log = tmp_path / "stderr.txt"
    args = [sys.executable, "-m", "scenebreak", "learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
            "--base-model", str(tiny_model), "--no-prior", "--steps1", "400", "--steps2", "0"]
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.time() + 60
        while "phase 1: " not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    stderr = log.read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert stderr.count("Error:") == 1 and "interrupted" in stderr.splitlines()[-1]


def test_learn_hint_quotes_a_path_with_spaces(scene_files, tiny_model, tmp_path):
    import shlex

    out = tmp_path / "my scenes" / "the photo.scene"
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model,
                 "-o", out, "--steps1", "1", "--steps2", "0", "--no-prior")
    assert result.exit_code == 0, result.output
    hint = next(line for line in result.stderr.splitlines() if "scenebreak generate" in line)
    assert shlex.split(hint)[:3] == ["scenebreak", "generate", str(out)]


def test_hub_download_hints_quote_what_the_user_typed():
    from scenebreak.hub import _missing_message  # noqa: PLC2701 - the message itself is what is tested

    message = _missing_message("my model", "a branch", offline=True)
    assert "hf download 'my model' --revision 'a branch'" in message


# -- method details ------------------------------------------------------------------------------

def test_latent_mask_samples_each_cell_at_its_centre():
    import torch
    import torch.nn.functional as F

    from scenebreak.sample.blending import latent_mask

    # 5/8 of latent cell 1 and 3/8 of cell 2 (cells are 8 pixels): the cell mostly covered wins.
    mask = np.zeros((64, 64), bool)
    mask[11:19, 11:19] = True
    cells = latent_mask(mask, (8, 8))
    assert cells.shape == (1, 1, 8, 8) and cells.dtype == torch.float32
    assert torch.nonzero(cells[0, 0]).tolist() == [[1, 1]]
    top_left = (F.interpolate(torch.from_numpy(mask.astype(np.float32))[None, None], size=(8, 8), mode="nearest") > 0.5)
    assert torch.nonzero(top_left[0, 0]).tolist() == [[2, 2]]  # what torch's "nearest" picks: half a cell off

    # A disc keeps its centre on the latent grid (top-left sampling moves it by 3.5 pixels).
    ys, xs = np.mgrid[:96, :128]
    disc = (ys - 41.0) ** 2 + (xs - 57.0) ** 2 < 30**2
    grid = latent_mask(disc, (12, 16))[0, 0].numpy()
    gy, gx = np.nonzero(grid)
    assert abs((gy.mean() * 8 + 3.5) - 41.0) < 1 and abs((gx.mean() * 8 + 3.5) - 57.0) < 1


def test_photo_is_encoded_in_fp32_even_when_training_in_bf16(scene_files, tiny_model, monkeypatch):
    import torch
    from diffusers import AutoencoderKL

    from scenebreak import learn, load_scene
    from scenebreak.config import LearnConfig

    seen = []
    encode = AutoencoderKL.encode

    def recording_encode(self, x, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), x.dtype))
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", recording_encode)
    monkeypatch.setenv("SCENEBREAK_CPU_BF16", "1")  # on every CPU: torch emulates bf16 where it lacks the instructions
    config = LearnConfig(steps1=1, steps2=0, prior=False, mixed_precision="bf16")
    result = learn(scene_files["image"], scene_files["masks"], config, base_model=str(tiny_model), device="cpu")
    assert seen and all(not autocast and dtype == torch.float32 for autocast, dtype in seen), seen
    assert load_scene(result.path).meta["precision"] == "bf16"  # and the training did run in bf16


def test_live_bars_only_on_a_terminal_that_redraws_and_plain_rates_count_from_the_first_step(monkeypatch):
    """TERM=dumb (an editor's shell) got live bars that never redraw, FORCE_COLOR=1 with
    stderr in a file got cursor codes in it; a resumed run's plain lines counted the steps
    done before the restart into its rate (an ETA of seconds for an hour)."""
    import io

    from scenebreak.cli.console import ConsoleReporter
    from scenebreak.events import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert ConsoleReporter(stream=Terminal()).tty
    monkeypatch.setenv("TERM", "dumb")
    assert not ConsoleReporter(stream=Terminal()).tty
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert not ConsoleReporter(stream=io.StringIO()).tty  # a file, whatever rich is told

    out = io.StringIO()
    reporter = ConsoleReporter(stream=out)
    clock = iter([0.0, 100.0])
    monkeypatch.setattr("scenebreak.cli.console.time.monotonic", lambda: next(clock))
    reporter(Progress("phase 2", 200, 400))  # resumed at step 200
    reporter(Progress("phase 2", 300, 400))  # 100 steps in 100 s
    lines = out.getvalue().splitlines()
    assert lines[-1] == "phase 2: 300/400 1.00 it/s eta 1:40", lines


def test_a_bar_has_a_rate_and_eta_for_steps_far_apart(monkeypatch):
    """rich averaged the last 30 s only: a CPU's phase 2 (45 s a step) or a batch's jobs
    showed no rate and no ETA for hours."""
    import io

    from scenebreak.cli.console import ConsoleReporter
    from scenebreak.events import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("SCENEBREAK_PROGRESS", "bars")
    now = [1000.0]
    monkeypatch.setattr("scenebreak.cli.console.time.monotonic", lambda: now[0])
    reporter = ConsoleReporter(stream=Terminal())
    assert reporter.tty
    try:
        for step in range(1, 5):
            reporter(Progress("phase 2", step, 400))
            now[0] += 45.0
        task = reporter.progress.tasks[reporter.tasks["phase 2"]]
        assert task.speed == pytest.approx(1 / 45) and task.time_remaining == pytest.approx(396 * 45)
    finally:
        reporter.close()


def test_a_scene_named_before_the_portability_rule_can_still_be_resumed_or_replaced(scene_files, tiny_model, learned):
    """`aux` was a valid name once: its scene opens, and learn may replace it (--force) or
    resume its run under that name; only a new scene cannot take it."""
    from scenebreak import LearnConfig, learn
    from scenebreak.paths import scene_path

    config = LearnConfig(steps1=1, steps2=1, prior=False)
    args = (scene_files["image"], scene_files["masks"], config)
    with pytest.raises(InvalidInput, match="Windows keeps 'aux'"):
        learn(*args, base_model=str(tiny_model), name="aux", device="cpu")
    scene_path("aux").parent.mkdir(parents=True, exist_ok=True)
    scene_path("aux").write_bytes(Path(learned.path).read_bytes())  # (as if made before the rule)
    result = learn(*args, base_model=str(tiny_model), name="aux", device="cpu", force=True)
    assert result.path == scene_path("aux") and result.path.stat().st_size > 1000


def test_debug_after_the_command_shows_the_traceback_as_the_error_line_says(monkeypatch):
    """An unexpected failure ends "(run with --debug for the traceback)", and people add it
    at the end of the command they ran: that was "No such option: --debug", exit 2."""
    import scenebreak.scenes.catalog

    def rows():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(scenebreak.scenes.catalog, "scene_rows", rows)
    result = run("list")
    assert result.exit_code == 1 and "run with --debug" in result.stderr
    for args in (["list", "--debug"], ["--debug", "list"]):
        result = run(*args)
        assert result.exit_code == 1 and "Traceback" in result.stderr, (args, result.output)
        assert result.stderr.splitlines()[-2:] == ["ZeroDivisionError: a bug",
                                                   "Error: ZeroDivisionError: a bug"]


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    """A script that branches on 2 (bad input) behaved otherwise under --debug: the
    exception went up to Python, which exits 1."""
    result = run("--debug", "show", str(tmp_path / "nope.scene"))
    assert result.exit_code == 2 and "Traceback" in result.stderr, result.output
    assert result.stderr.splitlines()[-1].startswith("Error: ")


def test_the_console_never_writes_to_stdout_keeps_emoji_codes_as_text_and_the_last_loss(monkeypatch, capsys):
    """With stderr closed (`2>&-`) sys.stderr is None and rich wrote the notes to stdout,
    into `$(...)`; ":fire:" in a prompt became an emoji; on a GPU, where only some steps
    carry the loss, the loss blanked between them."""
    import io
    import sys

    from scenebreak.cli.console import ConsoleReporter
    from scenebreak.events import Message, Progress

    monkeypatch.setattr(sys, "stderr", None)
    ConsoleReporter()(Message("loading the base model"))
    assert capsys.readouterr().out == ""
    out = io.StringIO()
    reporter = ConsoleReporter(stream=out)
    reporter(Message("prompt 'a :fire: on the :moon:' uses none of the scene's handles", "warning"))
    assert ":fire: on the :moon:" in out.getvalue()
    clock = iter([0.0, 100.0, 200.0])
    monkeypatch.setattr("scenebreak.cli.console.time.monotonic", lambda: next(clock))
    reporter(Progress("phase 2", 1, 400, {"loss": 0.25}))
    reporter(Progress("phase 2", 100, 400))  # (no loss read at this step)
    assert out.getvalue().splitlines()[-1].startswith("phase 2: 100/400 loss 0.2500")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="no pseudo-terminals here")
def test_batch_tells_a_stdout_on_the_bars_own_terminal(tmp_path):
    """There its result lines go above the bar, not under it (stale copies of the bar)."""
    import subprocess
    import sys

    code = "from scenebreak.cli.commands import _same_terminal; open(%r, 'w').write(str(_same_terminal()))"
    leader, follower = os.openpty()
    try:
        for stdout, expected in ((follower, "True"), (subprocess.PIPE, "False")):
            subprocess.run([sys.executable, "-c", code % str(tmp_path / "said")], stdout=stdout, stderr=follower,
                           timeout=60, check=True)
            assert (tmp_path / "said").read_text() == expected
    finally:
        os.close(leader)
        os.close(follower)


def test_progress_is_plain_lines_in_colab_or_when_asked_and_a_task_run_again_is_timed_afresh(monkeypatch):
    """A `!scenebreak` cell in Colab printed each redraw of a bar as new lines; `ui`'s second
    generate showed the first one's elapsed time and an ETA of 0:00:00 (and, as plain
    lines, a rate counted from the first one's start)."""
    import io

    from scenebreak.cli.console import ConsoleReporter
    from scenebreak.events import Progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setenv("TERM", "xterm-256color")
    for key in ("FORCE_COLOR", "NO_COLOR", "SCENEBREAK_PROGRESS", "COLAB_RELEASE_TAG", "COLAB_GPU"):
        monkeypatch.delenv(key, raising=False)
    assert ConsoleReporter(stream=Terminal()).tty
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab_20261201")
    assert not ConsoleReporter(stream=Terminal()).tty
    monkeypatch.setenv("SCENEBREAK_PROGRESS", "bars")
    assert ConsoleReporter(stream=Terminal()).tty
    monkeypatch.setenv("SCENEBREAK_PROGRESS", "plain")
    assert not ConsoleReporter(stream=Terminal()).tty
    said = Terminal()  # a typo is said, not taken silently for the default
    monkeypatch.setenv("SCENEBREAK_PROGRESS", "plian")
    ConsoleReporter(stream=said, quiet=True)
    assert "warning: SCENEBREAK_PROGRESS='plian' is neither bars nor plain: ignored" in said.getvalue()
    monkeypatch.delenv("SCENEBREAK_PROGRESS")

    out = io.StringIO()
    reporter = ConsoleReporter(stream=out)
    clock = iter([0.0, 10.0, 1000.0, 1010.0])
    monkeypatch.setattr("scenebreak.cli.console.time.monotonic", lambda: next(clock))
    reporter(Progress("generate", 0, 10))
    reporter(Progress("generate", 10, 10))  # 10 steps in 10 s
    reporter(Progress("generate", 0, 10))  # the next job, much later
    reporter(Progress("generate", 10, 10))  # 10 steps in 10 s again
    assert out.getvalue().splitlines()[-1] == "generate: 10/10 1.00 it/s", out.getvalue()


def test_the_command_lines_stderr_carries_no_library_log_lines(learned, tmp_path):
    """transformers and diffusers log through their own loggers from their import on,
    before scenebreak quiets them: a handle past CLIP's 77 tokens printed the tokenizer's
    "[transformers] Token indices sequence length is longer ..." above the one `Error:`
    line (and FLUX's image processors without torchvision two lines at every command);
    offline, `kernels` (fetching a kernel for bitsandbytes) printed "Skipping publisher
    trust check ..." at every command, -q or not."""
    import logging
    import subprocess
    import sys

    prompt = "a photo " * 60 + "<asset1>"
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    done = subprocess.run([sys.executable, "-m", "scenebreak", "generate", str(learned.path), prompt, "--steps", "1",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True,
                          env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(said) == 1 and said[0].startswith("Error:") and "falls past" in said[0], said

    from scenebreak.hub import quiet_library_logging_from_the_start

    quiet_library_logging_from_the_start()  # (the environment is this test process's: put back below)
    try:
        assert not logging.getLogger("kernels._internals.hf_hub").isEnabledFor(logging.WARNING)
    finally:
        for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            if variable not in env:
                os.environ.pop(variable, None)


def test_a_prompts_file_may_be_a_pipe_and_a_closed_stdin_is_one_line(tmp_path, monkeypatch):
    """`generate --prompts-file <(grep moon prompts.txt)` was refused ("not a regular
    file"); `--prompts-file - <&-` was "AttributeError: 'NoneType' object has no
    attribute 'buffer'", exit 1. A device is still no prompts file."""
    import sys
    import threading

    from scenebreak.errors import InvalidInput
    from scenebreak.paths import read_text_file

    pipe = tmp_path / "prompts"
    os.mkfifo(pipe)

    def write():
        with open(pipe, "w") as f:
            f.write("<asset1> on the moon\n")

    threading.Thread(target=write, daemon=True).start()
    assert read_text_file(pipe, "--prompts-file", 1000) == "<asset1> on the moon\n"
    with pytest.raises(InvalidInput, match="is not a regular file"):
        read_text_file("/dev/null", "--prompts-file", 1000)
    monkeypatch.setattr(sys, "stdin", None)
    with pytest.raises(InvalidInput, match=r"is standard input \('-'\), which is closed"):
        read_text_file("-", "--prompts-file", 1000)
