"""The paper's applications of a learned scene that change an existing image, both
by Blended Latent Diffusion: local editing by example (`edit`) and background
extraction (`extract_background`)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..arguments import config_argument, flag_argument, function_argument, model_argument, path_argument
from ..config import MAX_IMAGES, BackgroundConfig, EditConfig, check_seed_room
from ..device import Device
from ..errors import InvalidInput, UsageError, fixable_failures
from ..events import Message, Progress, Reporter, silent
from ..scenes.bundle import open_scene
from .blending import (blended_latents, blended_steps, decode, encode, feather_weights, latent_grid, latent_masks,
                       paste_back, vae_factor)
from .pipeline import run_in_passes
from .sampling import (GeneratedImage, GenerateResult, images_per_pass, png_parameters, sample_to_files, save_png,
                       slug, start, warn_cpu_time)
from ..images import load_image, load_masks, orientation, rgb_profile
from ..masks.checks import frames_a_hole, mask_warnings
from ..masks.ops import dilate
from ..paths import fit_file_name, is_writable_folder, same_file


def blend_regions(run, image: np.ndarray, masks: list[np.ndarray], prompts: list[str], seeds: list[int],
                  config: EditConfig, resolution: int, *, names: list[str] | None = None, report: Reporter = silent,
                  task: str = "edit", estimate: bool = True) -> list[np.ndarray]:
    """Edit `image` ((H, W, 3) uint8) one region at a time, in order: region j is
    re-made from prompts[j] inside masks[j] ((H, W) bool), on the result of region
    j - 1. Returns one (H, W, 3) image per seed, at the input's size.

    The model works at its own pixel count in the image's aspect ratio. With
    `config.paste`, each region's result is pasted into the full-size image, so
    everything farther than `config.feather` pixels from the masks is the input, bit
    for bit."""
    from PIL import Image

    pipe = run.pipe
    height, width = image.shape[:2]
    # FLUX.1 packs its latents in 2x2 patches, so its sides are multiples of 16, not of the
    # VAE's 8 (an odd latent side failed to pack).
    size, latent_hw = latent_grid((width, height), resolution, pipe.vae_scale_factor, run.scene.family.latent_patch)

    def resize(array: np.ndarray, to: tuple[int, int]) -> np.ndarray:
        if array.shape[1::-1] == to:
            return array
        return np.asarray(Image.fromarray(array).resize(to, Image.Resampling.LANCZOS))

    masks_on_grid = latent_masks(masks, size, latent_hw, names)
    batch = images_per_pass(config, pipe)
    per_sample = blended_steps(config.steps, config.blend_start)
    total = len(seeds) * len(masks) * per_sample
    if estimate:  # (a caller with more sampling to come says the whole time itself)
        warn_cpu_time(run, total, size[0] * size[1], report)
    report(Progress(task, 0, total))  # the bar is up before the first step's wait
    results = []
    seams: dict[int, np.ndarray] = {}  # region -> its feather weights, made once for every image
    first_source = []  # the photo's latents, the first region's start for every seed and pass

    def run_pass(chunk: list[int], more: bool) -> None:
        done = len(results) * len(masks) * per_sample  # (a pass run again after running out of memory starts over)
        full = [image] * len(chunk)
        work = [resize(image, size)] * len(chunk)
        for j, (mask, lmask, prompt) in enumerate(zip(masks, masks_on_grid, prompts)):
            # The first region starts from the same image for every seed: encode it once
            # (not once per pass: on a CPU, a pass per image).
            if j == 0 and not first_source:
                first_source.append(encode(pipe.vae, work[:1]))
            source = first_source[0] if j == 0 else encode(pipe.vae, work)
            with run.precision():
                latents = blended_latents(pipe, run.scene.family, source, lmask, prompt, chunk, steps=config.steps,
                                          guidance=config.guidance,
                                          blend_start=config.blend_start, negative=config.negative, report=report,
                                          task=task, done=done, total=total)
            done += len(chunk) * per_sample
            work = decode(pipe.vae, latents)
            if config.paste:
                if j not in seams:
                    seams[j] = feather_weights(mask, config.feather)
                full = [paste_back(f, resize(w, (width, height)), mask, config.feather, seams[j])
                        for f, w in zip(full, work)]
                work = [resize(f, size) for f in full]
        results.extend(full if config.paste else [resize(w, (width, height)) for w in work])

    # As generate does: a pass that runs out of GPU memory goes again with half as many
    # images (an SDXL or FLUX.1 edit of four at 1024 can be more than the card has left).
    run_in_passes(seeds, batch, run_pass, report)
    return results


def _has_transparency(path: Path) -> bool:
    from PIL import Image

    from ..images import has_alpha

    with Image.open(path) as image:
        return has_alpha(image)


def _is_image(path: Path) -> bool:
    """Whether `path` is an image file (what --overwrite may replace)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return False


@fixable_failures()
def edit(image: str | os.PathLike, regions: list[tuple[str | os.PathLike, str]], scene, config: EditConfig = EditConfig(), *,
         out_dir: str | os.PathLike = ".", output: str | os.PathLike | None = None, overwrite: bool = False,
         device: str | Device | None = None, base_model: str | None = None, report: Reporter = silent) -> GenerateResult:
    """Put the scene's concepts into regions of any photo: `regions` pairs a mask file
    (the photo's size, non-zero = change here) with a prompt such as "a photo of
    <asset1>"; they are applied in order. Writes `config.num_images` PNGs (seeds
    seed, seed+1, ...) of the photo's size, to `output` or into `out_dir`."""
    config = config_argument(config, EditConfig).validate()
    overwrite, out_dir = flag_argument(overwrite, "overwrite"), path_argument(out_dir, "out_dir")
    base_model, report = model_argument(base_model, "base_model"), function_argument(report, "report") or silent
    regions = _regions(regions)
    prompts = [prompt.strip() for _, prompt in regions]
    if not all(prompts):
        raise InvalidInput("every --mask needs a non-empty prompt")
    image_path = path_argument(image, "image")
    mask_paths = [m for m, _ in regions]
    for mask in mask_paths:
        if same_file(mask, image_path):
            raise InvalidInput(f"mask {mask} is the photo itself, not a mask: give a mask of the region to change "
                               "(non-zero = change it)")
    source = load_image(image_path)
    notes = []
    loaded = load_masks(mask_paths, source.size, orientation(source), notes)
    for line in mask_warnings(image_path, source.size, orientation(source), loaded, mask_paths, notes, objects=False):
        report(Message(line, "warning"))
    for path, mask in zip(mask_paths, loaded):
        if frames_a_hole(mask) and _has_transparency(path):  # (a mask of the background around an object is no such)
            report(Message(f"mask {path} changes all of the photo but the transparent part inside it: inverted? Here "
                           "the non-zero part changes, and transparent pixels stay (ComfyUI and OpenAI change the "
                           "transparent part)", "warning"))
    masks = [dilate(m, config.dilate).astype(bool) for m in loaded]
    if output is not None:
        output = path_argument(output, "output")
        if config.num_images > 1:
            raise InvalidInput("--output names one file: use --out-dir with -n above 1")
        if output.suffix.lower() != ".png":
            raise InvalidInput(f"--output {output} must end in .png (lossless, so the untouched area stays exact)")
        if any(same_file(output, m) for m in mask_paths):  # (--overwrite is for the photo, never its masks)
            raise InvalidInput(f"--output {output} is one of the masks: choose another --output")
        if output.exists() and not overwrite:
            raise InvalidInput(f"{output} already exists: pass --overwrite to replace it")
        if output.exists() and not _is_image(output):
            raise InvalidInput(f"{output} is not an image: --overwrite replaces only images; choose another --output")
        if not is_writable_folder(output.parent):
            raise InvalidInput(f"--output {output}: {output.parent} is not a folder you can write to: choose another")
    # A mask too thin for the model's latent grid is said before the models load too.
    scene = open_scene(scene)
    mask_names = [f"mask {p}" for p in mask_paths]
    latent_masks(masks, *latent_grid(source.size, scene.resolution, vae_factor(scene.meta["configs"]["vae"]),
                                     scene.family.latent_patch), mask_names)
    # Where the edits go is checked (and made) before the models load, not after sampling.
    run = start(scene, prompts, config, device=device, base_model=base_model,
                out_dir=output.parent if output is not None else Path(out_dir), report=report)
    seeds = [run.seed + i for i in range(config.num_images)]
    edited = blend_regions(run, np.asarray(source), masks, prompts, seeds, run.config, run.scene.resolution,
                           names=mask_names, report=report)
    label, images = " | ".join(prompts), []
    # Named after every region's prompt, each given a share of the name (the last one's
    # alone named a two-region edit as if it changed one region).
    name = "-".join(slug(p, max(12, 40 // len(prompts))) for p in prompts)
    for s, array in zip(seeds, edited):
        path = output or Path(out_dir) / fit_file_name(image_path.stem, f"-edit-{name}-{s}.png")
        # The photo's colour profile goes with it: the untouched pixels are its own, and
        # must look it beside the photo in a colour-managed viewer (a phone's Display P3).
        text = png_parameters(run.scene, label, s, run.config, array.shape[1::-1], edit=dict(
            blend_start=config.blend_start, feather=config.feather, dilate=config.dilate, paste=config.paste,
            regions=len(prompts)))
        saved = save_png(array, path, overwrite, icc_profile=source.info.get("icc_profile"), text=text)
        images.append(GeneratedImage(saved, label, s, kind="edit"))
    return run.result(images)


def _regions(regions) -> list[tuple[Path, str]]:
    """edit's regions: (mask, prompt) pairs; one pair alone counts as a list of one."""
    if isinstance(regions, tuple) and len(regions) == 2 and isinstance(regions[1], str):
        regions = [regions]
    if isinstance(regions, Iterable) and not isinstance(regions, (str, bytes, Mapping)):
        regions = list(regions)  # (a zip of masks and prompts, a generator)
    if not isinstance(regions, list) or not regions:
        raise InvalidInput("give at least one --mask with its prompt (from Python: a list of (mask, prompt) pairs)")
    pairs = []
    for region in regions:
        if not (isinstance(region, (list, tuple)) and len(region) == 2 and isinstance(region[1], str)):
            raise InvalidInput(f"each region must be a (mask, prompt) pair, not {str(region)[:60]!r}")
        pairs.append((path_argument(region[0], "a region's mask"), region[1]))
    return pairs


@fixable_failures()
def extract_background(scene, config: BackgroundConfig = BackgroundConfig(), *, variations: int = 0, prompt: str | None = None,
                       out_dir: str | os.PathLike = ".", device: str | Device | None = None,
                       base_model: str | None = None, report: Reporter = silent) -> GenerateResult:
    """The scene's background without its objects: a clean plate of the training photo
    (the dilated object regions re-made from "a photo of <background>") and
    `variations` new backgrounds from `prompt` (default "a photo of <background>";
    a template such as "a photo of a car at <background>" works too). An EditConfig
    serves as a BackgroundConfig: its `dilate`, unless set, is the plate's 8 px."""
    config = config_argument(config, EditConfig, BackgroundConfig)
    if type(config) is EditConfig:  # (edit's settings: its dilate, unless set, is 0, where the plate's is 8 px)
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        if config.dilate == EditConfig().dilate:
            del fields["dilate"]
        config = BackgroundConfig(**fields)
    config = config.validate()
    out_dir, base_model = path_argument(out_dir, "out_dir"), model_argument(base_model, "base_model")
    report = function_argument(report, "report") or silent
    if isinstance(variations, bool) or not isinstance(variations, int):
        raise InvalidInput(f"variations must be a whole number, not {type(variations).__name__}")
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInput(f"prompt must be text, not {type(prompt).__name__}")
    if not 0 <= variations <= MAX_IMAGES:
        raise InvalidInput(f"-n must be at least 0 and at most {MAX_IMAGES}")
    check_seed_room(config.seed, variations)
    if prompt is not None and not prompt.strip():  # (as generate and edit refuse one)
        raise InvalidInput("--prompt is empty: give one, or leave --prompt out for \"a photo of <background>\"")
    if config.num_images != 1:  # (a setting it inherits from EditConfig: it would be silently unused)
        raise InvalidInput(f"extract_background makes one clean plate and `variations` new backgrounds: pass "
                           f"variations={config.num_images}, not BackgroundConfig(num_images={config.num_images})")
    scene = open_scene(scene)
    token = scene.background_token
    if token is None:
        raise UsageError(f"scene {scene.name!r} has no <background> handle: learn it again with --background "
                         "(scenebreak learn IMAGE --masks ... --background)")
    plate_prompt = f"a photo of {token}"
    template = (prompt or plate_prompt).strip()
    if token not in template:
        report(Message(f"--prompt {template!r} does not use {token}: the variations will not show the scene's background", "warning"))
    out_dir = Path(out_dir)
    run = start(scene, [template], config, device=device, base_model=base_model, out_dir=out_dir, warn_unused=False,
                report=report)
    seed = run.seed
    objects = np.logical_or.reduce([scene.masks[h.mask_index] > 0 for h in scene.handles if not h.background])
    # On the CPU, the time of the plate and the variations together (the plate's alone was said).
    warn_cpu_time(run, blended_steps(run.config.steps, run.config.blend_start) + variations * run.config.steps,
                  scene.resolution**2, report)
    [plate] = blend_regions(run, scene.image, [dilate(objects, config.dilate).astype(bool)], [plate_prompt], [seed], run.config,
                            scene.resolution, names=["the objects' mask"], report=report, task="clean plate", estimate=False)
    text = png_parameters(scene, plate_prompt, seed, run.config, plate.shape[1::-1], edit=dict(
        blend_start=config.blend_start, feather=config.feather, dilate=config.dilate, paste=config.paste, regions=1))
    # The plate is the photo's crop: its colour profile goes with it, as with an edit's.
    images = [GeneratedImage(save_png(plate, out_dir / fit_file_name(scene.name, f"-background-plate-{seed}.png"),
                                      text=text, icc_profile=rgb_profile(scene.icc_profile)), plate_prompt, seed,
                             kind="plate")]
    if variations:
        sampling = dataclasses.replace(run.config, num_images=variations)
        try:
            made = sample_to_files(run, [template], sampling, seed, out_dir, f"{scene.name}-background", report)
        except BaseException as exc:  # the plate is written too (a run stopped or failed: see sample_to_files)
            if getattr(exc, "partial", None) is not None:
                exc.partial.images[:0] = images
            raise
        for image in made:
            image.kind = "variation"
            images.append(image)
    return run.result(images)
