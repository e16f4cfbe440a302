"""What a base family is to the rest of scenebreak: one interface (`Family`) that the
trainer, the samplers, the scene file and the exports ask, instead of branching on
which family they hold. Each family module (sd.py, sdxl.py) fills it in; the parts
every CLIP-conditioned family shares live here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

# The tokens CLIP's text encoders read, start and end of text included.
CLIP_TOKENS = 77
CLIP_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # attention and MLP


def hub_weight_patterns(path: str) -> tuple[str, ...]:
    """A part's weights as a hub download fetches them: one file, or its shards and their
    index (a part over 10 GB, an SDXL UNet saved in fp32, is stored so)."""
    stem = path.removesuffix(".safetensors")
    return path, f"{stem}-*-of-*.safetensors", f"{path}.index.json"


# What every base model folder of these families holds (a family adds its own parts).
BASE_HUB_FILES = ("model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/config.json",
                  *hub_weight_patterns("text_encoder/model.safetensors"), "unet/config.json",
                  *hub_weight_patterns("unet/diffusion_pytorch_model.safetensors"), "vae/config.json",
                  *hub_weight_patterns("vae/diffusion_pytorch_model.safetensors"))


@dataclass(frozen=True)
class Family:
    """A base family, with the prediction type of the model at hand (epsilon or
    v_prediction). The class attributes are the family's; the methods build what
    differs between families."""

    name: str  # as scenes record it: "SD 1.x", "SD 2.x", "SDXL"
    prediction_type: str = "epsilon"

    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # folders (and scene components), first to last
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer",)
    guidance: ClassVar[float] = 7.5  # the usual classifier-free guidance of its pipeline
    scene_format: ClassVar[int] = 1  # the .scene format version its scenes need
    hub_files: ClassVar[tuple[str, ...]] = BASE_HUB_FILES  # what a base model download fetches
    pooled_text: ClassVar[bool] = False  # its UNet also takes a pooled CLIP vector
    pipeline_name: ClassVar[str] = ""  # its diffusers text-to-image pipeline (model_index.json's _class_name)
    # How kohya's tools name its LoRA: each text encoder's key prefix, and whether the
    # UNet's modules get their original SGM names (kohya.py).
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te"}
    kohya_sgm_unet: ClassVar[bool] = False

    @classmethod
    def of(cls, name: str, prediction_type: str | None) -> "Family":
        """The family member `name` whose scheduler config names `prediction_type`."""
        return cls(name, prediction_type or "epsilon")

    @staticmethod
    def recognise(index: dict, denoiser: dict, text: dict, parts: set[str]) -> str | None:
        """The name of this family's member that a model's configs (model_index.json,
        the denoiser's and the first text encoder's) and `parts` (its subfolders) show,
        or None when they are not of this family."""
        raise NotImplementedError

    @classmethod
    def refusal(cls, index: dict, parts: set[str], what: str, denoiser: dict | None = None) -> str | None:
        """What a folder this family recognised is instead, when scenebreak cannot
        train it (e.g. "an SDXL refiner"), or None; InvalidInput for an incomplete one.
        `denoiser` is its denoiser's config."""
        return None

    # -- models --------------------------------------------------------------------------------
    def text_encoder_class(self, name: str):
        """The transformers class of the text-encoder folder `name`."""
        from transformers import CLIPTextModel

        return CLIPTextModel

    def tokenizer_class(self, name: str):
        """The transformers class of the tokenizer folder `name`, and how many tokens its
        text encoder reads. Named explicitly: the Auto classes would follow a config's
        `auto_map` to custom code."""
        from transformers import CLIPTokenizer

        return CLIPTokenizer, CLIP_TOKENS

    def pipeline_class(self):
        """The diffusers text-to-image pipeline class."""
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler, options: dict | None = None):
        """Its text-to-image pipeline over given models, without a safety checker or
        watermark; `options` are pipeline_options'."""
        raise NotImplementedError

    def pipeline_options(self, index: dict) -> dict:
        """The settings of a base folder's model_index.json (or of a scene's record of
        them) that change what its pipeline makes: none but SDXL's."""
        return {}

    def sampling_vae_dtype(self, vae, dtype):
        """The dtype the VAE samples in when the rest is in `dtype`."""
        return dtype

    # -- training -------------------------------------------------------------------------------
    denoiser: ClassVar[str] = ""  # the denoiser's folder and scene component ("unet")

    def denoiser_class(self):
        """The diffusers class of the denoiser."""
        raise NotImplementedError

    def native_resolution(self, denoiser, vae) -> int:
        """The resolution the base model was trained at."""
        raise NotImplementedError

    def resolution_step(self, denoiser, vae) -> int:
        """Training resolutions must be multiples of this (the denoiser's downsampling
        and the attention loss's maps need whole numbers)."""
        raise NotImplementedError

    def training_schedule(self, scheduler_config: dict):
        """The training noise over the base model's schedule: an object with
        `timesteps(count, generator)`, `add_noise(latents, noise, timesteps)` and
        `target(latents, noise, timesteps)` (what the denoiser should predict: epsilon,
        v, or a flow's velocity)."""
        raise NotImplementedError

    def denoise(self, model, noisy, timesteps, hidden, added):
        """The denoiser's prediction for noisy latents and the conditioning
        `encode_prompts` made."""
        raise NotImplementedError

    attention_text: ClassVar[int] = 0  # the text encoder whose tokens the attention loss reads
    # What its attention layers are: "cross" (a UNet's text cross-attention) or "joint"
    # (text and image tokens in one attention, FLUX's); train/attention.py records each.
    attention_kind: ClassVar[str] = "cross"
    default_tune: ClassVar[str] = ""  # what --tune auto is on this family ("": the memory plan decides)
    # The attention loss's weight unless --lambda-attn says: the paper's 0.01 on the UNet families.
    lambda_attn: ClassVar[float] = 0.01
    samples_in_bf16: ClassVar[bool] = False  # on CUDA: bf16 weights by default (trained and published in it), not fp16
    lora_denoiser_targets: ClassVar[list[str]] = []  # the denoiser's modules LoRA adapts
    # The text encoders' LoRA targets: "*" for all, a folder's name for one that differs
    # ([] for one that gets none).
    lora_text_targets: ClassVar[dict[str, list[str]]] = {"*": CLIP_LORA_TARGETS}
    # The denoiser's layers (name prefixes) that --quantize leaves in full precision: its
    # input, output and conditioning projections, whose rounding every token would feel.
    quantize_skip: ClassVar[tuple[str, ...]] = ()

    def adapterless_text_encoders(self) -> list[str]:
        """The text encoders LoRA gives no adapters (FLUX's T5): under LoRA only their
        handle rows train."""
        default = self.lora_text_targets.get("*", [])
        return [name for name in self.text_encoders if not self.lora_text_targets.get(name, default)]

    def attention_layers(self, model) -> list[str]:
        """Where the attention loss hooks in: the names of the attention processors whose
        maps of the text tokens it reads (InvalidInput where the model has none)."""
        raise NotImplementedError

    def attention_size(self, latent_size: int) -> int:
        """The side of those maps for latents of `latent_size`."""
        raise NotImplementedError

    # -- sampling -------------------------------------------------------------------------------
    samplers: ClassVar[tuple[str, ...]] = ()  # the --scheduler names it samples with, its default first

    def sampler_steps(self, sampler: str) -> int:
        """The usual number of steps of `sampler`."""
        raise NotImplementedError

    def sampler(self, name: str, scheduler_config: dict):
        """The diffusers scheduler of sampler `name` over the base model's schedule."""
        raise NotImplementedError

    def choose_sampler(self, name: str | None, steps: int | None, option: str = "--scheduler") -> tuple[str, int]:
        """The sampler and step count to use: the ones asked for, else the family's
        default sampler and that sampler's usual steps; InvalidInput for a sampler the
        family does not have (naming `option`, the setting that asked for it)."""
        from ..errors import InvalidInput

        name = name or self.samplers[0]
        if name not in self.samplers:
            raise InvalidInput(f"{option} {name}: {self.name} samples with {' or '.join(self.samplers)}")
        return name, steps or self.sampler_steps(name)

    classifier_free: ClassVar[bool] = True  # sampling guides by a second, unconditional pass
    latent_patch: ClassVar[int] = 1  # latent cells per side of one denoiser token (FLUX.1 packs 2x2)
    takes_guidance: ClassVar[bool] = True  # a guidance scale changes its images (FLUX.1 schnell: no)

    def set_timesteps(self, scheduler, steps: int, latent_size: tuple[int, int], device) -> None:
        """The sampler's timesteps for `steps` steps on latents of `latent_size`."""
        scheduler.set_timesteps(steps, device=device)

    def pipeline_kwargs(self) -> dict:
        """What its pipeline's call needs besides the prompt, size, steps and guidance."""
        return {}

    def pipeline_latents(self, latents, latent_size: tuple[int, int]):
        """The pipeline's latent output (output_type="latent") as (B, C, h, w) latents."""
        return latents

    # -- conditioning -----------------------------------------------------------------------------
    # Text encoders (by index) whose states for the class example `encode_prompts` can
    # take ready-made (`class_states`): where one is frozen in a phase, the trainer
    # computes them once instead of every step (FLUX's T5 under LoRA).
    class_state_encoders: ClassVar[tuple[int, ...]] = ()

    def encode_prompts(self, text_encoders: list, ids: list, conditions=None, class_states=None):
        """UNet conditioning for token ids (one (B, 77) tensor per text encoder): the
        `encoder_hidden_states`, and the `added_cond_kwargs` (None where the UNet takes
        none); `conditions` are the family's extra numbers per example
        (`training_conditions`); `class_states` ({encoder index: its output for the last
        row}, for the encoders of `class_state_encoders`) spare encoding that row."""
        raise NotImplementedError

    def training_conditions(self, crop_size: tuple[int, int] | None, resolution: int):
        """The extra conditioning of a training batch [instance, class image] (None where
        the UNet takes none): the instance is a crop of `crop_size` (h, w) from the
        photo resized to `resolution`; the class images were made at `resolution`."""
        return None

    def sampling_conditions(self, size: tuple[int, int]):
        """The extra conditioning of one image sampled at `size` (h, w), as its pipeline
        makes it (None where the UNet takes none)."""
        return None

    def pipeline_conditioning(self, pipe, prompt: str, count: int, guidance: bool, negative: str | None,
                              size: tuple[int, int], embedded_guidance: float | None = None):
        """What the UNet is conditioned on for `count` images of `prompt` at `size`,
        built by the pipeline itself (unconditional first when `guidance`): the text
        embeddings and the added conditions (None where the UNet takes none).
        `embedded_guidance`: the scale a model that embeds its guidance (FLUX.1 dev)
        is given (default: its usual); the others take none."""
        raise NotImplementedError

    # -- files other tools load ----------------------------------------------------------------------
    def textual_inversion(self, token: str, rows: list) -> dict:
        """A handle's textual-inversion file as diffusers' `load_textual_inversion`
        reads it, from its rows in each text encoder."""
        raise NotImplementedError

    def a1111_embedding(self, rows: list) -> dict:
        """A handle's embedding file as AUTOMATIC1111, Forge and ComfyUI read it."""
        raise NotImplementedError

    @property
    def a1111_version(self) -> str:
        """The version A1111 and Forge file a LoRA under (its `.json` card's "sd version")."""
        raise NotImplementedError

    @property
    def kohya_version(self) -> str:
        """kohya's `ss_base_model_version`."""
        raise NotImplementedError

    @property
    def modelspec_architecture(self) -> str:
        """The ModelSpec architecture of the base model (a LoRA's adds "/lora")."""
        raise NotImplementedError


def vae_scale(vae) -> int:
    """How many pixels a latent spans: the VAE halves the image per block after its first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_normalisation(vae) -> tuple[float, float]:
    """(shift, scale) of a VAE's config: the denoiser's latents are (the VAE's latents -
    shift) * scale (SD and SDXL shift by nothing; FLUX.1's VAE by 0.1159)."""
    return float(getattr(vae.config, "shift_factor", None) or 0.0), float(vae.config.scaling_factor)


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
