"""Tiny random-initialised Stable Diffusion models, for tests and benchmarks.

This module lives with the tests (tests/tinymodels.py), not in the installed
package: pytest finds it through tests/conftest.py, and the benchmarks put tests/
on sys.path before importing it.

Nothing here downloads anything: every component is built from a config with a
fixed seed and saved as an ordinary diffusers folder, so the real loading code
(`scenebreak.families.base_model.load_components`) can be exercised on it.
"""

from __future__ import annotations

import json
from pathlib import Path

# The special-token ids in the text-encoder configs of the real SD 1.x/2.x, SDXL and
# FLUX folders: legacy values that are not the tokenizer's (its end of text is 49407).
# transformers pools at the largest token id when it sees eos_token_id 2, which is a
# handle once handles are added; the tiny models carry the same quirk.
LEGACY_CLIP_IDS = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1)

# The words the tiny tokenizer knows as whole tokens; everything else falls
# back to byte-level pieces, exactly like the real CLIP tokenizer would.
TINY_WORDS = [
    "a", "photo", "of", "and", "at", "the", "beach", "on", "moon", "in", "snow",
    "cat", "dog", "bowl", "creature", "toy", "bear", "bird", "red", "blue", "object",
]


def _bytes_to_unicode() -> dict[int, str]:
    # Same table as CLIP/GPT-2: printable stand-ins for every byte value.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tiny_tokenizer(folder: Path, vocab_size: int | None = None) -> None:
    """Write a small CLIP BPE vocabulary (vocab.json + merges.txt) to `folder`;
    `vocab_size` pads it with never-produced filler tokens (e.g. 49408, CLIP's size)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in TINY_WORDS:
        # Build each word left to right: "p h" -> "ph", "ph o" -> "pho", ...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in merges:
                merges.append(merge)
            if current not in vocab_list:
                vocab_list.append(current)
    if vocab_size:
        vocab_list += [f"<filler{i}>" for i in range(vocab_size - 2 - len(vocab_list))]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    # (from the files: the constructor's arguments differ between transformers 4 and 5)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)


def tiny_configs(resolution: int = 64) -> dict:
    """Configs of a tiny SD-like model: VAE factor 2, UNet with cross-attention at
    latent/2 and latent/4 (so the attention loss has its 'latent size / 4' layers)."""
    unet = dict(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        norm_num_groups=8,
        use_linear_projection=True,
    )
    vae = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    )
    text = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="gelu",
    )
    scheduler = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def sd21_base_configs() -> dict:
    """Configs with the Stable Diffusion 2.1-base architecture (for benchmarks)."""
    unet = dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = dict(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=2,
        sample_size=768,
    )
    text = dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=23,
        num_attention_heads=16,
        max_position_embeddings=77,
        projection_dim=512,
        hidden_act="gelu",
        vocab_size=49408,
    )
    scheduler = dict(tiny_configs()["scheduler"])
    return {"unet": unet, "vae": vae, "text_encoder": text, "scheduler": scheduler}


def build_components(configs: dict, tokenizer, seed: int = 0) -> dict:
    """Random-initialised UNet, VAE, text encoder and a DDIM scheduler from configs."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_cfg = dict(configs["text_encoder"])
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_cfg.update(LEGACY_CLIP_IDS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["vae"])
    _calibrate_vae(vae)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    scheduler = DDIMScheduler(**configs["scheduler"])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def _calibrate_vae(vae) -> None:
    """Make a random VAE behave like a trained one where training depends on it: a
    near-deterministic posterior (tiny std) and a scaling factor that gives the
    latents unit variance, as SD's 0.18215 does for its own VAE. Without this the
    image signal drowns in the random posterior's noise."""
    import torch

    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -12.0  # log-variance: std = exp(-6)
        g = torch.Generator().manual_seed(0)
        probe = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))


def sharpen_cross_attention(unet, factor: float) -> None:
    """Scale the cross-attention query/key projections so attention logits spread
    as widely as in a trained model; at random init every pixel attends almost
    uniformly to every token, and no handle embedding could change where it looks."""
    import torch

    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_q.weight.mul_(factor)
                module.to_k.weight.mul_(factor)


# How the real families' configs differ, in tiny: SD 1.x projects attention with 1x1
# convolutions and gives every block the same number of heads, over a text encoder
# of its own width; SD 2.x-768 predicts v and upcasts attention to fp32.
VARIANTS = {
    "sd2": {},
    "sd1": {"unet": dict(use_linear_projection=False, attention_head_dim=4, cross_attention_dim=48),
            "text_encoder": dict(hidden_size=48, num_attention_heads=4, projection_dim=48)},
    "sd2-768": {"unet": dict(upcast_attention=True), "scheduler": dict(prediction_type="v_prediction")},
}


def build_small_model(folder: Path, resolution: int = 64, seed: int = 0, sharpen: float = 4.0) -> Path:
    """The tiny SD 2.x at half its width (UNet channels 8/16/16, a one-layer text
    encoder of width 16), same maps and VAE, for the fast mechanics test
    (tests/train/test_mechanics.py). Its cross-attention is sharpened 4x, not 8x: maps stay
    as concentrated as a trained model's, but at 8x the softmax saturates and a short
    run often leaves a handle stuck on one cell outside both masks."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    configs = tiny_configs(resolution)
    configs["unet"] = dict(configs["unet"], block_out_channels=(8, 16, 16), attention_head_dim=(2, 2, 2), norm_num_groups=4,
                           cross_attention_dim=16)
    configs["text_encoder"] = dict(configs["text_encoder"], hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, projection_dim=16)
    parts = build_components(configs, tokenizer, seed=seed)
    sharpen_cross_attention(parts["unet"], sharpen)
    return save_sd_folder(parts, folder)


def build_tiny_model(folder: Path, resolution: int = 64, seed: int = 0, sharpen: float = 8.0, variant: str = "sd2",
                     unet: dict | None = None) -> Path:
    """Save a tiny random Stable Diffusion as a diffusers folder and return its path;
    `variant` picks the shape of SD 2.x-base (default), SD 1.x or SD 2.x-768; `unet`
    changes the UNet's config."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    configs = tiny_configs(resolution)
    for part, changes in VARIANTS[variant].items():
        configs[part] = {**configs[part], **changes}
    configs["unet"].update(unet or {})
    parts = build_components(configs, tokenizer, seed=seed)
    sharpen_cross_attention(parts["unet"], sharpen)
    return save_sd_folder(parts, folder)


def build_sd21_base(folder: Path, seed: int = 0) -> Path:
    """The SD2.1-base architecture with random weights as a diffusers folder (fp32, as
    the hub's), with a tokenizer of CLIP's 49408 tokens: for benchmarks that run
    `learn` as a user does (about 5 GB; too big for tests)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder / "tokenizer", vocab_size=49408)
    parts = build_components(sd21_base_configs(), CLIPTokenizer.from_pretrained(folder / "tokenizer"), seed=seed)
    return save_sd_folder(parts, folder)


def save_part(part, folder: Path) -> None:
    """A model part saved as the hub's folders hold it: a CLIP text encoder's weights
    under the names transformers 4 wrote (`text_model.` first), which every real SD,
    SDXL and FLUX folder has (transformers 5 saves them without)."""
    from scenebreak.families.base_model import name_as_on_the_hub

    part.save_pretrained(folder)
    if (folder / "config.json").exists():  # (a scheduler has none; a UNet's names no architecture)
        name_as_on_the_hub(folder)


def save_sd_folder(parts: dict, folder: Path) -> Path:
    """Stable Diffusion parts (build_components') saved as a folder StableDiffusionPipeline
    loads; the tokenizer is already in `folder / "tokenizer"`."""
    for name in ("unet", "vae", "text_encoder", "scheduler"):
        save_part(parts[name], folder / name)
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.0.0",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def tiny_sdxl_configs(resolution: int = 256) -> dict:
    """Configs of a tiny SDXL: two CLIP text encoders of different widths (the second
    with a projection, like OpenCLIP-G), `text_time` added conditioning, a three-level
    UNet with cross-attention at latent/2 and latent/4 and more transformer layers at
    latent/4 (SDXL: 1, 2 and 10), and a VAE that shrinks 8x as SDXL's does."""
    base = tiny_configs(resolution)
    text = base["text_encoder"]
    text_2 = dict(text, hidden_size=48, intermediate_size=96, projection_dim=16)
    time_dim = 8
    unet = dict(
        base["unet"],
        sample_size=resolution // 8,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_2["projection_dim"] + 6 * time_dim,
    )
    vae = dict(base["vae"], down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               block_out_channels=(8, 16, 16, 16), force_upcast=True)
    scheduler = dict(base["scheduler"], timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2, "scheduler": scheduler}


def sdxl_configs() -> dict:
    """Configs with the SDXL base 1.0 architecture (for benchmarks)."""
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu", vocab_size=49408)
    text_2 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, projection_dim=1280, hidden_act="gelu", vocab_size=49408)
    unet = dict(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    # SD 2.1's VAE shape, with SDXL's scaling factor (it overflows in fp16: force_upcast).
    vae = dict(sd21_base_configs()["vae"], sample_size=1024, scaling_factor=0.13025, force_upcast=True)
    scheduler = dict(tiny_configs()["scheduler"], timestep_spacing="leading")
    return {"unet": unet, "vae": vae, "text_encoder": text, "text_encoder_2": text_2, "scheduler": scheduler}


def build_sdxl_components(configs: dict, tokenizers: list, seed: int = 0, calibrate: bool = True) -> dict:
    """Random-initialised SDXL parts from configs: UNet, VAE, both text encoders."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = {}
    for name, cls, tokenizer in (("text_encoder", CLIPTextModel, tokenizers[0]),
                                 ("text_encoder_2", CLIPTextModelWithProjection, tokenizers[1])):
        cfg = dict(configs[name])
        cfg.setdefault("vocab_size", len(tokenizer))
        cfg.update(LEGACY_CLIP_IDS)
        torch.manual_seed(seed)
        parts[name] = cls(CLIPTextConfig(**cfg))
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel(**configs["unet"])
    torch.manual_seed(seed)
    parts["vae"] = AutoencoderKL(**configs["vae"])
    if calibrate:
        _calibrate_vae(parts["vae"])
    parts["scheduler"] = EulerDiscreteScheduler(**{k: v for k, v in configs["scheduler"].items()
                                                   if k not in ("clip_sample", "set_alpha_to_one")})
    return parts


def build_tiny_sdxl(folder: Path, resolution: int = 256, seed: int = 0, sharpen: float = 8.0,
                    unet: dict | None = None) -> Path:
    """Save a tiny random SDXL as a diffusers folder (model_index.json names
    StableDiffusionXLPipeline, as the real one does) and return its path; `unet` changes
    the UNet's config."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder / "tokenizer")
    write_tiny_tokenizer(folder / "tokenizer_2")
    tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                  CLIPTokenizer.from_pretrained(folder / "tokenizer_2", pad_token="!")]  # as SDXL's second one
    tokenizers[1].save_pretrained(folder / "tokenizer_2")
    configs = tiny_sdxl_configs(resolution)
    configs["unet"].update(unet or {})
    parts = build_sdxl_components(configs, tokenizers, seed=seed)
    sharpen_cross_attention(parts["unet"], sharpen)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        save_part(parts[name], folder / name)
    model_index = {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": "0.0.0",
        "force_zeros_for_empty_prompt": True,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


# Words the tiny Grounding DINO tokenizer knows; anything else becomes [UNK].
TINY_DETECTOR_WORDS = [
    "a", "the", "cat", "dog", "bowl", "creature", "ceramic", "toy", "bear", "bird", "red", "blue",
    "square", "object", "thing", "photo", "of", "and", ".", ",",
]


def image_processor_class(model: str):
    """transformers' PIL image processor of `model` (5 names it `...ImageProcessorPil`,
    4 `...ImageProcessor`): the helper models build under both."""
    import transformers

    return getattr(transformers, f"{model}ImageProcessorPil", None) or getattr(transformers, f"{model}ImageProcessor")


def build_tiny_segmentation_models(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Save a tiny random Grounding DINO and a tiny random SAM (with their
    processors) as ordinary transformers folders; returns (detector, segmenter).

    The sizes follow the constraints measured in the segmentation notes: SAM's
    channel sizes agree and its processor works at 128 px; Grounding DINO's
    d_model is a multiple of 32 and num_queries is below the encoder's token count.
    SAM's mask decoder is biased so that every prompt gives a non-empty mask: a
    random decoder may otherwise return nothing, and tests must be deterministic."""
    import os

    import torch
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig, SwinConfig)

    folder = Path(folder)
    detector, segmenter = folder / "tiny-grounding-dino", folder / "tiny-sam"

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_DETECTOR_WORDS]
    detector.mkdir(parents=True, exist_ok=True)
    (detector / "vocab.txt").write_text("\n".join(vocab) + "\n")  # save_pretrained does not write it
    tokenizer = BertTokenizer.from_pretrained(detector)  # (from the file, as in any transformers)
    backbone = SwinConfig(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4, image_size=64,
                          out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4])
    text = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, num_queries=20,
                                 encoder_layers=1, decoder_layers=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                                 encoder_attention_heads=2, decoder_attention_heads=2, num_feature_levels=4,
                                 encoder_n_points=2, decoder_n_points=2, max_text_len=64)
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(detector)
    image_processor = image_processor_class("GroundingDino")(size={"shortest_edge": 96, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(detector)

    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=128, patch_size=16, window_size=4, global_attn_indexes=[1], num_pos_feats=16,
                             mlp_dim=64)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=128, patch_size=16, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=1, num_attention_heads=2,
                                   iou_head_hidden_dim=32)
    torch.manual_seed(seed)
    sam = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    with torch.no_grad():
        # A mask's logits are (upscaled image embedding) . (a hypernetwork vector):
        # biasing that vector's entries lifts the logits so every prompt gives a
        # non-empty mask (a random decoder may otherwise give none), and scales them so
        # the masks are stable (sharp) enough for `--auto` to keep.
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.bias.fill_(500.0)
        # A constant predicted IoU of 0.95, so `--auto` keeps its candidates.
        sam.mask_decoder.iou_prediction_head.proj_out.weight.zero_()
        sam.mask_decoder.iou_prediction_head.proj_out.bias.fill_(0.95)
    sam.save_pretrained(segmenter)
    SamProcessor(image_processor=image_processor_class("Sam")(size={"longest_edge": 128}, pad_size={"height": 128, "width": 128})
                 ).save_pretrained(segmenter)

    for path in (*detector.rglob("*"), *segmenter.rglob("*")):
        if path.is_file():
            os.chmod(path, 0o644)  # save_pretrained writes the weights 0600
    return detector, segmenter


def build_tiny_mm_grounding_dino(folder: Path, grounding_dino: Path) -> Path:
    """A tiny random MM-Grounding-DINO with the tiny Grounding DINO's sizes and processor."""
    import shutil

    import torch
    from transformers import GroundingDinoConfig, MMGroundingDinoConfig, MMGroundingDinoForObjectDetection

    config = GroundingDinoConfig.from_pretrained(grounding_dino).to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        config.pop(key, None)
    torch.manual_seed(0)
    MMGroundingDinoForObjectDetection(MMGroundingDinoConfig(**config)).save_pretrained(folder)
    for path in Path(grounding_dino).iterdir():  # the processor's files
        if path.name not in ("config.json", "model.safetensors"):
            shutil.copy(path, Path(folder) / path.name)
    return Path(folder)


def build_tiny_clip(folder):
    """A random CLIP (1-layer text and vision towers, 32 px images) with a CLIP BPE tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **LEGACY_CLIP_IDS, **small),
                        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    processor = image_processor_class("CLIP")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_dino(folder):
    """A random DINO-style ViT (no pooler, as facebook/dino-vits16): 32 px, 8 px patches."""
    import torch
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=32,
                       patch_size=8)
    torch.manual_seed(0)
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    image_processor_class("ViT")(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


# -- FLUX.1 ---------------------------------------------------------------------------------------
# The real FLUX.1 T5 (google/t5-v1_1-xxl) has 32128 embedding rows for its tokenizer's 32100
# tokens; the tiny T5 keeps the same number of rows that no token reaches.
T5_SPARE_ROWS = 32128 - 32100
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99>, the last ids of its vocabulary
# The schedulers of FLUX.1-dev and FLUX.1-schnell (scheduler/scheduler_config.json).
FLUX_SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                    base_image_seq_len=256, max_image_seq_len=4096),
}
FLUX_T5_TOKENS = {"dev": 512, "schnell": 256}  # tokenizer_2's model_max_length in the real folders


def write_tiny_t5_tokenizer(folder: Path, max_length: int = 512) -> None:
    """A small T5 tokenizer built offline, laid out as T5's: <pad> 0, </s> 1, <unk> 2, the
    SentencePiece pieces (whole words of TINY_WORDS and single characters to fall back
    on), then the 100 sentinel tokens with <extra_id_0> last; </s> closes every prompt."""
    from transformers import T5TokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789<>.,_-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -1.0) for word in TINY_WORDS] + [(c, -5.0) for c in chars]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
    try:
        tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=T5_EXTRA_IDS, model_max_length=max_length)
    except ValueError:  # transformers 4 builds a fast tokenizer from a slow one's files only: made here as 5 makes it
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

        metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
        model = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
        model.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                       pre_tokenizers.Metaspace(**metaspace)])
        model.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
        model.decoder = decoders.Metaspace(**metaspace)
        tokenizer = T5TokenizerFast(tokenizer_object=model, extra_ids=T5_EXTRA_IDS, model_max_length=max_length,
                                    eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)


def tiny_flux_configs(variant: str = "dev", resolution: int = 64) -> dict:
    """Configs of a tiny FLUX.1: CLIP-L and T5 text encoders of width 32, a transformer
    with one double-stream and one single-stream block (2 heads of 16, rotary axes
    4+6+6), 16 latent channels packed 2x2 into 64, and a VAE that shrinks 2x. dev
    embeds the guidance scale, schnell does not."""
    text = dict(tiny_configs()["text_encoder"])
    text_2 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False)
    transformer = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
                       num_attention_heads=2, joint_attention_dim=text_2["d_model"],
                       pooled_projection_dim=text["hidden_size"], guidance_embeds=variant == "dev",
                       axes_dims_rope=(4, 6, 6))
    vae = dict(tiny_configs(resolution)["vae"], latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text, "text_encoder_2": text_2,
            "scheduler": dict(FLUX_SCHEDULERS[variant])}


def flux_dev_configs() -> dict:
    """Configs with the FLUX.1-dev architecture (for benchmarks; too big to build in tests):
    19 double and 38 single blocks 3072 wide (24 heads of 128), T5-XXL's encoder (4096
    wide, 24 layers, 32128 rows) and CLIP-L (768), and its 16-channel VAE."""
    text = dict(sdxl_configs()["text_encoder"])  # CLIP-L, as SDXL's first encoder
    text_2 = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
                  relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False,
                  vocab_size=32128)
    transformer = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                       guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    vae = dict(sd21_base_configs()["vae"], latent_channels=16, sample_size=1024, scaling_factor=0.3611,
               shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    return {"transformer": transformer, "vae": vae, "text_encoder": text, "text_encoder_2": text_2,
            "scheduler": dict(FLUX_SCHEDULERS["dev"])}


def build_flux_components(configs: dict, tokenizers: list, seed: int = 0, calibrate: bool = True) -> dict:
    """Random-initialised FLUX.1 parts from configs: transformer, VAE, CLIP (with the
    legacy special ids) and T5 (T5_SPARE_ROWS more rows than its tokenizer has tokens,
    unless the config says how many), and the flow-matching scheduler."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    text_cfg = dict(configs["text_encoder"])
    text_cfg.setdefault("vocab_size", len(tokenizers[0]))
    text_cfg.update(LEGACY_CLIP_IDS)
    t5_cfg = dict(configs["text_encoder_2"])
    t5_cfg.setdefault("vocab_size", len(tokenizers[1]) + T5_SPARE_ROWS)
    t5_cfg.update(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    parts = {}
    torch.manual_seed(seed)
    parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**text_cfg))
    torch.manual_seed(seed)
    parts["text_encoder_2"] = T5EncoderModel(T5Config(**t5_cfg))
    torch.manual_seed(seed)
    parts["transformer"] = FluxTransformer2DModel(**configs["transformer"])
    torch.manual_seed(seed)
    parts["vae"] = AutoencoderKL(**configs["vae"])
    if calibrate:
        _calibrate_flux_vae(parts["vae"])
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**configs["scheduler"])
    return parts


def _calibrate_flux_vae(vae) -> None:
    """_calibrate_vae for a VAE without quant_conv (FLUX's): a near-deterministic
    posterior from the encoder's own output layer, and the shift and scaling factors
    that give the latents zero mean and unit variance, as FLUX's 0.1159 and 0.3611 do
    for its VAE."""
    import torch

    with torch.no_grad():
        half = vae.encoder.conv_out.out_channels // 2
        vae.encoder.conv_out.weight[half:] = 0.0
        vae.encoder.conv_out.bias[half:] = -12.0  # log-variance: std = exp(-6)
        g = torch.Generator().manual_seed(0)
        probe = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
        latents = vae.encode(probe).latent_dist.mean
    vae.register_to_config(shift_factor=round(latents.mean().item(), 4),
                           scaling_factor=round(1.0 / latents.std().item(), 4))


def sharpen_joint_attention(transformer, factor: float) -> None:
    """sharpen_cross_attention for FLUX: its attention normalises every query and key
    (RMSNorm per head), so scaling the projections would change nothing; scaling the
    norms' weights by `factor` multiplies every attention logit by factor**2, as scaling
    SD's projections does. Image and text queries and keys alike: in FLUX they meet in
    one joint attention."""
    import torch

    with torch.no_grad():
        for name, module in transformer.named_modules():
            if name.endswith(("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                module.weight.mul_(factor)


def build_tiny_flux(folder: Path, variant: str = "dev", resolution: int = 64, seed: int = 0,
                    sharpen: float = 2.0, t5_dtype=None) -> Path:
    """Save a tiny random FLUX.1 dev or schnell as a diffusers folder that FluxPipeline
    loads (model_index.json names it, as the real ones do) and return its path. It has
    the real folders' quirks: CLIP's legacy special ids, and a T5 table with more rows
    than its tokenizer has tokens. Its attention is sharpened 2x (logits 4x), measured
    by training a handle's T5 row on the attention loss alone (a photo's square, 200
    steps): at 1x its share of the attention in the mask went 0.13 -> 0.21, at 2x 0.16
    -> 0.54 (loss 0.142 -> 0.082); at 4x the softmax saturates (loss 0.137 -> 0.121).
    `t5_dtype`: T5 saved in that precision (the real folders hold bf16), else fp32."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    folder = Path(folder)
    write_tiny_tokenizer(folder / "tokenizer")
    write_tiny_t5_tokenizer(folder / "tokenizer_2", FLUX_T5_TOKENS[variant])
    tokenizers = [CLIPTokenizer.from_pretrained(folder / "tokenizer"),
                  T5TokenizerFast.from_pretrained(folder / "tokenizer_2")]
    parts = build_flux_components(tiny_flux_configs(variant, resolution), tokenizers, seed=seed)
    sharpen_joint_attention(parts["transformer"], sharpen)
    if t5_dtype is not None:
        parts["text_encoder_2"].to(t5_dtype)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        save_part(parts[name], folder / name)
    model_index = {
        "_class_name": "FluxPipeline",
        "_diffusers_version": "0.0.0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def build_tiny_owlv2(folder):
    """A tiny random OWLv2 detector (its text tower reads at most 16 tokens, as the real one)."""
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2Processor

    write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = Owlv2Config(text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=16, **small),
                         vision_config=dict(image_size=64, patch_size=16, **small), projection_dim=16)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    processor = image_processor_class("Owlv2")(size={"height": 64, "width": 64})
    Owlv2Processor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
