"""Where do the handles look? Cross-attention maps of a learned scene, and their
overlap with the masks: the mechanics check that needs no judgement of images."""

from __future__ import annotations

import numpy as np

from ..device import Device, choose_device
from ..scenes.bundle import open_scene


def handle_attention_maps(scene, device: str | Device | None = None, timesteps=(100, 300, 500, 700), seed: int = 0,
                          base_model: str | None = None) -> np.ndarray:
    """(N, s, s) maps where the attention loss reads them (latent size / 4 on SD and
    SDXL): each handle's cross-attention for the prompt
    "a photo of <h1> and ... <hN>" over the scene's own photo, averaged over heads,
    layers and a few noise levels, each scaled to a maximum of 1. `base_model`: where a
    LoRA scene's base is, as `generate --base-model` takes it."""
    import torch
    from PIL import Image

    from ..train.attention import AttentionStore, capture_cross_attention
    from ..families import vae_normalisation
    from ..sample.scene_models import scene_components
    from ..images import image_to_tensor
    from ..handles import prompt_for
    from ..train.tokens import handle_positions

    scene = open_scene(scene)
    device = device if isinstance(device, Device) else choose_device(device)
    unet, vae, text_encoders, tokenizers = scene_components(scene, device, dtype=torch.float32, base_model=base_model)
    family = scene.family
    schedule = family.training_schedule(scene.meta["configs"]["scheduler"])
    dev = device.torch
    pixels = image_to_tensor(Image.fromarray(scene.image)).to(dev)
    ids = [tok(prompt_for(scene.tokens), padding="max_length", max_length=tok.model_max_length,
               truncation=True, return_tensors="pt").input_ids.to(dev) for tok in tokenizers]
    read = scene.family.attention_text  # the tokens the attention loss reads
    positions = handle_positions(ids[read][0], tokenizers[read].convert_tokens_to_ids(scene.tokens))
    size = (scene.resolution, scene.resolution)
    generator = torch.Generator("cpu").manual_seed(seed)
    store = AttentionStore(example=0)
    row, eos = ids[read][0].tolist(), tokenizers[read].eos_token_id
    store.text_length = row.index(eos) + 1 if eos in row else len(row)
    total = None
    with torch.no_grad(), capture_cross_attention(unet, store, family.attention_layers(unet), family.attention_kind):
        shift, scale = vae_normalisation(vae)
        latents = (vae.encode(pixels).latent_dist.mean - shift) * scale
        hidden, added = family.encode_prompts(text_encoders, ids, family.sampling_conditions(size))
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(dev)
            step = torch.tensor([t], device=dev)
            family.denoise(unet, schedule.add_noise(latents, noise, step), step, hidden, added)
            maps = store.token_maps(positions)
            total = maps if total is None else total + maps
            store.clear()
    total = total / total.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return total.cpu().numpy()


def soft_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Fuzzy IoU of two [0, 1] maps: sum(min) / sum(max)."""
    return float(np.minimum(a, b).sum() / max(np.maximum(a, b).sum(), 1e-12))


def attention_overlap(scene, device=None, base_model: str | None = None) -> dict:
    """Per handle: soft IoU of its attention map with its own mask and with the
    best-matching other mask, and the mean squared difference from its own mask
    ("distance": what the attention loss minimises, over noise levels here).
    `base_model`: where a LoRA scene's base is (its error names this argument)."""
    import torch

    from ..train.losses import downsample_masks

    scene = open_scene(scene)
    maps = handle_attention_maps(scene, device, base_model=base_model)
    masks = downsample_masks(torch.from_numpy(scene.masks), maps.shape[-1]).numpy()
    rows = []
    for i, handle in enumerate(scene.handles):
        own = soft_iou(maps[i], masks[handle.mask_index])
        others = [soft_iou(maps[i], masks[j]) for j in range(len(masks)) if j != handle.mask_index]
        distance = float(((maps[i] - masks[handle.mask_index]) ** 2).mean())
        rows.append({"handle": handle.token, "own": own, "other": max(others) if others else 0.0, "distance": distance})
    return {"handles": rows, "maps": maps}
