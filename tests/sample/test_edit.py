"""`edit`, `extract-bg`, `learn --background` and `generate --variations` on the tiny model."""

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from scenebreak.scenes.bundle import load_scene
from scenebreak.cli.commands import cli
from scenebreak.config import EditConfig
from scenebreak.sample.edit import edit, extract_background
from scenebreak.masks.ops import dilate
from scenebreak.errors import InvalidInput, InvalidMask, UnknownHandle, UsageError
from scenebreak.events import Progress

FAST = dict(steps=4, seed=5)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def photo(tmp_path):
    """A non-square photo (100x70) with two regions to edit."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (70, 100, 3), dtype=np.uint8)
    left, right = np.zeros((70, 100), np.uint8), np.zeros((70, 100), np.uint8)
    left[10:40, 5:40] = 255
    right[30:65, 55:95] = 255
    paths = tmp_path / "street.jpg", tmp_path / "left.png", tmp_path / "right.png"
    Image.fromarray(image).save(paths[0], quality=95)
    Image.fromarray(left).save(paths[1])
    Image.fromarray(right).save(paths[2])
    return paths


def test_edit_changes_the_region_and_keeps_the_rest_bit_for_bit(learned, photo, tmp_path):
    image, left, _ = photo
    result = edit(image, [(left, "a photo of <asset1>")], learned.path, EditConfig(feather=3, num_images=2, **FAST),
                  out_dir=tmp_path / "out")
    assert [i.seed for i in result.images] == [5, 6]
    source = pixels(image)  # as decoded from the JPEG
    mask = pixels(left)[..., 0] > 0
    far = dilate(mask, 3) == 0
    for item in result.images:
        out = pixels(item.path)
        assert out.shape == source.shape
        assert np.array_equal(out[far], source[far])
        assert np.abs(out[mask].astype(int) - source[mask].astype(int)).mean() > 5
    assert not np.array_equal(pixels(result.images[0].path), pixels(result.images[1].path))


def test_an_edit_carries_the_photos_colour_profile_and_warns_of_a_soft_mask(learned, photo, tmp_path):
    """The untouched pixels are the photo's: untagged, a colour-managed viewer showed
    them in other colours than the photo beside it (a phone's Display P3)."""
    from PIL import ImageCms

    image, left, _ = photo
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()  # an RGB profile
    Image.open(image).save(tmp_path / "tagged.jpg", quality=95, icc_profile=profile)
    soft = pixels(left)[..., 0].copy()
    soft[soft == 0] = 3  # a faint halo over the whole photo
    Image.fromarray(soft).save(tmp_path / "soft.png")
    messages = []
    result = edit(tmp_path / "tagged.jpg", [(tmp_path / "soft.png", "<asset1>")], learned.path,
                  EditConfig(num_images=1, **FAST), out_dir=tmp_path / "out", report=messages.append)
    assert Image.open(result.images[0].path).info.get("icc_profile") == profile
    assert any("is soft" in getattr(m, "text", "") for m in messages)
    progress = [(e.completed, e.total) for e in messages if isinstance(e, Progress)]
    assert progress[0][0] == 0 and progress[-1][0] == progress[-1][1] > 0, progress  # the bar is up from the start
    untagged = edit(image, [(left, "<asset1>")], learned.path, EditConfig(num_images=1, **FAST), out_dir=tmp_path / "o2")
    assert "icc_profile" not in Image.open(untagged.images[0].path).info
    # A profile of another colour space (a grey photo's grey one) does not describe the
    # RGB edit: the PNG was invalid, its colours unmanageable. It is left out.
    other = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    Image.open(image).convert("L").save(tmp_path / "grey.png", icc_profile=other)
    grey = edit(tmp_path / "grey.png", [(left, "<asset1>")], learned.path, EditConfig(num_images=1, **FAST),
                out_dir=tmp_path / "o3")
    assert "icc_profile" not in Image.open(grey.images[0].path).info


def test_guidance_and_the_negative_prompt_reach_the_edit(learned, photo, tmp_path):
    image, left, _ = photo
    made = [pixels(edit(image, [(left, "a photo of <asset1>")], learned.path, EditConfig(**FAST, **options),
                        out_dir=tmp_path / str(i)).images[0].path)
            for i, options in enumerate([{}, {"guidance": 1.5}, {"negative": "blue"}])]
    assert not np.array_equal(made[0], made[1]) and not np.array_equal(made[0], made[2])


def test_the_batch_size_does_not_change_the_edits(learned, photo, tmp_path, monkeypatch):
    """... and the photo is encoded once, not once per pass (a pass per image on a CPU)."""
    import scenebreak.sample.edit as edit_module

    encoded, real = [], edit_module.encode
    monkeypatch.setattr(edit_module, "encode", lambda vae, images: encoded.append(len(images)) or real(vae, images))
    image, left, _ = photo
    one, two = (edit(image, [(left, "a photo of <asset1>")], learned.path,
                     EditConfig(num_images=2, batch_size=size, **FAST), out_dir=tmp_path / f"b{size}")
                for size in (1, 2))
    for a, b in zip(one.images, two.images):
        assert a.seed == b.seed and np.abs(pixels(a.path).astype(int) - pixels(b.path).astype(int)).max() <= 1
    assert encoded == [1, 1]  # one region: the photo once per call, whatever the passes


def test_no_paste_keeps_the_size_but_not_the_pixels(learned, photo, tmp_path):
    image, left, _ = photo
    result = edit(image, [(left, "a photo of <asset1>")], learned.path, EditConfig(paste=False, **FAST), out_dir=tmp_path)
    out, source = pixels(result.images[0].path), pixels(image)
    assert out.shape == source.shape
    far = dilate(pixels(left)[..., 0] > 0, 8) == 0
    assert not np.array_equal(out[far], source[far])  # decoded by the VAE, resized back


def test_regions_apply_in_order_like_successive_edits(learned, tmp_path):
    """On a 64x64 photo (the tiny model's own size, so nothing is resized), two regions
    in one call equal editing the first, then editing that result's second region."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    a, b = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    a[4:30, 4:40] = 255
    b[20:60, 24:60] = 255  # overlaps a
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    config = EditConfig(**FAST)
    regions = [(tmp_path / "a.png", "a photo of <asset1>"), (tmp_path / "b.png", "a photo of <asset2>")]
    both = edit(tmp_path / "p.png", regions, learned.path, config, out_dir=tmp_path / "both").images[0].path
    first = edit(tmp_path / "p.png", regions[:1], learned.path, config, out_dir=tmp_path / "1").images[0].path
    second = edit(first, regions[1:], learned.path, config, out_dir=tmp_path / "2").images[0].path
    assert np.array_equal(pixels(both), pixels(second))
    assert both.name.startswith("p-edit-a-photo-of-asset1-a-photo-of-asset2-")  # every region's prompt names it
    reversed_ = edit(tmp_path / "p.png", regions[::-1], learned.path, config, out_dir=tmp_path / "r").images[0].path
    assert not np.array_equal(pixels(both), pixels(reversed_))
    # What made it, as generate's images carry it (an edit's carried nothing): A1111's
    # inpainting keys, and the edit settings in scenebreak's JSON.
    info = Image.open(both).info
    assert info["parameters"].startswith("a photo of <asset1> | a photo of <asset2>\nSteps: ")
    assert ", Denoising strength: 0.75, Mask blur: 8" in info["parameters"]
    settings = json.loads(info["scenebreak"])
    assert settings["edit"] == {"blend_start": 0.25, "feather": 8, "dilate": 0, "paste": True, "regions": 2}
    assert settings["size"] == [64, 64] and settings["seed"] == config.seed


@pytest.mark.parametrize("scheduler", ["dpm", "ddim", "euler"])
def test_edit_starts_every_sampler_at_the_unets_scale(learned, tmp_path, scheduler):
    """`--blend-start` skips the schedule's top levels, so the start must be at the
    level of the first step run: the UNet's first input has unit scale for every
    `--scheduler` (Euler's noise * init_noise_sigma once gave it a std of 3 to 4)."""
    import torch
    from diffusers import UNet2DConditionModel

    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 8:56] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    inputs = []

    def record(module, args):
        if isinstance(module, UNet2DConditionModel):
            inputs.append(args[0].detach().float().clone())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(record)
    try:
        edit(tmp_path / "p.png", [(tmp_path / "m.png", "a photo of <asset1>")], learned.path,
             EditConfig(scheduler=scheduler, steps=8, seed=1, precision="fp32"), out_dir=tmp_path / "out")
    finally:
        hook.remove()
    assert len(inputs) == 6  # 8 steps, the first 2 skipped
    assert 0.8 < inputs[0].std() < 1.25, float(inputs[0].std())


def test_edit_errors_are_clear_and_write_nothing(learned, photo, tmp_path):
    image, left, right = photo
    out = tmp_path / "out"
    Image.new("L", (10, 10), 255).save(tmp_path / "small.png")
    Image.new("L", (100, 70), 0).save(tmp_path / "empty.png")
    cases = [
        ([(tmp_path / "small.png", "<asset1>")], InvalidMask, "must match the image size"),
        ([(tmp_path / "empty.png", "<asset1>")], InvalidMask, "is empty"),
        ([(tmp_path / "nope.png", "<asset1>")], InvalidInput, "not found"),
        ([(left, "a photo of <asset9>")], UnknownHandle, "<asset9>"),
        ([(left, "  ")], InvalidInput, "non-empty prompt"),
    ]
    for regions, error, message in cases:
        with pytest.raises(error, match=message):
            edit(image, regions, learned.path, EditConfig(**FAST), out_dir=out)
    with pytest.raises(InvalidInput, match="blend-start"):
        edit(image, [(left, "<asset1>")], learned.path, EditConfig(blend_start=1.0), out_dir=out)
    with pytest.raises(InvalidInput, match="already exists"):
        edit(image, [(left, "<asset1>")], learned.path, EditConfig(**FAST), output=right)
    assert not out.exists()


def test_a_thin_mask_asks_for_dilate(learned, photo, tmp_path, monkeypatch):
    image, _, _ = photo
    from scenebreak.sample.blending import latent_mask, resize_mask, work_size

    def line(row):
        mask = np.zeros((70, 100), np.uint8)
        mask[row, 10:90] = 255
        return mask

    size = work_size((100, 70), 64)  # the tiny model's latents are half its pixels
    row = next(r for r in range(70) if not latent_mask(resize_mask(line(r) > 0, size), (size[1] // 2, size[0] // 2)).any())
    thin = line(row)  # one pixel high, on a row the nearest-neighbour grid skips
    Image.fromarray(thin).save(tmp_path / "thin.png")
    with pytest.raises(InvalidMask, match="--dilate"):
        edit(image, [(tmp_path / "thin.png", "<asset1>")], learned.path, EditConfig(**FAST), out_dir=tmp_path)
    # ... said before the models load (it waited for a whole SDXL or FLUX.1 load).
    with monkeypatch.context() as patched:
        patched.setattr("scenebreak.sample.edit.start", lambda *a, **k: pytest.fail("the models were loaded"))
        with pytest.raises(InvalidMask, match="--dilate"):
            edit(image, [(tmp_path / "thin.png", "<asset1>")], learned.path, EditConfig(**FAST), out_dir=tmp_path)
    result = edit(image, [(tmp_path / "thin.png", "<asset1>")], learned.path, EditConfig(dilate=3, **FAST), out_dir=tmp_path)
    assert result.images[0].path.exists()


def test_edit_cli_prints_only_paths_and_guards_the_input(learned, photo, tmp_path):
    image, left, right = photo
    result = run("edit", image, "--mask", left, "--scene", learned.path, "a photo of <asset1>", "--steps", 3, "--seed", 1,
                 "-n", 2, "--out-dir", tmp_path / "o")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.endswith(".png") and Image.open(line).size == (100, 70) for line in lines)
    multi = run("edit", image, "--scene", learned.path, "-m", left, "-p", "<asset1>", "-m", right, "-p", "<asset2>",
                "--steps", 3, "--json", "-o", tmp_path / "two.png")
    assert multi.exit_code == 0, multi.output
    assert json.loads(multi.stdout)["images"][0]["path"] == str(tmp_path / "two.png")
    # An existing file, the input included, is replaced only with --overwrite (or --force, as elsewhere).
    target = tmp_path / "in.png"
    Image.open(image).save(target)
    before = target.read_bytes()
    refused = run("edit", target, "-m", left, "--scene", learned.path, "<asset1>", "--steps", 3, "-o", target)
    assert refused.exit_code == 2 and "--overwrite" in refused.stderr and target.read_bytes() == before
    replaced = run("edit", target, "-m", left, "--scene", learned.path, "<asset1>", "--steps", 3, "-o", target, "--force")
    assert replaced.exit_code == 0 and target.read_bytes() != before
    mask_before = left.read_bytes()  # a mask is never the output, --overwrite or not
    onto_mask = run("edit", image, "-m", left, "--scene", learned.path, "<asset1>", "--steps", 3, "-o", left, "--overwrite")
    assert onto_mask.exit_code == 2 and "is one of the masks" in onto_mask.stderr and left.read_bytes() == mask_before
    unpaired = run("edit", image, "--scene", learned.path, "-m", left, "-m", right, "-p", "<asset1>")
    assert unpaired.exit_code == 2 and "one prompt per --mask" in unpaired.stderr


def test_learn_background_adds_a_handle_for_the_rest_of_the_photo(learned_background):
    scene = load_scene(learned_background.path)
    assert scene.tokens == ["<asset1>", "<asset2>", "<background>"]
    assert scene.object_tokens == ["<asset1>", "<asset2>"] and scene.background_token == "<background>"
    objects = scene.masks[0] | scene.masks[1]
    assert np.array_equal(scene.masks[2], 1 - objects)  # the complement, within the crop
    assert scene.meta["config"]["background"] is True
    shown = run("show", learned_background.path)
    assert "<background> (the rest of the photo)" in shown.stdout


def test_background_handle_tokens_and_init_words():
    from scenebreak import LearnConfig

    config = LearnConfig(names=("cat", "bowl"), init_words=("cat", "bowl"), background=True)
    assert config.handle_tokens(2) == ["<cat>", "<bowl>", "<background>"]
    assert config.handle_init_words() == ("cat", "bowl", "background")
    assert LearnConfig().handle_tokens(1) == ["<asset1>"] and LearnConfig().handle_init_words() is None


def test_learn_background_refuses_masks_that_cover_everything(tiny_model, tmp_path):
    from scenebreak import LearnConfig, learn

    Image.new("RGB", (64, 64), (200, 0, 0)).save(tmp_path / "p.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "all.png")
    with pytest.raises(InvalidMask, match="nothing is left for <background>"):
        learn(tmp_path / "p.png", [tmp_path / "all.png"], LearnConfig(steps1=1, steps2=0, prior=False, background=True),
              base_model=str(tiny_model), output=tmp_path / "x.scene")
    assert not (tmp_path / "x.scene").exists()


def test_extract_bg_makes_a_plate_and_variations(learned_background, tmp_path):
    result = extract_background(learned_background.path, EditConfig(dilate=2, feather=2, **FAST), variations=2,
                                prompt="a photo of a car at <background>", out_dir=tmp_path)
    kinds = [i.kind for i in result.images]
    assert kinds == ["plate", "variation", "variation"]
    scene = load_scene(learned_background.path)
    plate = pixels(result.images[0].path)
    assert plate.shape == scene.image.shape
    objects = dilate((scene.masks[0] | scene.masks[1]) > 0, 2) > 0
    far = dilate(objects, 2) == 0
    assert np.array_equal(plate[far], scene.image[far])  # the background itself is kept
    assert not np.array_equal(plate[objects], scene.image[objects])  # the objects are re-made
    assert {i.prompt for i in result.images[1:]} == {"a photo of a car at <background>"}
    assert json.loads(Image.open(result.images[0].path).info["scenebreak"])["edit"]["dilate"] == 2
    # --no-paste: the whole plate is the model's, the background decoded by the VAE too.
    unpasted = extract_background(learned_background.path, EditConfig(dilate=2, feather=2, paste=False, **FAST),
                                  out_dir=tmp_path / "unpasted")
    assert not np.array_equal(pixels(unpasted.images[0].path)[far], scene.image[far])
    # edit's settings without a dilate: the plate's 8 px, not edit's 0 (no trace of the objects' edges).
    default = extract_background(learned_background.path, EditConfig(**FAST), out_dir=tmp_path / "default")
    assert json.loads(Image.open(default.images[0].path).info["scenebreak"])["edit"]["dilate"] == 8


def test_extract_bg_without_a_background_handle_says_how_to_fix_it(learned, tmp_path):
    with pytest.raises(UsageError, match="learn it again with --background"):
        extract_background(learned.path, EditConfig(**FAST), out_dir=tmp_path)
    result = run("extract-bg", learned.path, "--out-dir", tmp_path)
    assert result.exit_code == 2 and "--background" in result.stderr
    assert not list(tmp_path.iterdir())


def test_extract_bg_cli_prints_the_plate_first(learned_background, tmp_path):
    result = run("extract-bg", learned_background.path, "-n", 1, "--steps", 3, "--seed", 2, "--out-dir", tmp_path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and "plate" in lines[0] and all(Image.open(line).size == (64, 64) for line in lines)


def test_variations_prompt_names_every_object_but_not_the_background(learned_background, tmp_path):
    from scenebreak import GenerateConfig, generate

    result = generate(learned_background.path, None, GenerateConfig(num_images=2, steps=3, seed=1), variations=True, out_dir=tmp_path)
    assert [i.prompt for i in result.images] == ["a photo of <asset1> and <asset2>"] * 2
    cli_result = run("generate", learned_background.path, "--variations", "--steps", 2, "--out-dir", tmp_path, "--json")
    assert cli_result.exit_code == 0, cli_result.output
    assert json.loads(cli_result.stdout)["images"][0]["prompt"] == "a photo of <asset1> and <asset2>"
    both = run("generate", learned_background.path, "<asset1>", "--variations")
    assert both.exit_code == 2 and "--variations" in both.stderr


def test_edit_makes_fewer_images_a_pass_after_running_out_of_memory(learned, photo, tmp_path, monkeypatch):
    """`edit -n 3` in passes of 4 that run out of GPU memory (an SDXL or FLUX.1 edit at
    1024): halved passes with a note, as generate does, the same images as one at a
    time; it failed outright."""
    import torch

    import scenebreak.sample.edit as edit_module

    image, left, right = photo
    regions = [(left, "a photo of <asset1>"), (right, "a photo of <asset2>")]
    config = EditConfig(num_images=3, **FAST)
    expected = [pixels(i.path) for i in edit(image, regions, learned.path, dataclasses.replace(config, batch_size=1),
                                             out_dir=tmp_path / "single").images]
    real, passes = edit_module.blended_latents, []

    def blended_latents(pipe, family, source, mask, prompt, seeds, **kwargs):
        passes.append(len(seeds))
        if len(seeds) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(pipe, family, source, mask, prompt, seeds, **kwargs)

    monkeypatch.setattr(edit_module, "blended_latents", blended_latents)
    messages = []
    result = edit(image, regions, learned.path, dataclasses.replace(config, batch_size=4), out_dir=tmp_path / "shrinking",
                  report=messages.append)
    assert passes == [3, 2, 1, 1, 1, 1, 1, 1]  # (one image, two regions: two calls a pass)
    assert [m.text for m in messages if "out of memory" in getattr(m, "text", "")] == [
        "out of memory making 3 images at a time: 2 at a time now",
        "out of memory making 2 images at a time: 1 at a time now"]
    assert all(np.array_equal(pixels(i.path), e) for i, e in zip(result.images, expected))


def test_masks_given_as_learn_takes_them_are_refused_not_read_as_a_prompt(learned, photo, tmp_path):
    """`edit IMG --mask a.png b.png`, as `learn --masks a b` is written: b.png was the
    prompt, and a meaningless edit ran."""
    image, left, right = photo
    result = run("edit", image, "--scene", learned.path, "--mask", left, right, "--out-dir", tmp_path / "out")
    assert result.exit_code == 2 and "is a file" in result.stderr and "--mask" in result.stderr, result.output
    result = run("edit", image, "--scene", learned.path, "--mask", left, right, "-p", "<asset1>")
    assert result.exit_code == 2 and "is a file" in result.stderr, result.output  # (not "PROMPT or --prompt, not both")
    assert not (tmp_path / "out").exists()


def test_extract_bg_on_the_cpu_says_the_time_of_its_variations_too(learned_background, tmp_path, monkeypatch):
    """Its estimate counted the clean plate alone: "roughly 2 min" for a run of about 10."""
    import scenebreak.estimates as estimates
    from scenebreak.config import BackgroundConfig
    from scenebreak.events import Message
    from scenebreak.sample.blending import blended_steps

    monkeypatch.setattr(estimates, "cpu_sampling_seconds", lambda *a, **k: 30.0)  # (a tiny model takes far less)
    config = BackgroundConfig(steps=2, seed=0)
    said = []
    extract_background(learned_background.path, config, variations=3, out_dir=tmp_path, report=said.append)
    estimated = [m.text for m in said if isinstance(m, Message) and "on the CPU this takes roughly" in m.text]
    steps = blended_steps(2, config.blend_start) + 3 * 2
    assert estimated == [f"on the CPU this takes roughly {estimates.format_duration(30.0 * steps)}; a CUDA GPU takes "
                         "seconds (--device cuda)"]


@pytest.mark.parametrize("scene", ["learned", "learned_sdxl"])
def test_the_latent_grid_read_from_the_scene_is_the_pipelines(scene, request):
    """edit checks masks against the latent grid before the models load, from the
    scene's recorded VAE config: it must be the grid the loaded pipeline works on."""
    from scenebreak.device import choose_device
    from scenebreak.sample.blending import vae_factor
    from scenebreak.sample.scene_models import open_pipeline

    scene = load_scene(request.getfixturevalue(scene).path)
    pipe = open_pipeline(scene, choose_device("cpu"))
    factor = vae_factor(scene.meta["configs"]["vae"])
    assert factor == pipe.vae_scale_factor
    assert factor * scene.family.latent_patch == pipe.image_processor.config.vae_scale_factor


def test_the_photo_as_its_own_mask_is_refused_and_an_inverted_mask_is_warned_of(learned, photo, tmp_path):
    """The photo given as its mask re-made the whole photo without a word; a mask whose
    transparent hole marks the spot (ComfyUI's and OpenAI's way) re-made all but it."""
    image, left, _ = photo
    with pytest.raises(InvalidInput, match="is the photo itself, not a mask"):
        edit(image, [(image, "<asset1>")], learned.path, EditConfig(**FAST), out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    erased = np.full((70, 100, 4), 255, np.uint8)
    erased[20:50, 30:70, 3] = 0  # the spot to change, erased
    Image.fromarray(erased, "RGBA").save(tmp_path / "erased.png")
    messages = []
    edit(image, [(tmp_path / "erased.png", "<asset1>")], learned.path, EditConfig(**FAST), out_dir=tmp_path / "b",
         report=messages.append)
    assert any("changes all of the photo but the transparent part inside it: inverted?" in getattr(m, "text", "")
               for m in messages)
    # An opaque mask of all but the object (a new background around it) is an edit of its own.
    around = np.full((70, 100), 255, np.uint8)
    around[20:50, 30:70] = 0
    Image.fromarray(around).save(tmp_path / "around.png")
    for mask in (left, tmp_path / "around.png"):
        messages.clear()
        edit(image, [(mask, "<asset1>")], learned.path, EditConfig(**FAST), out_dir=tmp_path / "c", report=messages.append)
        assert not any("inverted" in getattr(m, "text", "") for m in messages)


def test_the_denoising_strength_recorded_is_the_share_of_steps_run(learned):
    """`--steps 1 --blend-start 0.5` skips no step, yet the PNG said "Denoising strength:
    0.5"; at the defaults 19 of 25 steps run, and it said 0.75."""
    from scenebreak.config import GenerateConfig
    from scenebreak.sample.sampling import png_parameters

    scene = load_scene(learned.path)
    settings = dict(blend_start=0.5, feather=8, dilate=0, paste=True, regions=1)
    text = png_parameters(scene, "<asset1>", 0, GenerateConfig(steps=1, scheduler="dpm"), (64, 64), edit=settings)
    assert "Denoising strength: 1.0," in text["parameters"]
    text = png_parameters(scene, "<asset1>", 0, GenerateConfig(steps=25, scheduler="dpm"), (64, 64),
                          edit=dict(settings, blend_start=0.25))
    assert "Denoising strength: 0.76," in text["parameters"]


def test_the_clean_plate_carries_the_photos_colour_profile(tiny_model, tmp_path):
    """The plate is the photo's own pixels outside the objects, but was written
    untagged: a phone's Display P3 photo beside its plate showed other colours in a
    colour-managed viewer. The scene keeps the profile; a stranger's scene with junk in
    its place gets an untagged plate, and a huge one is refused."""
    import torch
    from PIL import ImageCms

    from helpers import craft, write_synthetic_scene
    from scenebreak import LearnConfig, learn
    from scenebreak.errors import BundleError

    image, red, blue = write_synthetic_scene(tmp_path / "in")
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.open(image).save(tmp_path / "tagged.png", icc_profile=profile)
    learned = learn(tmp_path / "tagged.png", [red, blue], LearnConfig(steps1=1, steps2=1, prior=False, background=True),
                    base_model=str(tiny_model), output=tmp_path / "tagged.scene")
    assert load_scene(learned.path).icc_profile == profile
    assert load_scene(learned.path).meta["format_version"] == 4  # (an older version is told to upgrade)
    plate = extract_background(learned.path, EditConfig(**FAST), out_dir=tmp_path / "plate").images[0].path
    assert Image.open(plate).info.get("icc_profile") == profile

    junk = craft(learned.path, tmp_path / "junk.scene",
                 tensors={"source.icc_profile": torch.frombuffer(bytearray(b"not a profile"), dtype=torch.uint8)})
    plate = extract_background(junk, EditConfig(**FAST), out_dir=tmp_path / "junk").images[0].path
    assert "icc_profile" not in Image.open(plate).info
    huge = craft(learned.path, tmp_path / "huge.scene", tensors={"source.icc_profile": torch.zeros(2**23, dtype=torch.uint8)})
    with pytest.raises(BundleError, match="colour profile"):
        load_scene(huge)
    early = craft(learned.path, tmp_path / "early.scene", meta=lambda m: m.update(format_version=3))
    with pytest.raises(BundleError, match="source.icc_profile"):  # (format 3 has no such tensor)
        load_scene(early)
