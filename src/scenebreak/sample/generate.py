"""Text-to-image with a learned scene: `generate(scene, prompts)`."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..arguments import (config_argument, flag_argument, function_argument, model_argument, path_argument,
                         text_arguments)
from ..config import GenerateConfig
from ..device import Device
from ..errors import InvalidInput, fixable_failures
from ..events import Reporter, silent
from ..handles import prompt_for
from ..paths import fit_file_name
from ..scenes.bundle import open_scene
from .sampling import GeneratedImage, GenerateResult, sample_to_files, save_png, start, warn_cpu_time


def variation_prompt(scene) -> str:
    """The paper's image variations: every object handle in one prompt."""
    return prompt_for(scene.object_tokens)


def contact_sheet(paths: list[Path], columns: int, gap: int = 4):
    """The images at `paths` tiled row by row, `columns` per row, on white with `gap`
    pixels between them, each at the size of the first."""
    from PIL import Image

    with Image.open(paths[0]) as first:
        width, height = first.size
    rows = -(-len(paths) // columns)
    sheet = Image.new("RGB", (columns * width + (columns - 1) * gap, rows * height + (rows - 1) * gap), "white")
    for i, path in enumerate(paths):
        with Image.open(path) as im:
            tile = im.convert("RGB").resize((width, height)) if im.size != (width, height) else im.convert("RGB")
        sheet.paste(tile, ((i % columns) * (width + gap), (i // columns) * (height + gap)))
    return sheet


def grid_columns(prompts: int, per_prompt: int) -> int:
    """One row per prompt when there are several, else as square as it gets."""
    if prompts > 1 and per_prompt > 1:
        return per_prompt
    return math.ceil(math.sqrt(prompts * per_prompt))


@fixable_failures()
def generate(scene, prompts: list[str] | str | None, config: GenerateConfig = GenerateConfig(), *,
             out_dir: str | os.PathLike = ".", device: str | Device | None = None, variations: bool = False,
             grid: bool = False, base_model: str | None = None, report: Reporter = silent,
             should_stop=None) -> GenerateResult:
    """Generate `config.num_images` images per prompt and write them as PNGs to `out_dir`.

    Image i of a prompt is seeded with `seed + i`, so any single image can be remade.
    `variations=True` (no prompts) uses "a photo of <asset1> and <asset2> ...": the
    scene's objects re-arranged in new surroundings. `grid=True` also writes a contact
    sheet of all the images (one row per prompt), listed last with kind "grid".
    `should_stop()` (optional) is polled after each pass of images: when it turns true,
    `Interrupted` is raised, the images written so far kept."""
    prompts = [p.strip() for p in text_arguments(prompts, "prompts", allow_none=True) if p.strip()]
    config = config_argument(config, GenerateConfig).validate()
    variations, grid = flag_argument(variations, "variations"), flag_argument(grid, "grid")
    out_dir, base_model = path_argument(out_dir, "out_dir"), model_argument(base_model, "base_model")
    report, should_stop = function_argument(report, "report") or silent, function_argument(should_stop, "should_stop")
    if variations and prompts:
        raise InvalidInput("--variations makes its own prompt (all the scene's objects): give no PROMPT with it")
    if not prompts and not variations:
        raise InvalidInput("no prompt given")
    scene = open_scene(scene)
    if variations:
        prompts = [variation_prompt(scene)]
    run = start(scene, prompts, config, device=device, base_model=base_model, out_dir=Path(out_dir), report=report)
    warn_cpu_time(run, len(prompts) * config.num_images * run.config.steps, scene.resolution**2, report)
    images = sample_to_files(run, prompts, run.config, run.seed, Path(out_dir), scene.name, report, should_stop)
    if grid:
        sheet = contact_sheet([i.path for i in images], grid_columns(len(prompts), config.num_images))
        path = save_png(sheet, Path(out_dir) / fit_file_name(scene.name, f"-grid-{run.seed}.png"))
        images.append(GeneratedImage(path, " | ".join(prompts), run.seed, kind="grid"))
    return run.result(images)
