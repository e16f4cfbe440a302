"""--scheduler, --precision, --grid and shell completion: what `generate`, `edit`,
`extract-bg` and class images gained for faster sampling and everyday use."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from scenebreak import GenerateConfig, generate
from scenebreak.cli.commands import cli
from scenebreak.config import SCHEDULER_STEPS, SCHEDULERS
from scenebreak.errors import InvalidInput


def pixels(result, i=0):
    return np.asarray(Image.open(result.images[i].path), dtype=int)


def test_each_scheduler_fills_in_its_own_step_count():
    """The sampler and its steps are the scene's family's unless asked for: on SD and
    SDXL dpm at 25 steps, ddim 50, euler 30 (FLUX.1 has its own, tests/families)."""
    from scenebreak.families import family_named

    sd = family_named("SD 2.x")
    assert GenerateConfig().scheduler is None and GenerateConfig().validate().steps is None
    assert sd.choose_sampler(None, None) == ("dpm", 25)
    for name in sd.samplers:
        assert sd.choose_sampler(name, None) == (name, SCHEDULER_STEPS[name])
    assert sd.choose_sampler("ddim", 7) == ("ddim", 7)  # --steps wins
    with pytest.raises(InvalidInput, match="unknown scheduler 'pndm'"):
        GenerateConfig(scheduler="pndm").validate()
    with pytest.raises(InvalidInput, match="SD 2.x samples with dpm or ddim or euler"):
        sd.choose_sampler("flow", None)
    assert set(sd.samplers) < set(SCHEDULERS)


def test_every_scheduler_samples_deterministically_and_differently(learned, tmp_path):
    seen = {}
    for name in ("dpm", "ddim", "euler"):
        config = GenerateConfig(scheduler=name, steps=4, seed=5, precision="fp32")
        a = generate(learned.path, "<asset1>", config, out_dir=tmp_path / name)
        b = generate(learned.path, "<asset1>", config, out_dir=tmp_path / name)
        assert np.array_equal(pixels(a), pixels(b))
        seen[name] = pixels(a)
    assert not np.array_equal(seen["dpm"], seen["ddim"]) and not np.array_equal(seen["euler"], seen["ddim"])


def test_the_pipeline_gets_the_chosen_sampler(learned):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from scenebreak.sample.sampling import start

    kinds = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}
    for name, cls in kinds.items():
        run = start(learned.path, ["<asset1>"], GenerateConfig(scheduler=name, seed=0).validate(), device="cpu")
        assert type(run.pipe.scheduler) is cls
    run = start(learned.path, ["<asset1>"], GenerateConfig(seed=0).validate(), device="cpu")
    dpm = run.pipe.scheduler
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert (run.config.scheduler, run.config.steps) == ("dpm", 25)


def test_sampling_precision_per_device(monkeypatch):
    from scenebreak import device as device_module
    from scenebreak.device import Device

    cpu = Device("cpu", "cpu")
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    assert cpu.sampling_precision("auto") == (torch.float32, torch.bfloat16)  # fp32 weights, bf16 autocast
    assert cpu.sampling_precision("fp32") == (torch.float32, None)
    with pytest.raises(InvalidInput, match="fp16 needs a GPU"):
        cpu.sampling_precision("fp16")
    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: False)
    assert cpu.sampling_precision("auto") == (torch.float32, None)
    with pytest.raises(InvalidInput, match="no bf16 instructions"):
        cpu.sampling_precision("bf16")
    cuda = Device("cuda", "cuda:0")
    assert cuda.sampling_precision("auto") == (torch.float16, None)
    assert cuda.sampling_precision("bf16") == (torch.bfloat16, None)
    assert cuda.sampling_precision("fp32") == (torch.float32, None)
    # FLUX.1 (trained and published in bf16; fp16 clips its activations): bf16 where the card runs it natively.
    for capability, expected in (((9, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert cuda.sampling_precision("auto", prefer_bf16=True) == (expected, None)
        assert cuda.sampling_precision("fp16", prefer_bf16=True) == (torch.float16, None)
    # On a Mac: fp16, and bf16 for FLUX.1 (and asked for) from macOS 14, which has it.
    mps = Device("mps", "mps")
    for newer, flux in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor, n=newer: n)
        assert mps.sampling_precision("auto") == (torch.float16, None)
        assert mps.sampling_precision("auto", prefer_bf16=True) == (flux, None)
        if newer:
            assert mps.sampling_precision("bf16") == (torch.bfloat16, None)
        else:
            with pytest.raises(InvalidInput, match="needs macOS 14"):
                mps.sampling_precision("bf16")
    from scenebreak.families import family_named

    assert family_named("FLUX.1 dev").samples_in_bf16 and not family_named("SDXL").samples_in_bf16


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32(learned, tmp_path, monkeypatch):
    from scenebreak import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_bf16", lambda: True)
    base = dict(steps=4, seed=9)
    fp32 = generate(learned.path, "<asset2>", GenerateConfig(precision="fp32", **base), out_dir=tmp_path / "fp32")
    bf16 = generate(learned.path, "<asset2>", GenerateConfig(precision="bf16", **base), out_dir=tmp_path / "bf16")
    diff = np.abs(pixels(fp32) - pixels(bf16))
    assert diff.mean() < 8  # the same picture up to bf16 rounding
    assert diff.max() > 0  # and bf16 did run


def test_base_model_is_said_to_be_ignored_for_a_scene_that_holds_its_weights(learned, tmp_path):
    """--base-model is for LoRA scenes: on a fully tuned one it was silently ignored
    (a script pointing at the wrong folder never learned so)."""
    from scenebreak.events import Message

    assert not __import__("scenebreak").load_scene(learned.path).needs_base_model
    said = []
    generate(learned.path, "<asset1>", GenerateConfig(steps=1, seed=0), out_dir=tmp_path, base_model="/nowhere",
             report=said.append)
    assert any(isinstance(m, Message) and "--base-model is ignored" in m.text for m in said)


def test_grid_is_a_contact_sheet_of_the_call(learned, tmp_path):
    result = generate(learned.path, ["<asset1>", "<asset2>"], GenerateConfig(num_images=3, steps=2, seed=1),
                      out_dir=tmp_path, grid=True)
    *images, sheet = result.images
    assert len(images) == 6 and sheet.kind == "grid" and sheet.path.name == "photo-grid-1.png"
    grid = np.asarray(Image.open(sheet.path).convert("RGB"))
    assert grid.shape == (2 * 64 + 4, 3 * 64 + 2 * 4, 3)  # a row per prompt, 4 px gaps
    # Row 2, column 3 is prompt 2's third image.
    assert np.array_equal(grid[68:132, 136:200], np.asarray(Image.open(images[5].path).convert("RGB")))


def test_grid_and_scheduler_on_the_command_line(learned, tmp_path):
    result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "-n", "2", "--steps", "2", "--seed", "3",
                                      "--scheduler", "euler", "--grid", "--out-dir", str(tmp_path), "--json", "-q"])
    assert result.exit_code == 0, result.output
    kinds = [i["kind"] for i in json.loads(result.stdout)["images"]]
    assert kinds == ["image", "image", "grid"]
    bad = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--precision", "fp16", "--device", "cpu",
                                   "--out-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "fp16 needs a GPU" in bad.output and "Traceback" not in bad.output


def test_class_images_have_a_cache_per_sampler_and_ddim_keeps_its_old_one():
    import hashlib

    from scenebreak.families import family_named
    from scenebreak.paths import class_images_dir
    from scenebreak.train.classimages import cache_folder

    sd = family_named("SD 2.x")
    old_key = json.dumps(["fp", "a photo", 512, 50, 7.5, "ddim"])  # the key before samplers were a choice
    assert cache_folder("fp", "a photo", 512, sd, "ddim") == class_images_dir() / hashlib.sha256(old_key.encode()).hexdigest()[:16]
    assert len({cache_folder("fp", "a photo", 512, sd, name) for name in sd.samplers}) == 3
    assert cache_folder("fp", "a photo", 512, sd) == cache_folder("fp", "a photo", 512, sd, "dpm")  # the default


def complete(words: str) -> list[str]:
    """What the shell would offer for the last word of `words` (bash's protocol)."""
    parts = words.split(" ")
    result = CliRunner().invoke(cli, [], prog_name="scenebreak",
                                env={"_SCENEBREAK_COMPLETE": "bash_complete", "COMP_WORDS": words,
                                     "COMP_CWORD": str(len(parts) - 1)})
    return [line.split(",", 1)[1] for line in result.output.splitlines()]


def test_shell_completion_offers_cached_scene_names(learned, tmp_path, monkeypatch):
    import shutil

    from scenebreak.paths import scenes_dir

    scenes_dir().mkdir(parents=True, exist_ok=True)
    for name in ("photo", "plant", "cat"):
        shutil.copy(learned.path, scenes_dir() / f"{name}.scene")
    assert complete("scenebreak generate p") == ["photo", "plant"]
    assert complete("scenebreak show c") == ["cat"]
    assert complete("scenebreak rm photo p") == ["photo", "plant"]
    assert complete("scenebreak edit img.png --scene ca") == ["cat"]
    assert complete("scenebreak generate ./sc") == ["./sc"]  # a path: the shell completes files
    assert "--scheduler" in complete("scenebreak generate photo --sch")


def test_shell_completion_offers_the_commands():
    """Completion parses with no arguments, which the group took for `scenebreak` alone:
    the help, "no command given" and a traceback on stderr, nothing offered."""
    assert complete("scenebreak gen") == ["generate"]
    assert {"learn", "generate", "edit", "mask", "rm", "ui", "batch"} <= set(complete("scenebreak "))


def test_half_precision_keeps_the_layers_transformers_keeps_in_fp32():
    """Sampling casts each model to its dtype whole, which undid transformers' own rule
    for fp16: T5's `wo` stays fp32 (FLUX.1's T5 passes fp16's range there; transformers
    then clamps the residual stream at 65504 and the prompt's states come out wrong, on
    cards without bf16 and on Macs). A T5 whose feed-forward output is past fp16's range
    shows it: kept in fp32 there, its fp16 states match the fp32 model's."""
    from transformers import T5Config, T5EncoderModel

    from scenebreak.device import choose_device
    from scenebreak.sample.scene_models import to_device

    def t5():
        torch.manual_seed(0)
        model = T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1,
                                        feed_forward_proj="gated-gelu"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "DenseReluDense" in name:
                    param.mul_(60)  # wo's outputs reach ~1e5 for some features: past fp16's 65504
        return model.eval()

    ids = torch.tensor([[3, 4, 5, 1]])

    def states(model):
        with torch.no_grad():
            return model(input_ids=ids).last_hidden_state.float()

    reference = states(t5())
    cast_whole = states(t5().to(torch.float16))
    model = to_device(t5(), choose_device("cpu"), torch.float16)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if n.endswith(".wo.weight")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo.weight")} == {torch.float16}
    kept = states(model)
    assert model(input_ids=ids).last_hidden_state.dtype == torch.float16
    error = lambda x: float((x - reference).abs().max() / reference.abs().max())  # noqa: E731
    assert error(kept) < 0.02 < error(cast_whole)
    assert to_device(t5(), choose_device("cpu"), torch.bfloat16).encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype \
        == torch.bfloat16  # (the rule is fp16's; bf16 has fp32's range)


def test_an_image_never_replaces_a_file_that_took_its_name_meanwhile(tmp_path, monkeypatch):
    """The free name was chosen before the image was written and the rename replaced what
    was there by then: two runs of one prompt and seed into one folder (say, a sweep of
    --guidance in parallel) kept one image and both printed its path."""
    from scenebreak import paths
    from scenebreak.sample.sampling import save_png

    image = np.zeros((4, 4, 3), np.uint8)
    target = tmp_path / "s-a-1.png"
    real_flush = paths.flush_to_disk

    def racing_run_publishes(tmp):  # the other run publishes while this one writes
        if not target.exists():
            target.write_bytes(b"the other run's image")
        real_flush(tmp)

    monkeypatch.setattr(paths, "flush_to_disk", racing_run_publishes)
    assert save_png(image, target) == tmp_path / "s-a-1-1.png"
    assert target.read_bytes() == b"the other run's image"
    assert np.array_equal(np.asarray(Image.open(tmp_path / "s-a-1-1.png")), image)
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere")  # a link there is something there, too
    assert save_png(image, tmp_path / "dangling.png") == tmp_path / "dangling-1.png"
    monkeypatch.setattr(paths.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError(1, "no hard links here")))
    assert save_png(image, target) == tmp_path / "s-a-1-2.png"  # a disk without hard links: checked, then renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling-1.png", "dangling.png", "s-a-1-1.png", "s-a-1-2.png",
                                                          "s-a-1.png"]
    assert save_png(image, target, overwrite=True) == target and target.read_bytes() != b"the other run's image"


def test_an_out_dir_that_is_a_link_to_nowhere_is_one_line_before_loading(learned, tmp_path):
    """The check saw no folder there (the link leads nowhere) and passed it; mkdir then
    found the name taken: "[Errno 17] File exists", exit 1."""
    (tmp_path / "renders").symlink_to(tmp_path / "gone")
    for out in (tmp_path / "renders", tmp_path / "renders" / "today"):
        result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--out-dir", str(out)])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip().splitlines()[-1] == f"Error: --out-dir {out} is not a folder you can write to: choose another"
    assert not (tmp_path / "gone").exists()


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_more_steps_than_the_sampler_takes_is_one_line_before_loading(learned, tmp_path, monkeypatch, scheduler):
    """SD's samplers at --steps 1000 (within the bound): the base's steps_offset put the
    first timestep past the 1000 it was trained on, and the first step failed with an
    IndexError, exit 1, after the models had loaded. Euler takes 1000."""
    from scenebreak.sample import sampling

    opened = []
    monkeypatch.setattr(sampling, "open_pipeline", lambda *a, **k: opened.append(1) or pytest.fail("loaded"))
    result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--steps", "1000",
                                      "--scheduler", scheduler, "--out-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"Error: --steps 1000 is more than this scene's {scheduler} sampler takes (IndexError")
    assert not opened
    sampling.check_sampler_config(sampling.open_scene(learned.path), scheduler, 999)
    sampling.check_sampler_config(sampling.open_scene(learned.path), "euler", 1000)


def test_the_negative_prompt_is_checked_as_the_prompt_is(learned, tmp_path, monkeypatch):
    """An unknown handle in --negative was read as plain words, exit 0, and a negative
    prompt past CLIP's 77 tokens was cut without a word."""
    from scenebreak.sample import sampling

    def stop(*args, **kwargs):
        raise InvalidInput("stopped where the models would load")

    monkeypatch.setattr(sampling, "open_pipeline", stop)
    result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--negative", "blurry <asset9>",
                                      "--out-dir", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "unknown handle <asset9> in negative prompt 'blurry <asset9>'" in result.stderr
    result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--negative", "blurry " * 80,
                                      "--out-dir", str(tmp_path)])
    assert "warning: negative prompt 'blurry blurry" in result.stderr and "over the text encoder's 77" in result.stderr


def test_the_last_image_of_a_call_has_a_seed_that_makes_it_again(learned, tmp_path):
    """--seed at the ceiling with -n 2 wrote an image whose recorded seed --seed refuses."""
    from scenebreak import extract_background
    from scenebreak.config import MAX_SEED, EditConfig

    GenerateConfig(seed=MAX_SEED - 1, num_images=2).validate()
    for config in (GenerateConfig(seed=MAX_SEED, num_images=2), EditConfig(seed=MAX_SEED - 1, num_images=3)):
        with pytest.raises(InvalidInput,
                           match=rf"image \d would take seed .* use --seed {MAX_SEED - config.num_images + 1} or less"):
            config.validate()
    result = CliRunner().invoke(cli, ["generate", str(learned.path), "<asset1>", "--seed", str(MAX_SEED), "-n", "2",
                                      "--out-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith(f"Error: --seed {MAX_SEED} with -n 2"), result.output
    with pytest.raises(InvalidInput, match="--seed .* with -n 3"):
        extract_background(learned.path, EditConfig(seed=MAX_SEED - 1), variations=3)
    # And extract-bg's variations from a blank prompt (edit and generate refuse one).
    with pytest.raises(InvalidInput, match="--prompt is empty"):
        extract_background(learned.path, variations=1, prompt="   ")
