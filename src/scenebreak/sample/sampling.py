"""What `generate`, `edit` and `extract-bg` share: opening a scene for sampling (prompt
checks, device, seed, pipeline), batching, writing PNGs, the CPU-time warning and the
result types."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import kept
from ..config import GenerateConfig
from ..device import Device, choose_device, precision_name
from ..errors import InvalidInput, Interrupted, UnknownHandle
from ..events import Message, Progress, Reporter, silent
from ..handles import handles_in
from ..hub import downloads_reported
from ..paths import fit_file_name, is_writable_folder, remove_dead_image_temporaries, write_atomically, write_new_file
from ..scenes.bundle import Scene, open_scene
from .blending import blended_steps
from .scene_models import open_pipeline, scene_tokenizers


@dataclass
class GeneratedImage:
    path: Path
    prompt: str
    seed: int
    kind: str = "image"  # image | edit | plate | variation | grid


@dataclass
class GenerateResult:
    scene: str
    images: list[GeneratedImage] = field(default_factory=list)
    seconds: float = 0.0
    # How the images were made, the family's defaults filled in (a script that left
    # --steps or --guidance out learns what they were): scheduler, steps, guidance, negative.
    settings: dict = field(default_factory=dict)
    # The scene's file (None: a scene given as an object without one): what the next
    # command takes, where `scene`, the scene's own name, may name another in the cache.
    scene_path: Path | None = None

    @property
    def paths(self) -> list[Path]:
        """The files written, in order (the command prints these)."""
        return [image.path for image in self.images]

    def to_dict(self) -> dict:
        return {
            "scene": self.scene,
            "scene_path": str(self.scene_path) if self.scene_path else None,
            "images": [{"path": str(i.path), "prompt": i.prompt, "seed": i.seed, "kind": i.kind} for i in self.images],
            "seconds": round(self.seconds, 2),
            "settings": self.settings,
            "paths": [str(p) for p in self.paths],
        }


@dataclass
class SamplingRun:
    """A scene opened for sampling: its pipeline, the seed of image 1, the clock."""

    scene: Scene
    pipe: object
    seed: int
    started: float
    config: GenerateConfig  # as given, with the family's defaults filled in (guidance) and `auto` resolved
    autocast_dtype: object = None  # bf16 on CPUs with bf16 instructions (Device.sampling_precision)
    kept_as: tuple | None = None  # the pipeline's key in the keeper (kept.py), where it may be kept

    def result(self, images: list[GeneratedImage]) -> GenerateResult:
        self.put_back()
        settings = {"scheduler": self.config.scheduler, "steps": self.config.steps, "guidance": self.config.guidance,
                    "negative": self.config.negative, "precision": self.config.precision}
        return GenerateResult(self.scene.name, images, time.perf_counter() - self.started, settings,
                              scene_path=self.scene.path)

    def put_back(self) -> None:
        """The pipeline kept for the next call with this scene (the work ended at a clean
        point: a pipeline left mid-pass by a failure is never put back)."""
        if self.kept_as is not None and self.pipe is not None:
            kept.keep(self.kept_as, self.pipe)

    def precision(self):
        """The autocast the denoiser and text encoders sample under (a no-op on GPUs)."""
        from ..device import Device

        device = self.pipe.device
        return Device(device.type, str(device)).autocast(self.autocast_dtype)


@dataclass
class SamplingPlan:
    """What `start` settles before any model loads (`plan_sampling`)."""

    scene: Scene
    config: GenerateConfig  # as SamplingRun's
    tokenizers: list
    device: Device
    dtype: object
    autocast_dtype: object
    seed: int
    base_model: str | None
    out_dir: Path | None
    started: float


def start(scene, prompts: list[str], config: GenerateConfig, *, device: str | Device | None = None,
          base_model: str | None = None, out_dir: Path | None = None, warn_unused: bool = True,
          report: Reporter = silent) -> SamplingRun:
    """Check every prompt against the scene, pick the device and the seed, make
    `out_dir`, then load the models: every mistake is reported before that slow part."""
    return open_run(plan_sampling(scene, prompts, config, device=device, base_model=base_model, out_dir=out_dir,
                                  warn_unused=warn_unused, report=report), report)


def plan_sampling(scene, prompts: list[str], config: GenerateConfig, *, device: str | Device | None = None,
                  base_model: str | None = None, out_dir: Path | None = None, warn_unused: bool = True,
                  report: Reporter = silent) -> SamplingPlan:
    """`start`'s checks, with no model loaded and nothing written: every prompt against
    the scene, the sampler, the precision on the device, `out_dir` writable; the seed
    picked. A caller with more to check (evaluate's scoring models) checks it after."""
    from ..hub import quiet_libraries

    started = time.perf_counter()
    quiet_libraries()  # (first: the libraries imported whole before anything here uses them, in any thread)
    scene = open_scene(scene)
    check_prompts(scene, prompts)
    if warn_unused:
        warn_unused_handles(scene, prompts, report)
    warn_old_pooling(scene, report)
    if base_model is not None and not scene.needs_base_model:
        report(Message(f"scene {scene.name!r} holds all its weights (it needs no base model): --base-model is ignored",
                       "warning"))
        base_model = None
    # The family's sampler, its steps and its guidance where none were asked for.
    if config.guidance is not None and not scene.family.takes_guidance:
        report(Message(f"{scene.family.name} takes no guidance: --guidance {config.guidance:g} is ignored", "warning"))
        config = dataclasses.replace(config, guidance=None)
    if getattr(config, "negative", None) == "":  # no negative prompt on every path (SDXL: zeros, not ""'s states)
        config = dataclasses.replace(config, negative=None)
    if getattr(config, "negative", None) and not scene.family.classifier_free:
        report(Message(f"{scene.family.name} samples without a negative prompt (one pass per step, no classifier-free "
                       "guidance): --negative is ignored", "warning"))
        config = dataclasses.replace(config, negative=None)
    if config.negative:  # (a handle it does not have would be read as plain words)
        check_prompts(scene, [config.negative], "negative prompt")
    sampler, steps = scene.family.choose_sampler(config.scheduler, config.steps)
    check_sampler_config(scene, sampler, steps)
    config = dataclasses.replace(config, scheduler=sampler, steps=steps,
                                 guidance=scene.family.guidance if config.guidance is None else config.guidance)
    tokenizers = scene_tokenizers(scene)
    check_prompt_lengths(scene, prompts, tokenizers[scene.family.attention_text], report)
    if config.negative:
        check_prompt_lengths(scene, [config.negative], tokenizers[scene.family.attention_text], report,
                             "negative prompt")
    warn_handles_past_shorter_encoders(prompts, tokenizers, scene.family.attention_text, report)
    device = device if isinstance(device, Device) else choose_device(device)
    dtype, autocast_dtype = device.sampling_precision(config.precision, prefer_bf16=scene.family.samples_in_bf16)
    # What `auto` came to on this machine, as the images and results record it: "auto"
    # made the same image again only on a machine like this one.
    config = dataclasses.replace(config, precision=precision_name(autocast_dtype or dtype))
    seed = pick_seed(config, report)
    if out_dir is not None and not is_writable_folder(Path(out_dir)):
        raise InvalidInput(f"--out-dir {out_dir} is not a folder you can write to: choose another")
    return SamplingPlan(scene, config, tokenizers, device, dtype, autocast_dtype, seed, base_model,
                        Path(out_dir) if out_dir is not None else None, started)


def open_run(plan: SamplingPlan, report: Reporter = silent) -> SamplingRun:
    """Make the plan's `out_dir` and load its models (or take the kept ones)."""
    if plan.out_dir is not None:
        plan.out_dir.mkdir(parents=True, exist_ok=True)
        remove_dead_image_temporaries(plan.out_dir)
    scene, config = plan.scene, plan.config
    key = pipeline_key(scene, plan.device, plan.dtype, plan.base_model)
    pipe = kept.take(key)  # (None for a scene that is no file: then whatever is kept goes before this load)
    if pipe is not None:  # the last call's, of this scene: only its sampler is made anew (its state is per run)
        pipe.scheduler = scene.family.sampler(config.scheduler, scene.meta["configs"]["scheduler"])
    else:
        with downloads_reported(report):
            pipe = open_pipeline(scene, plan.device, plan.base_model, dtype=plan.dtype, scheduler=config.scheduler,
                                 tokenizers=plan.tokenizers, report=report)
    return SamplingRun(scene, pipe, plan.seed, plan.started, config, plan.autocast_dtype, kept_as=key)


def pipeline_key(scene: Scene, device: Device, dtype, base_model: str | None) -> tuple | None:
    """What a kept pipeline must match to serve again: the same scene file, unchanged
    since (its stamp: a scene learned again under the name is another), with the same
    handle rows, on the same device in the same precision, over the same base model; a
    Scene object holding its weights, that object (its weights are what the pipeline
    was built from, and a caller may have changed them). None (never kept) for a scene
    that is no file."""
    import hashlib

    if scene.path is None or scene.stamp is None:
        return None
    rows = hashlib.sha256()  # (a few rows: a caller may have set the object's own)
    for embedding in scene.handle_embeddings:
        rows.update(embedding.detach().float().cpu().contiguous().numpy().tobytes())
    holder = None
    if scene.weights:
        holder = scene.__dict__.setdefault("_kept_as", next(_scene_objects))
    return ("pipeline", str(Path(scene.path).resolve()), scene.stamp, rows.hexdigest(), holder, str(device.torch),
            str(dtype), os.fspath(base_model) if base_model is not None else os.environ.get("SCENEBREAK_BASE_MODEL"))


_scene_objects = itertools.count()  # numbers the Scene objects whose own weights a pipeline was built from


def check_sampler_config(scene, sampler: str, steps: int) -> None:
    """The scene's scheduler config makes its sampler (a stranger's scene may hold one
    that does not), and the sampler takes `steps` steps: said in one line now, not
    after the models have loaded."""
    from ..errors import BundleError

    def why(exc: Exception) -> str:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"

    try:
        size = scene.resolution // 8
        scheduler = scene.family.sampler(sampler, scene.meta["configs"]["scheduler"])
        scene.family.set_timesteps(scheduler, steps, (size, size), "cpu")
    except Exception as exc:  # diffusers raises several types for impossible settings
        raise BundleError(f"{scene.path or scene.name} is not a valid scene: its scheduler config does not make a "
                          f"{sampler} sampler ({why(exc)})") from None
    try:
        dry_run(scheduler)
    except Exception as exc:
        # (SD's samplers at 1000 steps: the base's steps_offset puts the first timestep
        # past the 1000 it was trained on, and the first step failed, models loaded.)
        raise InvalidInput(f"--steps {steps} is more than this scene's {sampler} sampler takes ({why(exc)}): "
                           "use fewer") from None


def dry_run(scheduler) -> None:
    """Every step of `scheduler` (timesteps set) on a one-pixel latent: what sampling
    will ask of it, in microseconds a step."""
    import torch

    sample = torch.zeros(1, 1, 1, 1)
    with torch.random.fork_rng(devices=[]):  # (Euler's step draws noise, from the global generator)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
            sample = scheduler.step(torch.zeros_like(model_input), t, sample, return_dict=False)[0]


MAX_PROMPTS_FILE = 2**20  # bytes: thousands of prompts
MAX_PROMPTS = 10_000


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """The prompts of a prompts file ("-": stdin): one per line, blank lines and lines
    starting with # left out."""
    from ..paths import read_text_file

    text = read_text_file(path, "--prompts-file", MAX_PROMPTS_FILE)
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(prompts) > MAX_PROMPTS:
        raise InvalidInput(f"--prompts-file {path} holds {len(prompts)} prompts: at most {MAX_PROMPTS} per call")
    return prompts


def check_prompts(scene: Scene, prompts: list[str], what: str = "prompt") -> None:
    """Every <handle> in every prompt must be one of the scene's."""
    known = scene.tokens
    for prompt in prompts:
        for token in handles_in(prompt):
            if token not in known:
                raise UnknownHandle(f"unknown handle {token} in {what} {prompt!r}: scene {scene.name!r} has "
                                    f"{', '.join(known)}")


def check_prompt_lengths(scene: Scene | None, prompts: list[str], tokenizer, report: Reporter,
                         what: str = "prompt") -> None:
    """The text encoder reads a prompt's first tokens only (77 on CLIP): a handle past
    them would silently vanish from the image, so that is refused; words alone past
    them are cut with a warning saying which."""
    limit = tokenizer.model_max_length
    for prompt in prompts:
        ids = tokenizer(prompt, truncation=False).input_ids
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1:limit - 1])
        for token in dict.fromkeys(handles_in(prompt)):
            if tokenizer.convert_tokens_to_ids(token) not in ids[:limit - 1]:
                raise InvalidInput(f"{what} {prompt[:60]!r}...: handle {token} falls past the text encoder's {limit} "
                                   "tokens, where the prompt is cut: put it earlier or shorten the prompt")
        report(Message(f"{what} {prompt[:60]!r}... is {len(ids)} tokens, over the text encoder's {limit}: "
                       f"only {kept[-40:]!r} and what comes before it is used", "warning"))


def warn_handles_past_shorter_encoders(prompts: list[str], tokenizers: list, attention_text: int,
                                       report: Reporter) -> None:
    """FLUX reads the prompt twice: T5 (512 tokens) for the image, CLIP-L (77) for the
    pooled vector. A handle between the two limits still shapes the image, but misses
    the pooled vector it was trained with, so it is weaker: said, not refused."""
    limit = tokenizers[attention_text].model_max_length
    for tokenizer in tokenizers:
        short = tokenizer.model_max_length
        if short >= limit:
            continue
        for prompt in prompts:
            ids = tokenizer(prompt, truncation=False).input_ids
            if len(ids) <= short:
                continue
            lost = [token for token in dict.fromkeys(handles_in(prompt))
                    if tokenizer.convert_tokens_to_ids(token) not in ids[:short - 1]]
            if lost:
                report(Message(f"prompt {prompt[:60]!r}...: {', '.join(lost)} falls past CLIP's {short} tokens, so the "
                               "pooled prompt misses it and it comes out weaker: put it earlier for its full effect",
                               "warning"))


def warn_unused_handles(scene: Scene, prompts: list[str], report: Reporter) -> None:
    for prompt in prompts:
        if not handles_in(prompt):
            report(Message(f"prompt {prompt!r} uses none of the scene's handles ({', '.join(scene.tokens)})", "warning"))


def warn_old_pooling(scene: Scene, report: Reporter) -> None:
    """Scenes of a family with pooled text (SDXL) learned before the pooled prompt was
    taken at the end of text (families.pool_at_end_of_text) trained with it at the
    last handle: they still
    sample, with the fixed pooling, but a new `learn` fits what is sampled now."""
    if scene.family.pooled_text and scene.meta.get("pooled_at") != "eos":
        report(Message(f"scene {scene.name!r} was learned by an older scenebreak whose pooled prompt ignored the "
                       "words after a handle: learn it again for the best results", "warning"))


def pick_seed(config: GenerateConfig, report: Reporter) -> int:
    """The seed of image 1: the one asked for, or a random one, reported either way."""
    seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
    report(Message(f"seed: {seed}"))
    return seed


def images_per_pass(config: GenerateConfig, pipe) -> int:
    from .pipeline import images_per_pass as per_device

    return per_device(pipe.device, config.batch_size)


def warn_cpu_time(run: SamplingRun, image_steps: int, pixels: int, report: Reporter) -> None:
    """On the CPU, say first how long the sampling will roughly take (measured figure for
    SD2.1-base at 512x512, scaled by UNet size and pixel count)."""
    if run.pipe.device.type != "cpu":
        return
    from ..estimates import cpu_sampling_seconds, format_duration

    denoiser = getattr(run.pipe, run.scene.family.denoiser)
    seconds = image_steps * cpu_sampling_seconds(denoiser, pixels, bf16=run.autocast_dtype is not None)
    if seconds > 60:
        report(Message(f"on the CPU this takes roughly {format_duration(seconds)}; a CUDA GPU takes seconds (--device cuda)", "warning"))


def slug(text: str, limit: int = 40) -> str:
    """A prompt as part of a file name: ASCII words joined by "-", accents folded as
    learn folds a photo's name ("München" is "munchen", not "m-nchen")."""
    import unicodedata

    folded = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    s = re.sub(r"[^A-Za-z0-9]+", "-", folded).strip("-").lower()
    return s[:limit].rstrip("-") or "image"


def save_png(image, path: Path, overwrite: bool = False, icc_profile: bytes | None = None,
             text: dict[str, str] | None = None) -> Path:
    """Write a PIL image or (H, W, 3) uint8 array atomically (tagged with `icc_profile`
    and PNG text chunks `text`, if given); an existing file is kept (the new one gets a
    numbered name, also when another run took the name meanwhile) unless `overwrite`.
    Returns where it went."""
    from PIL import Image, PngImagePlugin

    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # (UTF-8: a prompt in any language)
        extra["pnginfo"] = info
    write = lambda tmp: image.save(tmp, format="PNG", **extra)  # noqa: E731
    return write_atomically(Path(path), write) if overwrite else write_new_file(Path(path), write)


# Our samplers by the names AUTOMATIC1111 and Forge write and read back ("Send to txt2img").
A1111_SAMPLERS = {"dpm": "DPM++ 2M", "ddim": "DDIM", "euler": "Euler", "flow": "Euler"}


def png_parameters(scene: Scene, prompt: str, seed: int, config: GenerateConfig, size: tuple[int, int],
                   edit: dict | None = None) -> dict:
    """What made an image, in its PNG: "parameters" as AUTOMATIC1111 writes it (its PNG
    Info tab, and the tools that read that, show it), and "scenebreak" as JSON; enough to
    make the image again with `generate` (an edit's: `edit` settings, and A1111's
    inpainting keys)."""
    settings = {"scene": scene.name, "prompt": prompt, "negative": config.negative, "seed": seed,
                "scheduler": config.scheduler, "steps": config.steps, "guidance": config.guidance,
                "precision": config.precision, "size": list(size), **({"edit": edit} if edit else {})}
    lines = [prompt] + ([f"Negative prompt: {config.negative}"] if config.negative else [])
    # FLUX.1 dev's guidance is embedded, not classifier-free: Forge writes it as
    # "Distilled CFG Scale" beside a CFG scale of 1 (one pass per step).
    cfg = config.guidance if scene.family.classifier_free else (1 if config.guidance is not None else None)
    lines.append(", ".join(f"{key}: {value}" for key, value in (
        ("Steps", config.steps), ("Sampler", A1111_SAMPLERS.get(config.scheduler, config.scheduler)),
        ("CFG scale", cfg), ("Distilled CFG Scale", None if scene.family.classifier_free else config.guidance),
        ("Seed", seed), ("Size", f"{size[0]}x{size[1]}"), ("Model", scene.name),
        # (A1111's img2img names: the share of the steps that re-make the region, as run, the
        # seam's width.)
        ("Denoising strength", round(blended_steps(config.steps, edit["blend_start"]) / config.steps, 4) if edit
         else None),
        ("Mask blur", edit["feather"] if edit and edit["paste"] else None)) if value is not None))
    return {"parameters": "\n".join(lines), "scenebreak": json.dumps(settings)}


def sample_to_files(run: SamplingRun, prompts: list[str], config: GenerateConfig, seed: int, out_dir: Path,
                    name: str, report: Reporter, should_stop=None) -> list[GeneratedImage]:
    """`config.num_images` images per prompt, seeds seed, seed+1, ..., as PNGs in `out_dir`;
    `should_stop()` is asked after each pass (Interrupted, what is written kept)."""
    from .pipeline import run_in_passes, sample

    pipe, scene = run.pipe, run.scene
    batch = images_per_pass(config, pipe)
    total = len(prompts) * config.num_images * config.steps
    images_out, done = [], 0
    report(Progress("generate", 0, total))

    def written() -> GenerateResult:
        """What an interruption leaves: the images written so far."""
        return GenerateResult(scene.name, list(images_out), scene_path=scene.path)
    for prompt in prompts:
        def one_pass(chunk, more, prompt=prompt) -> None:
            nonlocal done
            images = sample(pipe, scene.family, prompt, chunk, steps=config.steps, guidance=config.guidance,
                            resolution=scene.resolution, negative=config.negative, autocast=run.precision(), report=report,
                            done=done, total=total)
            done += len(chunk) * config.steps
            for s, image in zip(chunk, images):
                path = save_png(image, Path(out_dir) / fit_file_name(name, f"-{slug(prompt)}-{s}.png"),
                                text=png_parameters(scene, prompt, s, config, image.size))
                images_out.append(GeneratedImage(path, prompt, s))
            if should_stop is not None and should_stop() and done < total:
                run.put_back()  # (stopped between passes: the pipeline is as after a whole call)
                raise Interrupted(f"stopped: {len(images_out)} image(s) written to {out_dir}", partial=written())

        try:
            run_in_passes([seed + i for i in range(config.num_images)], batch, one_pass, report)
        except BaseException as exc:  # Ctrl-C, SIGTERM, a full disk: the images written so far go with it
            if images_out and getattr(exc, "partial", None) is None:  # (the command prints them)
                with contextlib.suppress(AttributeError):  # (an exception that takes no attribute)
                    exc.partial = written()
            raise
    return images_out
