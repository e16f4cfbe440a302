"""SDXL base: two CLIP text encoders (CLIP-L and OpenCLIP-G) whose penultimate hidden
states condition the UNet side by side, plus the second one's pooled projection and
six size-and-crop numbers, exactly as its pipeline builds them."""

from __future__ import annotations

from typing import ClassVar

from ..errors import InvalidInput
from .family import BASE_HUB_FILES, hub_weight_patterns
from .unet import UNetFamily

SDXL_NAME = "SDXL"


def time_ids(original_size: tuple[int, int], target_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0)):
    """SDXL's six size-and-crop conditioning numbers, in the order its pipeline builds
    them (`_get_add_time_ids`): original (h, w), crop top-left (y, x), target (h, w)."""
    import torch

    return torch.tensor([[*original_size, *crop_top_left, *target_size]], dtype=torch.float32)


class SDXL(UNetFamily):
    names: ClassVar[tuple[str, ...]] = (SDXL_NAME,)
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizers: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    guidance: ClassVar[float] = 5.0  # its pipeline's default
    scene_format: ClassVar[int] = 2  # format 2 added the second encoder's entries
    hub_files: ClassVar[tuple[str, ...]] = BASE_HUB_FILES + ("tokenizer_2/*", "text_encoder_2/config.json",
                                                             *hub_weight_patterns("text_encoder_2/model.safetensors"))
    pooled_text: ClassVar[bool] = True
    pipeline_name: ClassVar[str] = "StableDiffusionXLPipeline"
    kohya_text_prefixes: ClassVar[dict[str, str]] = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    kohya_sgm_unet: ClassVar[bool] = True

    @staticmethod
    def recognise(index: dict, unet: dict, text: dict, parts: set[str]) -> str | None:
        """SDXL base from a folder's configs and `parts` (its subfolders), or None: its
        pipeline class, its UNet's text_time conditioning, or a second text encoder
        (refiners, which have only the big encoder, are told apart by the caller)."""
        xl = (index.get("_class_name") == SDXL.pipeline_name or unet.get("addition_embed_type") == "text_time"
              or "text_encoder_2" in parts)
        return SDXL_NAME if xl and (not unet or UNetFamily.is_unet(unet)) else None

    @classmethod
    def refusal(cls, index: dict, parts: set[str], what: str, denoiser: dict | None = None) -> str | None:
        """A refiner has text_time conditioning over one (the big) text encoder."""
        if "text_encoder_2" in parts:
            return super().refusal(index, parts, what, denoiser)
        if index.get("_class_name") != cls.pipeline_name:
            return "an SDXL refiner"
        raise InvalidInput(f"{what} is an incomplete SDXL folder: it has no text_encoder_2/ (download it again)")

    def text_encoder_class(self, name: str):
        """The second encoder (OpenCLIP-G) also gives the pooled projection its UNet takes."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel

    def pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler, options: dict | None = None):
        return self.pipeline_class()(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoders[0],
                                     tokenizer=tokenizers[0], text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1],
                                     add_watermarker=False, **self.pipeline_options(options or {}))

    def pipeline_options(self, index: dict) -> dict:
        """Whether the unconditional half of guidance without a negative prompt is zeros
        (SDXL base, the default) or the encoded empty prompt, as a fine-tune's folder may
        say: its pipeline samples that way, and so must ours and our exports."""
        value = index.get("force_zeros_for_empty_prompt")
        return {"force_zeros_for_empty_prompt": value} if isinstance(value, bool) else {}

    def sampling_vae_dtype(self, vae, dtype):
        """SDXL's VAE overflows in fp16 (its config says so with force_upcast)."""
        import torch

        return torch.float32 if dtype == torch.float16 and vae.config.get("force_upcast", False) else dtype

    def encode_prompts(self, text_encoders: list, ids: list, conditions=None, class_states=None):
        """The penultimate hidden states of both encoders side by side, the second
        encoder's pooled projection, and the size/crop ids (`conditions`, (B, 6))."""
        import torch

        hidden, pooled = [], None
        for encoder, encoder_ids in zip(text_encoders, ids):
            out = encoder(encoder_ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: its first output is the pooled projection
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        added = {"text_embeds": pooled, "time_ids": conditions.to(pooled.device, pooled.dtype)}
        return torch.cat(hidden, dim=-1), added

    def training_conditions(self, crop_size, resolution):
        size = (resolution, resolution)
        import torch

        return torch.cat([time_ids(crop_size or size, size), time_ids(size, size)])

    def sampling_conditions(self, size):
        return time_ids(size, size)

    def pipeline_conditioning(self, pipe, prompt, count, guidance, negative, size, embedded_guidance=None):
        """Original = target = `size`, no crop, as the pipeline makes the size ids."""
        import torch

        device = pipe._execution_device
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=count,
                                                                 do_classifier_free_guidance=guidance,
                                                                 negative_prompt=negative)
        ids = time_ids(size, size).to(device, cond.dtype).repeat(count * (2 if guidance else 1), 1)
        if guidance:
            cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
        return cond, {"text_embeds": pooled, "time_ids": ids}

    def textual_inversion(self, token: str, rows: list) -> dict:
        """The layout SDXL embeddings are shared in: one (vectors, width) row per encoder."""
        return {"clip_l": rows[0].reshape(1, -1), "clip_g": rows[1].reshape(1, -1)}

    def a1111_embedding(self, rows: list) -> dict:
        return self.textual_inversion("", rows)

    @property
    def a1111_version(self) -> str:
        return "SDXL"

    @property
    def kohya_version(self) -> str:
        return "sdxl_base_v1-0"

    @property
    def modelspec_architecture(self) -> str:
        return "stable-diffusion-xl-v1-base"
