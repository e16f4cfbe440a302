"""A scene made from a finished training run: its JSON header (what was learned, from
what, how) and its tensors (the handles put back into ordinary embedding matrices,
the weights or LoRA adapters, the tokenizer files), ready for scenes.bundle to write."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..families.lora import lora_settings, lora_state_dict, merge_lora
from ..scenes.bundle import Scene, tokenizer_files
from .tokens import remove_handle_embedding


def model_config(model) -> dict:
    """A model's config as the scene records it (enough to rebuild the model empty)."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype", "transformers_version", "_name_or_path")}


def scene_metadata(*, name: str, tokens: list[str], components, prepared, config, plan, precision: str, losses: dict,
                   device, image: Path, masks: list[Path], resolution: int, seconds: float) -> dict:
    """The JSON header of a newly learned scene."""
    import datetime as dt


    c = components
    return {
        "name": name,
        "scenebreak_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "tuning": config.tune,
        "standalone": config.tune == "full" or config.standalone,
        "base_model": c.base.to_dict(),
        # The background handle's mask (index len(masks)) is the complement of the others.
        "handles": [{"token": t, "name": t.strip("<>"), "mask_index": i, "background": config.background and i == len(masks)}
                    for i, t in enumerate(tokens)],
        "resolution": resolution,
        "prediction_type": c.prediction_type,
        # Pooled text taken at the end of text (families.pool_at_end_of_text); SDXL
        # scenes without it were learned with the pooled vector at the last handle.
        "pooled_at": "eos",
        "crop_box": list(prepared.crop_box),
        "source": {"file": image.name, "size": list(prepared.source_size), "sha256": prepared.source_sha256,
                   "masks": [m.name for m in masks]},
        "config": config.to_dict(),
        "memory": plan.to_dict(),
        "precision": precision,
        "losses": losses,
        **({"lora": lora_settings(config.rank, c.family)} if config.tune == "lora" else {}),
        "device": device.name,
        "seconds": round(seconds, 2),
        "configs": {c.family.denoiser: model_config(c.denoiser), "vae": model_config(c.vae),
                    **{name: model_config(te) for name, te in zip(c.family.text_encoders, c.text_encoders)},
                    "scheduler": dict(c.scheduler_config),
                    **({"pipeline": dict(c.pipeline_options)} if c.pipeline_options else {})},
    }


def scene_from_training(components, meta: dict, prepared) -> Scene:
    """The trained models as a self-contained scene (the handles put back into an
    ordinary embedding matrix, so other tools can load the text encoder)."""
    c = components
    handles = [remove_handle_embedding(te) for te in c.text_encoders]
    encoders = dict(zip(c.family.text_encoders, c.text_encoders))
    if meta["tuning"] == "lora" and not meta["standalone"]:
        # Only the adapters: the scene loads them onto its recorded base model.
        weights = {f"{c.family.denoiser}_lora": lora_state_dict(c.denoiser),
                   **{f"{n}_lora": state for n, te in encoders.items() if (state := lora_state_dict(te))}}
    else:
        if meta["tuning"] == "lora":
            for model in (c.denoiser, *c.text_encoders):
                merge_lora(model)
        weights = {c.family.denoiser: c.denoiser.state_dict(), **{n: te.state_dict() for n, te in encoders.items()},
                   "vae": c.vae.state_dict()}
    files = {}
    for tokenizer, folder in zip(c.tokenizers, c.family.tokenizers):
        files.update(tokenizer_files(tokenizer, folder))
    return Scene(meta=meta, embeddings=handles[0], image=np.asarray(prepared.image), masks=prepared.masks, weights=weights,
                 files=files, embeddings_2=handles[1] if len(handles) > 1 else None, icc_profile=prepared.icc_profile)
