"""Text-to-image with a learned scene: `generate(scene, prompts)`."""

from __future__ import annotations

import os
from pathlib import Path

from .bundle import open_scene
from .config import GenerateConfig
from .device import Device
from .errors import InvalidInput
from .events import Reporter, silent
from .sampling import GenerateResult, sample_to_files, start, warn_cpu_time
from .tokens import prompt_for


def variation_prompt(scene) -> str:
    """The paper's image variations: every object handle in one prompt."""
    return prompt_for(scene.object_tokens)


def generate(scene, prompts: list[str] | str | None, config: GenerateConfig = GenerateConfig(), *,
             out_dir: str | os.PathLike = ".", device: str | Device | None = None, variations: bool = False,
             base_model: str | None = None, report: Reporter = silent) -> GenerateResult:
    """Generate `config.num_images` images per prompt and write them as PNGs to `out_dir`.

    Image i of a prompt is seeded with `seed + i`, so any single image can be remade.
    `variations=True` (no prompts) uses "a photo of <asset1> and <asset2> ...": the
    scene's objects re-arranged in new surroundings."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    prompts = [p.strip() for p in prompts if p and p.strip()]
    config = config.validate()
    if variations and prompts:
        raise InvalidInput("--variations makes its own prompt (all the scene's objects): give no PROMPT with it")
    if not prompts and not variations:
        raise InvalidInput("no prompt given")
    scene = open_scene(scene)
    if variations:
        prompts = [variation_prompt(scene)]
    run = start(scene, prompts, config, device=device, base_model=base_model, out_dir=Path(out_dir), report=report)
    warn_cpu_time(run.pipe, len(prompts) * config.num_images * config.steps, scene.resolution**2, report)
    return run.result(sample_to_files(run.pipe, scene, prompts, run.config, run.seed, Path(out_dir), scene.name, report))
