"""The command line through Click's runner and as a real console script."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak.cli.commands import cli
from scenebreak.device import cpu_has_bf16

from helpers import stop_after_first_step

FAST_LEARN = ["--steps1", "2", "--steps2", "1", "--num-class-images", "2"]


def run(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input)


@pytest.mark.parametrize("command", ["mask", "learn", "generate", "edit", "extract-bg", "list", "show", "rm", "export"])
def test_every_command_has_help_with_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_help_and_version_do_not_import_torch():
    code = "import sys; from scenebreak.cli.commands import cli\ntry: cli(['--help'])\nexcept SystemExit: pass\nassert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "scenebreak", "--version"], capture_output=True, text=True, check=True)
    assert "scenebreak" in out.stdout


def test_learn_prints_only_the_path_and_json_on_request(scene_files, tiny_model):
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model, *FAST_LEARN)
    assert result.exit_code == 0, result.output
    path = result.stdout.strip()
    assert path.endswith("photo.scene") and os.path.exists(path)
    assert "phase 1" in result.stderr and "phase 2" in result.stderr and "warning: training on the CPU" in result.stderr
    assert re.search(r"learned <asset1> <asset2> in \d+ s; try:\n  scenebreak generate photo ", result.stderr)
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model, *FAST_LEARN,
                 "--name", "other", "--names", "red", "blue", "--json", "--quiet", "--no-prior")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["handles"] == ["<red>", "<blue>"] and data["name"] == "other" and data["paths"] == [data["path"]]
    assert "phase 1" not in result.stderr

    listed = run("list", "--json")
    assert {s["name"] for s in json.loads(listed.stdout)["scenes"]} == {"photo", "other"}
    shown = run("show", "other")
    assert "<red> (red.png)  <blue> (blue.png)" in shown.stdout and "phase1" in shown.stdout
    removed = run("rm", "other")
    assert removed.exit_code == 0 and not os.path.exists(removed.stdout.strip())


def test_an_interrupted_runs_checkpoint_is_listed_and_rm_deletes_it(scene_files, tiny_model):
    """An interrupted run's checkpoint (about 14 GB in phase 2 on SD 2.1) was shown by
    nothing and deleted by nothing: `list` left it out, `rm NAME` said "scene not found"
    and `rm` of its path "not a readable .scene file"."""
    from scenebreak import LearnConfig, learn
    from scenebreak.errors import Interrupted
    from scenebreak.paths import checkpoint_path
    from scenebreak.train.locks import scene_lock

    for name in ("left", "again"):
        with pytest.raises(Interrupted):
            learn(scene_files["image"], scene_files["masks"], LearnConfig(steps1=2, steps2=0, prior=False),
                  base_model=str(tiny_model), name=name, should_stop=stop_after_first_step())
    run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model, "--steps1", "1",
        "--steps2", "1", "--no-prior", "--name", "kept")
    listed = run("list")
    assert listed.exit_code == 0 and "left" not in listed.stdout, listed.output
    # (sizes in binary units, as every size said: a tiny model's checkpoint is a few MiB)
    assert re.search(r"interrupted runs, kept for learn --resume \(scenebreak rm NAME deletes one\): again \(\d+ MiB\), "
                     r"left \(\d+ MiB\)", listed.stderr), listed.stderr
    quiet = run("list", "-q")  # (-q as every command takes it: the note left out, the scenes listed)
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == listed.stdout, quiet.output
    assert run("show", "kept", "-q").stdout == run("show", "kept").stdout
    as_json = json.loads(run("list", "--json").stdout)
    assert [r["name"] for r in as_json["interrupted"]] == ["again", "left"]
    assert as_json["interrupted"][1]["path"] == str(checkpoint_path("left")) and as_json["interrupted"][1]["bytes"] > 0

    with scene_lock("left"):  # a run learning it now keeps its checkpoint
        refused = run("rm", "left")
        assert refused.exit_code == 2 and "being learned now" in refused.stderr, refused.output
    removed = run("rm", "left", "kept", "--json", "-q")
    assert removed.exit_code == 0, removed.output
    assert json.loads(removed.stdout)["paths"][-1] == str(checkpoint_path("left"))
    assert len(json.loads(removed.stdout)["paths"]) == 2
    assert not checkpoint_path("left").exists() and checkpoint_path("again").exists()
    assert "nothing-here" in run("rm", "again", "nothing-here").stderr and checkpoint_path("again").exists()
    # From Python, as the command line: the runs listed, then one removed by its name alone.
    import scenebreak

    assert [run.name for run in scenebreak.interrupted_runs()] == ["again"]
    assert scenebreak.remove_scenes("again") == [checkpoint_path("again")] and not scenebreak.interrupted_runs()
    with pytest.raises(scenebreak.InvalidInput):
        scenebreak.remove_scenes([None])


def test_a_cache_folder_that_cannot_be_used_is_named_as_the_fix(scene_files, tiny_model, tmp_path, monkeypatch):
    """An unwritable cache sent `learn` to "choose a writable folder with -o", after which
    it said the cache was the problem (exit 2, then 1); SCENEBREAK_HOME naming a file made
    `list` print nothing, exit 0, and every scene "not found"."""
    import scenebreak.train.learn as learn_module
    from scenebreak.paths import home

    real = learn_module.is_writable_folder
    monkeypatch.setattr(learn_module, "is_writable_folder",
                        lambda folder: real(folder) and not str(folder).startswith(str(home())))
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"Error: the cache folder {home()} is not writable: set SCENEBREAK_HOME"), result.stderr
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SCENEBREAK_HOME", str(tmp_path / "a-file"))
    for args in (["list"], ["show", "photo"]):
        said = run(*args)
        assert said.exit_code == 1 and said.stderr.startswith(
            f"Error: SCENEBREAK_HOME={tmp_path / 'a-file'} is a file, not a folder"), said.output


def _bad(tmp_path, scene_files):
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    Image.new("L", (96, 80), 0).save(tmp_path / "empty.png")
    image, (red, blue) = scene_files["image"], scene_files["masks"]
    return {
        "missing image": [tmp_path / "nope.jpg", "--masks", red],
        "unreadable image": [red.with_suffix(".txt"), "--masks", red],
        "mask of another size": [image, "--masks", tmp_path / "small.png"],
        "empty mask": [image, "--masks", tmp_path / "empty.png"],
        "no masks": [image],
        "no mask values": [image, "--masks"],
        "duplicate names": [image, "--masks", red, blue, "--names", "a", "a"],
        "unknown device": [image, "--masks", red, "--device", "tpu"],
        "bad resolution": [image, "--masks", red, "--resolution", "100"],
    }


def test_bad_input_is_one_line_and_exit_2(tmp_path, scene_files, tiny_model):
    scene_files["masks"][0].with_suffix(".txt").write_text("hello")
    for label, args in _bad(tmp_path, scene_files).items():
        result = run("learn", *args, "--base-model", tiny_model, *FAST_LEARN)
        assert result.exit_code == 2, (label, result.output)
        assert "Traceback" not in result.output, label
        assert result.stdout == "", label
    assert not (tmp_path / "home" / "scenes").exists()


def test_missing_model_is_exit_1_with_the_fix(scene_files):
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", "someone/absent-model")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "hf download someone/absent-model" in result.stderr


def test_generate_cli_paths_json_prompts_file_and_errors(learned, tmp_path):
    out = tmp_path / "out"
    result = run("generate", learned.path, "<asset1> on the moon", "-n", "2", "--seed", "5", "--steps", "2", "--out-dir", out)
    assert result.exit_code == 0, result.output
    paths = result.stdout.splitlines()
    assert len(paths) == 2 and all(os.path.exists(p) for p in paths)
    assert "seed: 5" in result.stderr and re.search(r"wrote 2 image\(s\) in \d+ s\n$", result.stderr)

    result = run("generate", learned.path, "--prompts-file", "-", "--steps", "2", "--seed", "1", "--out-dir", out, "--json",
                 input="# a comment\n<asset1> in the snow\n\na photo of <asset2>\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [i["prompt"] for i in data["images"]] == ["<asset1> in the snow", "a photo of <asset2>"]
    assert data["paths"] == [i["path"] for i in data["images"]]  # what the plain output lists, as in every command
    # "scene" is the scene's own name, which may name another scene in the cache: its file is what a script passes on.
    assert data["scene"] == learned.name and data["scene_path"] == str(learned.path)
    # How they were made, the defaults filled in (SD's sampler and guidance, not given here).
    assert data["settings"] == {"scheduler": "dpm", "steps": 2, "guidance": 7.5, "negative": None,
                                "precision": "bf16" if cpu_has_bf16() else "fp32"}  # (what auto came to)

    result = run("generate", learned.path, "<asset9> on the moon", "--out-dir", out)
    assert result.exit_code == 2 and "<asset1>, <asset2>" in result.stderr
    result = run("generate", learned.path, "--out-dir", out)
    assert result.exit_code == 2
    corrupt = tmp_path / "corrupt.scene"
    corrupt.write_bytes(learned.path.read_bytes()[:5000])
    result = run("generate", corrupt, "<asset1>")
    assert result.exit_code == 2 and "truncated or corrupt" in result.stderr
    result = run("show", "not-a-scene")
    assert result.exit_code == 2 and "scene not found" in result.stderr


def test_console_script_round_trip_without_the_base_model(scene_files, tiny_model, tmp_path):
    """learn in one process, delete the base model, generate in another process."""
    exe = shutil.which("scenebreak") or pytest.skip("console script not installed")
    model = tmp_path / "model-copy"
    shutil.copytree(tiny_model, model)
    env = dict(os.environ)
    learned = subprocess.run([exe, "learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]),
                              "--base-model", str(model), *FAST_LEARN], capture_output=True, text=True, env=env, timeout=600)
    assert learned.returncode == 0, learned.stderr
    assert learned.stdout.strip().endswith("photo.scene")
    shutil.rmtree(model)  # the scene must be self-contained
    made = subprocess.run([exe, "generate", "photo", "<asset1> and <asset2> on the moon", "--steps", "2", "--seed", "0",
                           "--out-dir", str(tmp_path / "imgs")], capture_output=True, text=True, env=env, timeout=600)
    assert made.returncode == 0, made.stderr
    assert os.path.exists(made.stdout.strip())


def test_a_reader_of_stderr_that_goes_away_stops_nothing(scene_files, tiny_model, tmp_path):
    """`learn ... 2>&1 | tee log` where tee dies (the ssh session closed): rich exited 1
    at its next line, with stdout pointed at /dev/null, so a learn lost its steps and a
    generate its images. Now the work goes on quietly, and the results reach stdout."""
    exe = shutil.which("scenebreak") or pytest.skip("console script not installed")

    def run_without_stderr(*args):
        process = subprocess.Popen([exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        process.stderr.close()  # the reader is gone before the first line
        out = process.stdout.read()
        return process.wait(timeout=600), out

    code, out = run_without_stderr("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model",
                                   tiny_model, *FAST_LEARN)
    assert code == 0 and out.strip().endswith("photo.scene"), (code, out)
    code, out = run_without_stderr("generate", "photo", "<asset1>", "-n", "2", "--steps", "2", "--out-dir",
                                   tmp_path / "images")
    assert code == 0 and len(out.split()) == 2 and all(os.path.exists(p) for p in out.split()), (code, out)


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(scene_files, tiny_model, tmp_path):
    """A real SIGINT to the console script: exit 130, no .scene, then --resume."""
    import signal
    import time

    exe = shutil.which("scenebreak") or pytest.skip("console script not installed")
    common = [exe, "learn", str(scene_files["image"]), "--masks", *map(str, scene_files["masks"]), "--base-model", str(tiny_model), "--no-prior"]
    args = common + ["--steps1", "40", "--steps2", "5"]  # (long enough to be stopped in phase 1)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.time() + 120
        while "phase 1: 0/40" not in log.read_text() and time.time() < deadline:  # (its bar is up)
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, log.read_text()
    assert out == "" and "--resume" in log.read_text()
    home = tmp_path / "home"
    assert not (home / "scenes" / "photo.scene").exists()
    assert (home / "checkpoints" / "photo.ckpt").exists()
    resumed = subprocess.run(common + ["--steps1", "40", "--steps2", "2", "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 2 and "other inputs or settings" in resumed.stderr  # settings must match
    resumed = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming 'photo' at phase 1" in resumed.stderr
    assert resumed.stdout.strip().endswith("photo.scene") and not (home / "checkpoints" / "photo.ckpt").exists()


def test_full_disk_is_exit_1_naming_the_fix_and_leaves_nothing(scene_files, tiny_model, monkeypatch):
    import safetensors.torch

    import scenebreak.paths

    full = []

    def failing_save(tensors, filename, metadata=None):
        full.append(True)  # the disk fills up while the scene is written
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("Error while serializing: I/O error")

    real_usage = shutil.disk_usage
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    monkeypatch.setattr(scenebreak.paths.shutil, "disk_usage",
                        lambda p: shutil._ntuple_diskusage(100, 100, 0) if full else real_usage(p))
    args = ("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model,
            "--steps1", "1", "--steps2", "0", "--no-prior")
    result = run(*args)
    assert result.exit_code == 1, result.output
    assert "no space left on device" in result.stderr and "--resume" not in result.stderr
    scenes = scenebreak.paths.scenes_dir()
    assert not list(scenes.iterdir())  # neither the scene nor its temp file
    # Full before it starts: refused before any training, with the numbers.
    result = run(*args)
    assert result.exit_code == 1 and "not enough space" in result.stderr and "SCENEBREAK_HOME" in result.stderr
    assert "MiB will be written" in result.stderr and "phase 1" not in result.stderr


def test_multi_value_options_parse_like_nargs():
    import click

    from scenebreak.cli.commands import MultiValueCommand

    @click.command(cls=MultiValueCommand)
    @click.argument("image")
    @click.option("--masks", multiple=True)
    @click.option("--names", multiple=True)
    @click.option("-q", is_flag=True)
    def probe(image, masks, names, q):
        click.echo(json.dumps([image, masks, names, q]))

    def parse(*args):
        return CliRunner().invoke(probe, list(args))

    assert json.loads(parse("p.jpg", "--masks", "a", "b", "--names", "x", "y", "-q").stdout) == ["p.jpg", ["a", "b"], ["x", "y"], True]
    assert json.loads(parse("--masks", "a", "--masks=b", "--names", "x", "-q", "p.jpg").stdout) == ["p.jpg", ["a", "b"], ["x"], True]
    for dangling in (["p.jpg", "--masks", "--names", "x"], ["p.jpg", "--masks"]):
        result = parse(*dangling)
        assert result.exit_code == 2 and "requires an argument" in result.output
    # The photo after the masks is taken as one more mask: the error says to put it first.
    result = parse("--masks", "a", "b", "p.jpg")
    assert result.exit_code == 2 and "Missing argument 'IMAGE': --masks takes every value up to the next option, so " \
        "put IMAGE before --masks" in result.output
    assert "before" not in parse("-q").output  # no multi-value option ran to the end: Click's own line
    # '=' joins the first value only in Click; here the values after it count too.
    assert json.loads(parse("p.jpg", "--masks=a", "b", "-q").stdout) == ["p.jpg", ["a", "b"], [], True]
    # The photo taken as a mask with an option after it: the same advice (it was Click's bare line).
    result = parse("--masks", "a", "b", "p.jpg", "-q")
    assert result.exit_code == 2 and "put IMAGE before --masks" in result.output


@pytest.mark.parametrize("args, phrase", [
    ([], "no command given"),
    (["frob"], "No such command 'frob' (see cli --help)"),  # CliRunner's program name is the function's
    (["generate"], "Missing argument 'SCENE' (see cli generate --help)"),
    (["learn", "p.jpg", "--masks", "m.png", "--steps1", "many"], "'many' is not a valid integer (see cli learn --help)"),
    (["export", "x", "--bogus"], "--bogus' (see cli export --help)"),
    (["edit", "p.jpg", "--scene", "s", "-m", "m.png"], "one prompt per --mask"),
])
def test_usage_errors_are_one_error_line_naming_the_help(args, phrase):
    """Click's own four lines (usage, hint, blank, error) are one, as every other failure's."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("Error: ") and phrase in lines[-1], result.stderr
    assert not any(line.startswith(("Usage:", "Try ")) for line in lines) or not args  # bare `scenebreak`: the help


def test_mask_options_given_with_a_tilde_after_the_equals_sign_are_in_the_home_folder(tmp_path, scene_files,
                                                                                       tiny_model, monkeypatch, learned):
    """A shell leaves `--masks=~/cat.png` as it is: the mask was looked for in a folder
    named ~ in the current one ("not found"), unlike the photo beside it."""
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    (tmp_path / "me").mkdir()
    Image.new("L", (10, 10), 255).save(tmp_path / "me" / "small.png")
    result = run("learn", scene_files["image"], "--masks=~/small.png", "--base-model", tiny_model, *FAST_LEARN)
    assert result.exit_code == 2 and "masks must match the image size" in result.stderr, result.output
    assert str(tmp_path / "me" / "small.png") in result.stderr
    result = run("edit", scene_files["image"], "<asset1>", "--scene", learned.path, "--mask=~/small.png")
    assert result.exit_code == 2 and "10x10" in result.stderr, result.output


def test_an_empty_prompts_file_is_named_as_such(learned, tmp_path):
    """A prompts file with only comments was "give at least one PROMPT", as if none was given."""
    empty = tmp_path / "prompts.txt"
    empty.write_text("# nothing yet\n\n")
    for args in (["generate", learned.path, "--prompts-file", empty], ["generate", learned.path, "--variations",
                                                                         "--prompts-file", empty]):
        result = run(*args)
        assert result.exit_code == 2 and f"--prompts-file {empty} has no prompt" in result.stderr, result.output
    result = run("generate", learned.path, "--prompts-file", "-", input="\n")
    assert result.exit_code == 2 and "stdin has no prompt" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["extract-bg", "SCENE", "-p", "a photo of a car at <background>"], "add -n K"),
    (["edit", "IMAGE", "<asset1>", "--scene", "SCENE", "-m", "MASK", "-o", "x.png", "--out-dir", "d"], "not both"),
])
def test_an_option_nothing_would_use_is_refused_not_ignored(scene_files, learned, args, message, tmp_path, monkeypatch):
    """Settings that the other options make unused were silently ignored (the run looked
    as if they had counted); export refused its own such case already."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # (a refusal writes nothing; were it to, not into the checkout)
    values = {"IMAGE": scene_files["image"], "MASK": scene_files["masks"][0], "SCENE": learned.path}
    result = run(*(values.get(a, a) for a in args))
    assert result.exit_code == 2 and message in result.stderr, result.output
    assert result.stdout == "" and not list((tmp_path / "here").iterdir())


def test_learn_warns_about_the_options_its_switches_leave_unused(scene_files, tiny_model):
    """A script may pass a fixed set of options and vary --no-prior or --tune: those it
    leaves unused are said (they were silently ignored), and the run goes on."""
    result = run("learn", scene_files["image"], "--masks", *scene_files["masks"], "--base-model", tiny_model, *FAST_LEARN,
                 "--no-prior", "--tune", "full", "--rank", "8", "--class-prompt", "a dog", "--name", "unused")
    assert result.exit_code == 0, result.output
    for option in ("--num-class-images is for the class images", "--class-prompt is for the class images",
                   "--rank is for LoRA tuning"):
        assert f"warning: {option}" in result.stderr


def test_a_librarys_warning_is_one_line_as_scenebreaks_own(monkeypatch):
    """Python shows a warning in several lines (file, line of source); a library's
    (huggingface_hub's symlinks note on Windows, say) came out so, across a live bar."""
    import warnings

    from scenebreak.cli import commands

    def listed():
        warnings.warn("the cache uses symlinks\nsecond line of advice", UserWarning)
        return []

    monkeypatch.setattr("scenebreak.scenes.catalog.list_scenes", listed)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = CliRunner().invoke(commands.cli, ["list"])
        assert "warning: UserWarning: the cache uses symlinks\n" in result.stderr, result.output
        assert "second line" not in result.stderr
        assert CliRunner().invoke(commands.cli, ["--debug", "list"]).exit_code == 0
        assert warnings.showwarning is commands.PYTHONS_SHOWWARNING  # --debug: Python's own, with file and line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full here")
def test_help_to_a_full_disk_is_one_line():
    """Only the commands' own output was covered: `scenebreak --help > /dev/full` ended
    in a traceback."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "scenebreak", "--help"], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("Error: no space left on device") and done.stderr.count("\n") == 1
