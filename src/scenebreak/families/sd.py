"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, whose last hidden state is the
UNet's conditioning; epsilon or v-prediction, 512 or 768 pixels."""

from __future__ import annotations

from typing import ClassVar

from .unet import UNetFamily

SD1, SD2 = "SD 1.x", "SD 2.x"


class SD(UNetFamily):
    names: ClassVar[tuple[str, ...]] = (SD1, SD2)
    pipeline_name: ClassVar[str] = "StableDiffusionPipeline"

    @staticmethod
    def recognise(index: dict, unet: dict, text: dict, parts: set[str]) -> str | None:
        """SD 1.x or SD 2.x from a folder's configs, or None. SD 1.x: CLIP-L's
        768-wide text, attention projected by 1x1 convolutions; SD 2.x: OpenCLIP-H's
        1024, linear projections."""
        if not UNetFamily.is_unet(unet) or unet.get("addition_embed_type") is not None:
            return None
        sd1 = text.get("hidden_size") == 768 or not unet.get("use_linear_projection", False)
        return SD1 if sd1 else SD2

    def pipeline(self, unet, vae, text_encoders: list, tokenizers: list, scheduler, options: dict | None = None):
        return self.pipeline_class()(vae=vae, unet=unet, scheduler=scheduler, text_encoder=text_encoders[0],
                                     tokenizer=tokenizers[0], safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)

    def encode_prompts(self, text_encoders: list, ids: list, conditions=None, class_states=None):
        """The last hidden state of the one encoder."""
        return text_encoders[0](ids[0])[0], None

    def pipeline_conditioning(self, pipe, prompt, count, guidance, negative, size, embedded_guidance=None):
        import torch

        cond, uncond = pipe.encode_prompt(prompt, pipe._execution_device, count, guidance, negative_prompt=negative)
        return (torch.cat([uncond, cond]) if guidance else cond), None

    def textual_inversion(self, token: str, rows: list) -> dict:
        return {token: rows[0]}

    def a1111_embedding(self, rows: list) -> dict:
        return {"emb_params": rows[0].reshape(1, -1)}  # one key: A1111 reads a one-key file as one embedding

    @property
    def a1111_version(self) -> str:
        return "SD2" if self.name == SD2 else "SD1"

    @property
    def kohya_version(self) -> str:
        v = "_v" if self.prediction_type == "v_prediction" else ""
        return f"sd_v2{v}" if self.name == SD2 else f"sd_v1{v}"

    @property
    def modelspec_architecture(self) -> str:
        if self.name != SD2:
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.prediction_type == "v_prediction" else "stable-diffusion-v2-512"
