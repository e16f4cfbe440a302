"""Text-to-image with a learned scene: `generate(scene, prompts)`."""

from __future__ import annotations

import os
import re
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .bundle import Scene, load_scene
from .config import SD21_UNET_PARAMS, GenerateConfig
from .device import Device, choose_device
from .errors import InvalidInput, ModelNotAvailable, UnknownHandle
from .events import Message, Progress, Reporter, silent
from .paths import write_atomically
from .tokens import handles_in, prompt_for


@dataclass
class GeneratedImage:
    path: Path
    prompt: str
    seed: int
    kind: str = "image"  # image | edit | plate | variation


@dataclass
class GenerateResult:
    scene: str
    images: list[GeneratedImage] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "scene": self.scene,
            "images": [{"path": str(i.path), "prompt": i.prompt, "seed": i.seed, "kind": i.kind} for i in self.images],
            "seconds": round(self.seconds, 2),
        }


def check_prompts(scene: Scene, prompts: list[str]) -> None:
    """Every <handle> in every prompt must be one of the scene's."""
    known = scene.tokens
    for prompt in prompts:
        for token in handles_in(prompt):
            if token not in known:
                raise UnknownHandle(f"unknown handle {token} in prompt {prompt!r}: scene {scene.name!r} has {', '.join(known)}")


def scene_components(scene: Scene, device: Device, dtype=None, base_model: str | None = None):
    """UNet, VAE, text encoder and tokenizer of a scene: rebuilt from its own weights, or
    for a LoRA scene, its base model (`base_model` overrides where to find it) with the
    adapters merged in."""
    import torch

    if not scene.weights:
        # A LoRA scene's adapters are merged on the CPU, where its base model loads.
        scene = load_scene(scene.path, weights=True, device="cpu" if scene.needs_base_model else str(device.torch))
    dtype = dtype or device.infer_dtype()
    tokenizer = _scene_tokenizer(scene)
    if scene.needs_base_model:
        unet, vae, text_encoder = _base_with_lora(scene, base_model, len(tokenizer))
    else:
        unet, vae, text_encoder = _own_weights(scene, dtype)
    for model in (unet, vae, text_encoder):
        model.to(device.torch, dtype).eval().requires_grad_(False)
    # Guard against a tokenizer that lost its handles: ids must match the embedding rows.
    ids = tokenizer.convert_tokens_to_ids(scene.tokens)
    emb = text_encoder.get_input_embeddings().weight
    if any(i is None or i >= emb.shape[0] for i in ids):
        raise InvalidInput(f"scene {scene.name!r}: tokenizer and text encoder disagree on the handles")
    with torch.no_grad():
        emb[ids] = scene.embeddings.to(emb.device, emb.dtype)
    return unet, vae, text_encoder, tokenizer


def _scene_tokenizer(scene: Scene):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        for name, data in scene.files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer")


def _own_weights(scene: Scene, dtype):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = scene.meta["configs"]
    with init_empty_weights():  # no random init of weights we overwrite anyway
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    for model, name in ((unet, "unet"), (vae, "vae"), (text_encoder, "text_encoder")):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in scene.weights[name].items()}
        model.load_state_dict(state, assign=True, strict=True)
    return unet, vae, text_encoder


def _base_with_lora(scene: Scene, base_model: str | None, vocabulary: int):
    from .errors import BundleError
    from .lora import add_lora, load_lora_state_dict, merge_lora
    from .models import load_components

    base = scene.meta["base_model"]
    try:
        c = load_components(base_model or base["id"], None if base_model else (base.get("commit") or base.get("revision")))
    except (InvalidInput, ModelNotAvailable) as exc:
        fix = "" if "--base-model" in str(exc) else " (if it moved, pass --base-model with where it is now)"
        raise type(exc)(f"LoRA scene {scene.name!r} needs its base model: {exc}{fix}") from None
    if c.base.fingerprint != base["fingerprint"]:
        raise BundleError(f"scene {scene.name!r} was learned on another base model than {base_model or base['id']} "
                          f"(its LoRA adapters need that exact model): pass --base-model with the right one")
    c.text_encoder.resize_token_embeddings(vocabulary, mean_resizing=False)  # the handle rows are set by the caller
    add_lora(c.unet, c.text_encoder, scene.meta["lora"])
    load_lora_state_dict(c.unet, scene.weights["unet_lora"])
    load_lora_state_dict(c.text_encoder, scene.weights["text_encoder_lora"])
    merge_lora(c.unet)  # plain layers again: no adapter cost per step
    merge_lora(c.text_encoder)
    return c.unet, c.vae, c.text_encoder


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return s[:limit].rstrip("-") or "image"


def _unique(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def save_png(image, path: Path, overwrite: bool = False) -> Path:
    """Write a PIL image or (H, W, 3) uint8 array atomically; an existing file is kept
    (the new one gets a numbered name) unless `overwrite`."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    path = Path(path) if overwrite else _unique(Path(path))
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def variation_prompt(scene: Scene) -> str:
    """The paper's image variations: every object handle in one prompt."""
    return prompt_for(scene.object_tokens)


def open_pipeline(scene: Scene, device: Device, base_model: str | None = None):
    """A DDIM text-to-image pipeline over the scene's weights (for a LoRA scene, its
    base model's with the adapters merged; `base_model` says where that model is)."""
    from .models import quiet_libraries
    from .pipeline import make_pipeline

    quiet_libraries()
    unet, vae, text_encoder, tokenizer = scene_components(scene, device, base_model=base_model)
    if device.type == "cuda":
        import torch

        unet.to(memory_format=torch.channels_last)  # faster convolutions with cuDNN
    return make_pipeline(unet, vae, text_encoder, tokenizer, scene.meta["configs"]["scheduler"])


def pick_seed(config: GenerateConfig, report: Reporter) -> int:
    """The seed of image 1: the one asked for, or a random one, reported either way."""
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    report(Message(f"seed: {seed}"))
    return seed


def images_per_pass(config: GenerateConfig, pipe) -> int:
    return config.batch_size or (4 if pipe.device.type == "cuda" else 1)


def warn_cpu_time(pipe, image_steps: int, pixels: int, report: Reporter) -> None:
    """On the CPU, say first how long the sampling will roughly take (measured figure for
    SD2.1-base at 512x512, scaled by UNet size and pixel count)."""
    if pipe.device.type != "cpu":
        return
    from .learning import CPU_SECONDS_SAMPLING_STEP, format_duration

    params = sum(p.numel() for p in pipe.unet.parameters())
    seconds = image_steps * CPU_SECONDS_SAMPLING_STEP * params / SD21_UNET_PARAMS * pixels / 512**2
    if seconds > 60:
        report(Message(f"on the CPU this takes roughly {format_duration(seconds)}; a CUDA GPU takes seconds (--device cuda)", "warning"))


def warn_unused_handles(scene: Scene, prompts: list[str], report: Reporter) -> None:
    for prompt in prompts:
        if not handles_in(prompt):
            report(Message(f"prompt {prompt!r} uses none of the scene's handles ({', '.join(scene.tokens)})", "warning"))


def sample_to_files(pipe, scene: Scene, prompts: list[str], config: GenerateConfig, seed: int, out_dir: Path,
                    name: str, report: Reporter) -> list[GeneratedImage]:
    """`config.num_images` images per prompt, seeds seed, seed+1, ..., as PNGs in `out_dir`."""
    from .pipeline import sample

    batch = images_per_pass(config, pipe)
    total = len(prompts) * config.num_images * config.steps
    images_out, done = [], 0
    report(Progress("generate", 0, total))
    for prompt in prompts:
        seeds = [seed + i for i in range(config.num_images)]
        for start in range(0, len(seeds), batch):
            chunk = seeds[start:start + batch]
            images = sample(pipe, prompt, chunk, steps=config.steps, guidance=config.guidance, resolution=scene.resolution,
                            negative=config.negative, report=report, done=done, total=total)
            done += len(chunk) * config.steps
            for s, image in zip(chunk, images):
                path = save_png(image, out_dir / f"{name}-{slug(prompt)}-{s}.png")
                images_out.append(GeneratedImage(path, prompt, s))
    return images_out


def generate(scene, prompts: list[str] | str | None, config: GenerateConfig = GenerateConfig(), *,
             out_dir: str | os.PathLike = ".", device: str | Device | None = None, variations: bool = False,
             base_model: str | None = None, report: Reporter = silent) -> GenerateResult:
    """Generate `config.num_images` images per prompt and write them as PNGs to `out_dir`.

    Image i of a prompt is seeded with `seed + i`, so any single image can be remade.
    `variations=True` (no prompts) uses "a photo of <asset1> and <asset2> ...": the
    scene's objects re-arranged in new surroundings."""
    started = time.perf_counter()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
    prompts = [p.strip() for p in prompts if p and p.strip()]
    config = config.validate()
    if variations and prompts:
        raise InvalidInput("--variations makes its own prompt (all the scene's objects): give no PROMPT with it")
    if not prompts and not variations:
        raise InvalidInput("no prompt given")
    scene = scene if isinstance(scene, Scene) else load_scene(scene)
    if variations:
        prompts = [variation_prompt(scene)]
    check_prompts(scene, prompts)
    warn_unused_handles(scene, prompts, report)
    device = device if isinstance(device, Device) else choose_device(device)
    seed = pick_seed(config, report)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    pipe = open_pipeline(scene, device, base_model)
    warn_cpu_time(pipe, len(prompts) * config.num_images * config.steps, scene.resolution**2, report)
    result = GenerateResult(scene=scene.name)
    result.images = sample_to_files(pipe, scene, prompts, config, seed, out_dir, scene.name, report)
    result.seconds = time.perf_counter() - started
    return result
