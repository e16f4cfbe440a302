"""FLUX.1 dev and schnell: a rectified-flow transformer (FluxTransformer2DModel) over
16-channel latents packed 2x2 into tokens. Only T5-XXL's last hidden state enters its
joint attention; CLIP-L gives the pooled vector; dev also embeds the guidance scale it
was distilled with. Everything here is built as FluxPipeline builds it.

Told apart by the transformer's config alone: dev embeds guidance, schnell does not
(derivatives of the same architecture are taken as the one they match). Kontext,
Fill, Depth/Canny, Redux and the FLUX.2 family are refused by name."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ..errors import InvalidInput
from .family import CLIP_LORA_TARGETS, CLIP_TOKENS, Family, vae_scale

FLUX_DEV, FLUX_SCHNELL = "FLUX.1 dev", "FLUX.1 schnell"
PIPELINE = "FluxPipeline"
TRANSFORMER = "FluxTransformer2DModel"
LATENT_CHANNELS = 16
PACKED_CHANNELS = LATENT_CHANNELS * 2 * 2  # the transformer's in_channels: 2x2 patches of latents
# The T5 tokens each member reads (what its pipeline is run with: FluxPipeline's
# max_sequence_length; schnell was distilled at 256).
T5_TOKENS = {FLUX_DEV: 512, FLUX_SCHNELL: 256}
GUIDANCE = {FLUX_DEV: 3.5, FLUX_SCHNELL: 0.0}  # dev's embedded guidance; schnell takes none
STEPS = {FLUX_DEV: 28, FLUX_SCHNELL: 4}
# The guidance dev is trained with: 1.0 (kohya's advice for fine-tuning a
# guidance-distilled model; 3.5 is for sampling).
TRAINING_GUIDANCE = 1.0
# FLUX-like folders scenebreak cannot train, by the pipeline model_index.json names ...
REFUSED_PIPELINES = {
    "FluxKontextPipeline": "FLUX.1 Kontext (an image-editing model)",
    "FluxKontextInpaintPipeline": "FLUX.1 Kontext (an image-editing model)",
    "FluxFillPipeline": "FLUX.1 Fill (an inpainting model)",
    "FluxControlPipeline": "a FLUX.1 Depth or Canny model (conditioned on a control image)",
    "FluxControlImg2ImgPipeline": "a FLUX.1 Depth or Canny model (conditioned on a control image)",
    "FluxControlInpaintPipeline": "a FLUX.1 Depth or Canny model (conditioned on a control image)",
    "FluxPriorReduxPipeline": "FLUX.1 Redux (an image-variation adapter, not a base model)",
    "Flux2Pipeline": "FLUX.2",
    "Flux2KleinPipeline": "FLUX.2 [klein]",
    "ChromaPipeline": "Chroma (a FLUX.1 derivative with its own transformer)",
}
# ... and by what their transformer takes besides the packed latents (for a folder whose
# model_index.json says FluxPipeline over such a transformer).
REFUSED_INPUTS = {
    PACKED_CHANNELS * 6: "FLUX.1 Fill (an inpainting model)",  # latents, masked image, 8x8 mask
    PACKED_CHANNELS * 2: "a FLUX.1 Depth or Canny model (conditioned on a control image)",  # latents, control latents
}


def pack_latents(latents):
    """(B, C, h, w) latents as the transformer's tokens (B, h/2 * w/2, 4C): 2x2 patches
    in row-major order (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, size: tuple[int, int]):
    """Tokens (B, h/2 * w/2, 4C) back to (B, C, h, w) latents of `size` (h, w)
    (FluxPipeline._unpack_latents, given the latent size rather than the image's)."""
    b, _, channels = tokens.shape
    h, w = size
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(size: tuple[int, int], device=None, dtype=None):
    """The rotary position of each token of latents of `size` (h, w): (h/2 * w/2, 3) rows
    of (0, row, column) (FluxPipeline._prepare_latent_image_ids)."""
    import torch

    h, w = size[0] // 2, size[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def text_ids(length: int, device=None, dtype=None):
    """The rotary position of each T5 token: all zeros, (length, 3) (FluxPipeline.encode_prompt)."""
    import torch

    return torch.zeros(length, 3, device=device, dtype=dtype)


def normalise_latents(latents, vae_config):
    """What the VAE encodes, as the transformer's latents: shifted, then scaled."""
    return (latents - vae_config["shift_factor"]) * vae_config["scaling_factor"]


def denormalise_latents(latents, vae_config):
    """The transformer's latents as the VAE decodes them (FluxPipeline before vae.decode)."""
    return latents / vae_config["scaling_factor"] + vae_config["shift_factor"]


def guidance_input(transformer_config, scale: float, count: int, device=None):
    """The guidance the transformer embeds, one per example (float32, as FluxPipeline
    makes it), or None for a transformer that embeds none (schnell)."""
    import torch

    if not transformer_config["guidance_embeds"]:
        return None
    return torch.full((count,), float(scale), device=device, dtype=torch.float32)


# Where the attention loss reads FLUX's maps: the last double-stream blocks (13-18 of
# FLUX.1's 19), where published work finds the most localised text-to-image attention
# (Add-it reads blocks 13, 14 and 18; ConceptAttention 15-18); all of them on a smaller model.
ATTENTION_BLOCKS = 6
# LoRA on the transformer: every projection of the double-stream blocks' joint attention
# and MLPs, and the single-stream blocks' attention (diffusers' FLUX DreamBooth LoRA
# defaults). T5 gets none: only the handles' rows of its table are trained.
LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2"]


class FlowSchedule:
    """Rectified-flow training noise as diffusers' FLUX DreamBooth scripts make it: a
    noise level drawn uniformly from the scheduler's 1000-step grid (unshifted),
    noisy = (1 - sigma) x0 + sigma noise, and the velocity noise - x0 as the target."""

    def __init__(self, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.levels = scheduler.timesteps.float()  # sigma * 1000, from high noise to low
        self.train_steps = scheduler.config.num_train_timesteps

    def timesteps(self, count: int, generator):
        import torch

        return self.levels[torch.randint(0, len(self.levels), (count,), generator=generator)]

    def add_noise(self, latents, noise, timesteps):
        sigma = (timesteps.float() / self.train_steps).view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1 - sigma) * latents + sigma * noise

    def target(self, latents, noise, timesteps):
        return noise - latents


@dataclass(frozen=True)
class Flux(Family):
    # A flow-matching model predicts the velocity noise - latents (earlier FLUX scenes
    # recorded "epsilon", which nothing read).
    prediction_type: str = "flow"

    names: ClassVar[tuple[str, ...]] = (FLUX_DEV, FLUX_SCHNELL)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP-L, T5-XXL
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    hub_files: ClassVar[tuple[str, ...]] = (
        "model_index.json", "scheduler/*.json", "tokenizer/*", "tokenizer_2/*", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
        # T5-XXL and the transformer come in shards; the folder's root holds the same weights
        # again as single files for other tools (flux1-dev.safetensors, ae.safetensors), not fetched.
        "text_encoder_2/config.json", "text_encoder_2/model.safetensors", "text_encoder_2/model-*-of-*.safetensors",
        "text_encoder_2/model.safetensors.index.json", "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors", "transformer/diffusion_pytorch_model-*-of-*.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json")
    pooled_text: ClassVar[bool] = True
    pipeline_name: ClassVar[str] = PIPELINE
    denoiser: ClassVar[str] = "transformer"
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te3"}
    samplers: ClassVar[tuple[str, ...]] = ("flow",)  # its own flow-matching Euler
    scene_format: ClassVar[int] = 3  # the .scene format that added FLUX.1
    attention_text: ClassVar[int] = 1  # the T5 tokens: only they enter the joint attention
    attention_kind: ClassVar[str] = "joint"
    classifier_free: ClassVar[bool] = False  # dev embeds its guidance; schnell needs none
    latent_patch: ClassVar[int] = 2  # (pack_latents)
    default_tune: ClassVar[str] = "lora"  # full tuning of 12B weights only when asked for
    # Measured on the tiny FLUX (benchmarks/results/attention_iou-flux.md, docs/method.md):
    # at the paper's 0.01 the loss barely moves the joint attention's maps within 400+400
    # steps; at 0.1 every handle's map overlaps its own mask more than the other's.
    lambda_attn: ClassVar[float] = 0.1
    samples_in_bf16: ClassVar[bool] = True  # fp16 makes its blocks and T5 clip activations; its files are bf16
    lora_denoiser_targets: ClassVar[list[str]] = LORA_TARGETS
    lora_text_targets: ClassVar[dict[str, list[str]]] = {"*": CLIP_LORA_TARGETS, "text_encoder_2": []}

    @classmethod
    def of(cls, name: str, prediction_type: str | None) -> Flux:
        return cls(name)  # its scheduler's config names no prediction type
    quantize_skip: ClassVar[tuple[str, ...]] = ("x_embedder", "context_embedder", "time_text_embed", "norm_out",
                                                "proj_out")
    # T5 has no adapters: under LoRA it is frozen in phase 2, and the class prompt has no
    # handle, so its states for the class example are the same every step. T5-XXL on
    # that row cost ~10 TFLOP a step (forward and the backward that led nowhere).
    class_state_encoders: ClassVar[tuple[int, ...]] = (1,)

    @staticmethod
    def recognise(index: dict, denoiser: dict, text: dict, parts: set[str]) -> str | None:
        """FLUX.1 dev or schnell from a folder's configs (model_index.json and
        `denoiser`, its transformer's), or None: its pipeline, or its transformer's class.
        Refused FLUX variants are recognised too, for `refusal` to name them."""
        flux = (index.get("_class_name") in (PIPELINE, *REFUSED_PIPELINES)
                or (denoiser or {}).get("_class_name") == TRANSFORMER)
        if not flux:
            return None
        # (without the key diffusers builds no guidance input: FluxTransformer2DModel's default)
        return FLUX_DEV if (denoiser or {}).get("guidance_embeds", False) else FLUX_SCHNELL

    @classmethod
    def refusal(cls, index: dict, parts: set[str], what: str, denoiser: dict | None = None) -> str | None:
        """What a FLUX folder is instead (Kontext, Fill, Depth/Canny, Redux, FLUX.2...),
        by its pipeline or, given `denoiser`, what its transformer takes; InvalidInput
        for an incomplete folder."""
        pipeline = index.get("_class_name")
        if isinstance(pipeline, str) and pipeline in REFUSED_PIPELINES:
            return REFUSED_PIPELINES[pipeline]
        if denoiser is None:
            return None
        if not denoiser:  # dev and schnell differ only there
            raise InvalidInput(f"{what} is an incomplete FLUX.1 folder: it has no transformer/config.json "
                               "(download it again)")
        kind = denoiser.get("_class_name", TRANSFORMER)
        if kind != TRANSFORMER:
            return f"a FLUX model whose transformer is a {str(kind)[:60]}"
        channels = denoiser.get("in_channels", PACKED_CHANNELS)
        if channels != PACKED_CHANNELS:
            other = f"a FLUX model whose transformer takes {str(channels)[:20]} input channels"
            return REFUSED_INPUTS.get(channels, other) if isinstance(channels, int) else other
        return None

    @classmethod
    def recognise_folder(cls, folder: Path, what: str) -> Flux | None:
        """The FLUX.1 member a diffusers folder holds, from its configs alone (no weight
        is read), None when it is not FLUX, or InvalidInput naming a variant scenebreak
        cannot train."""
        folder = Path(folder)

        def read(relative: str) -> dict:
            try:
                data = json.loads((folder / relative).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return {}
            return data if isinstance(data, dict) else {}

        index, transformer = read("model_index.json"), read("transformer/config.json")
        parts = {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()
        name = cls.recognise(index, transformer, read("text_encoder/config.json"), parts)
        if name is None:
            return None
        refused = cls.refusal(index, parts, what, transformer)
        if refused:
            raise InvalidInput(f"{what} is {refused}: scenebreak learns FLUX scenes on FLUX.1 dev and FLUX.1 schnell "
                               "and models of their architecture (e.g. black-forest-labs/FLUX.1-dev)")
        return cls(name)

    # -- the member's own numbers --------------------------------------------------------------
    @property
    def guidance(self) -> float:
        """dev's embedded guidance scale (not classifier-free guidance: one pass per step);
        schnell takes none."""
        return GUIDANCE[self.name]

    @property
    def takes_guidance(self) -> bool:
        return self.name == FLUX_DEV

    @property
    def sampling_steps(self) -> int:
        return STEPS[self.name]

    @property
    def text_tokens(self) -> int:
        """The T5 tokens its prompts are padded to (FluxPipeline's max_sequence_length)."""
        return T5_TOKENS[self.name]

    # -- models --------------------------------------------------------------------------------
    def text_encoder_class(self, name: str):
        from transformers import CLIPTextModel, T5EncoderModel

        return T5EncoderModel if name == "text_encoder_2" else CLIPTextModel

    def tokenizer_class(self, name: str):
        from transformers import CLIPTokenizer, T5TokenizerFast

        return (T5TokenizerFast, self.text_tokens) if name == "tokenizer_2" else (CLIPTokenizer, CLIP_TOKENS)

    def denoiser_class(self):
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def native_resolution(self, denoiser, vae) -> int:
        """The VAE's size (1024 for FLUX.1): the transformer's config has none."""
        return int(vae.config.sample_size)

    def resolution_step(self, denoiser, vae) -> int:
        """The latents are packed in 2x2 patches."""
        return 2 * vae_scale(vae)

    def pipeline(self, transformer, vae, text_encoders: list, tokenizers: list, scheduler, options: dict | None = None):
        return self.pipeline_class()(scheduler=scheduler, vae=vae, text_encoder=text_encoders[0],
                                     tokenizer=tokenizers[0], text_encoder_2=text_encoders[1],
                                     tokenizer_2=tokenizers[1], transformer=transformer)

    def sampling_vae_dtype(self, vae, dtype):
        """fp32 where the VAE's config asks for it in fp16 (force_upcast), as SDXL's."""
        import torch

        return torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype

    # -- training ---------------------------------------------------------------------------------
    def training_schedule(self, scheduler_config: dict) -> FlowSchedule:
        return FlowSchedule(scheduler_config)

    def denoise(self, model, noisy, timesteps, hidden, added):
        """The transformer's velocity for (B, 16, h, w) latents: packed into tokens with
        their positions, the noise level as sigma (timestep / 1000), unpacked again."""
        size = tuple(noisy.shape[-2:])
        tokens = pack_latents(noisy)
        out = model(hidden_states=tokens, timestep=timesteps.to(tokens.dtype).expand(len(tokens)) / 1000,
                    guidance=added["guidance"], pooled_projections=added["pooled_projections"],
                    encoder_hidden_states=hidden, txt_ids=added["txt_ids"],
                    img_ids=image_ids(size, tokens.device, tokens.dtype), return_dict=False)[0]
        return unpack_latents(out, size)

    def attention_layers(self, model) -> list[str]:
        """The joint attention of the last double-stream blocks (ATTENTION_BLOCKS)."""
        count = len(model.transformer_blocks)
        if not count:
            raise InvalidInput("this FLUX transformer has no double-stream block, which the attention loss reads: "
                               "use --lambda-attn 0")
        return [f"transformer_blocks.{i}.attn.processor" for i in range(max(0, count - ATTENTION_BLOCKS), count)]

    def attention_size(self, latent_size: int) -> int:
        return latent_size // 2  # one token per 2x2 latents

    # -- sampling ---------------------------------------------------------------------------------
    def sampler_steps(self, sampler: str) -> int:
        return self.sampling_steps

    def sampler(self, name: str, scheduler_config: dict):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def set_timesteps(self, scheduler, steps: int, latent_size: tuple[int, int], device) -> None:
        """As FluxPipeline sets them: sigmas from 1 to 1/steps, shifted for the image's
        token count where the scheduler shifts dynamically (dev)."""
        import numpy as np

        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = scheduler.config
        tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def pipeline_kwargs(self) -> dict:
        return {"max_sequence_length": self.text_tokens}

    def pipeline_latents(self, latents, latent_size: tuple[int, int]):
        """FluxPipeline's latent output is its packed tokens."""
        return unpack_latents(latents, latent_size)

    # -- conditioning ----------------------------------------------------------------------------
    def encode_prompts(self, text_encoders: list, ids: list, conditions=None, class_states=None):
        """T5's last hidden state (what the joint attention reads), and for the
        transformer's other inputs: CLIP's pooled output (taken at the end of text once
        `pool_at_end_of_text` has run), the text's rotary positions, and the guidance
        (`conditions`: one per example on dev, None on schnell). `class_states[1]`: T5's
        states of the class example (the last row), computed once while T5 is frozen."""
        import torch

        clip, t5 = text_encoders
        pooled = clip(ids[0], output_hidden_states=False).pooler_output
        if class_states and 1 in class_states:
            hidden = t5(ids[1][:-1], output_hidden_states=False)[0]
            hidden = torch.cat([hidden, class_states[1].to(hidden.dtype)])
        else:
            hidden = t5(ids[1], output_hidden_states=False)[0]
        guidance = None if conditions is None else conditions.to(hidden.device)
        added = {"pooled_projections": pooled, "txt_ids": text_ids(hidden.shape[1], hidden.device, clip.dtype),
                 "guidance": guidance}
        return hidden, added

    def training_conditions(self, crop_size, resolution):
        """The guidance dev is trained at, for [instance, class image]."""
        import torch

        return torch.full((2,), TRAINING_GUIDANCE) if self.name == FLUX_DEV else None

    def sampling_conditions(self, size):
        import torch

        return torch.full((1,), self.guidance) if self.name == FLUX_DEV else None

    def pipeline_conditioning(self, pipe, prompt, count, guidance, negative, size, embedded_guidance=None):
        """As FluxPipeline conditions `count` images: `guidance` here is its true
        classifier-free guidance over the negative prompt (unconditional first), which
        FLUX.1 does not need; the embedded guidance is `embedded_guidance` (--guidance,
        as FluxPipeline's guidance_scale), else the member's usual."""
        import torch

        device = pipe._execution_device
        hidden, pooled, ids = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=count,
                                                 max_sequence_length=self.text_tokens)
        if guidance:
            uncond, uncond_pooled, _ = pipe.encode_prompt(negative or "", device=device, num_images_per_prompt=count,
                                                          max_sequence_length=self.text_tokens)
            hidden, pooled = torch.cat([uncond, hidden]), torch.cat([uncond_pooled, pooled])
        scale = self.guidance if embedded_guidance is None else embedded_guidance
        embedded = guidance_input(pipe.transformer.config, scale, len(hidden), device)
        return hidden, {"pooled_projections": pooled, "txt_ids": ids, "guidance": embedded}

    # -- files other tools load ----------------------------------------------------------------------
    # kohya, ComfyUI and Forge run Black Forest Labs' own model, and kohya's FLUX LoRA names
    # its layers (double_blocks.N.img_attn.qkv...: q, k and v in one layer); exports/kohya.py
    # maps diffusers' names onto them.
    kohya_bfl_transformer: ClassVar[bool] = True
    # The tools the a1111 export is for: AUTOMATIC1111 has no FLUX.1.
    webui_tools: ClassVar[tuple[str, ...]] = ("Forge", "ComfyUI")

    def textual_inversion(self, token: str, rows: list) -> dict:
        """The layout FLUX embeddings are shared in (ComfyUI's keys): one (vectors, width)
        row per encoder."""
        return {"clip_l": rows[0].reshape(1, -1), "t5xxl": rows[1].reshape(1, -1)}

    def a1111_embedding(self, rows: list) -> dict:
        """ComfyUI's layout, which reads both rows; Forge cannot (`forge_embedding`)."""
        return self.textual_inversion("", rows)

    def forge_embedding(self, rows: list) -> dict:
        """Forge's FLUX reads CLIP-L embeddings only, from a file with one key (one with
        `t5xxl` too fails to load there): the CLIP-L row alone."""
        return {"clip_l": rows[0].reshape(1, -1)}

    @property
    def a1111_version(self) -> str:
        return "Flux"  # Forge's SdVersion.Flux

    @property
    def kohya_version(self) -> str:
        return "flux1"

    @property
    def modelspec_architecture(self) -> str:
        return "flux-1-dev" if self.name == FLUX_DEV else "flux-1-schnell"
