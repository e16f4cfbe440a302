"""`learn(image, masks)`: from one photo and its masks to a `.scene` file. This module
orchestrates; the trainer, the memory plan, checkpoints and the bundle do the work."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import kept
from ..arguments import (config_argument, flag_argument, function_argument, model_argument, path_argument,
                         path_arguments)
from ..config import LearnConfig, default_base_model
from ..device import Device, choose_device, precision_name, tf32_settings_kept
from ..errors import (NO_SPACE, InvalidInput, Interrupted, NoSpace, OutOfMemory, SceneBreakError, fixable_failures,
                      is_out_of_memory, stopped_by)
from ..events import Message, Progress, Reporter, silent
from ..handles import check_handle_tokens
from ..hub import downloads_reported, looks_like_path
from ..images import background_mask, load_image, load_masks, orientation, prepare
from ..masks.checks import mask_warnings
from ..paths import (check_file_name_fits, check_name, check_room, checkpoint_path, home, is_writable_folder,
                     same_file, scene_path, windows_device_name)
from ..scenes.bundle import is_scene, save_scene
from .assemble import scene_from_training, scene_metadata
from .checkpoints import Checkpoints, StopFlag, catch_interrupts, identity, stops_noted
from .compiling import compile_settings_kept
from .locks import Busy, scene_lock


@dataclass
class LearnResult:
    path: Path
    name: str
    handles: list[str]
    losses: dict = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False

    @property
    def paths(self) -> list[Path]:
        return [self.path]

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "handles": self.handles, "losses": self.losses,
                "seconds": round(self.seconds, 2), "resumed": self.resumed, "paths": [str(self.path)]}


def check_resolution(family, denoiser, vae, resolution: int) -> None:
    """The training resolution must suit the denoiser and the attention loss's maps
    (`denoiser`, `vae`: the models, or stand-ins holding only their configs)."""
    factor = family.resolution_step(denoiser, vae)
    if resolution < factor or resolution % factor:
        raise InvalidInput(f"--resolution {resolution} does not suit this model: use a multiple of {factor} "
                           f"(its native size is {family.native_resolution(denoiser, vae)})")


def check_resolution_from_files(folder: Path, resolution: int) -> None:
    """check_resolution from the base model folder's config files alone, before any
    weight loads (minutes for SDXL or FLUX.1); where they cannot be read, the load
    will say what is wrong and the check runs after it."""
    import json
    from types import SimpleNamespace

    from diffusers.configuration_utils import FrozenDict

    from ..families import detect_family

    family = detect_family(folder, f"the base model {folder}")
    try:
        denoiser, vae = (SimpleNamespace(config=FrozenDict(json.loads((folder / part / "config.json").read_text(
            encoding="utf-8")))) for part in (family.denoiser, "vae"))
        family.resolution_step(denoiser, vae), family.native_resolution(denoiser, vae)
    except Exception:  # (missing, garbled or incomplete configs: not this check's to report)
        return
    check_resolution(family, denoiser, vae, resolution)


def default_name(image: Path) -> str:
    """The scene name of a photo learned without --name: its file name without the
    extension, spelled with what scene names allow (ASCII letters, digits, '.', '_',
    '-'; anything else becomes '-').

    Accented letters lose their accents (café.jpg: "cafe"). Letters that have no ASCII
    spelling (фото.jpg, 写真.jpg) cannot be kept, and simply dropping them would give
    different photos the same name, so that `for f in *.jpg; do scenebreak learn "$f"
    ... --force; done` would overwrite one scene with the next. Such names therefore
    end in the first 8 hex digits of the sha256 of the file name: "scene-1a2b3c4d"
    when nothing ASCII is left, "1-1a2b3c4d" for фото-1.jpg."""
    import hashlib
    import os
    import unicodedata

    path = Path(image)
    stem = path.stem
    while stem.lower().endswith(".scene"):  # "x.scene.jpg": a name may not end in .scene
        stem = stem[: -len(".scene")]
    chars, lost = [], False
    for ch in unicodedata.normalize("NFKD", stem):
        if ch.isascii():
            chars.append(ch if ch.isalnum() or ch in "._-" else "-")
        elif unicodedata.combining(ch):
            continue  # the accent of a letter kept just before
        else:
            # Punctuation and spaces only separate words; a letter, digit or symbol is lost.
            lost = lost or unicodedata.category(ch)[0] not in "PZ"
            if not chars or chars[-1] != "-":
                chars.append("-")
    name = "".join(chars).strip("-._")
    if lost or len(name) > 200:  # a name cut to scene names' 200 characters needs the hash too
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:8]
        name = f"{name[:200 - 9].rstrip('-._')}-{digest}" if name else f"scene-{digest}"
    if windows_device_name(name):  # con.jpg: "con" names the console on Windows
        first, _, rest = name.partition(".")
        name = f"{first}-scene" + (f".{rest}" if rest else "")
    return name or "scene"


@fixable_failures()
def learn(image: str | os.PathLike, masks: list[str | os.PathLike], config: LearnConfig = LearnConfig(), *,
          name: str | None = None, output: str | os.PathLike | None = None, base_model: str | None = None,
          revision: str | None = None, device: str | Device | None = None, resume: bool = False, force: bool = False,
          replace: bool = False, report: Reporter = silent, should_stop=None) -> LearnResult:
    """Learn one handle per mask from one photo and write the scene; returns where it went.

    `should_stop()` (optional) is polled after every step, like Ctrl-C: when it turns
    true a checkpoint is saved and `Interrupted` is raised; `resume=True` continues it.
    It is asked once the models have loaded too, before the training begins: true
    then, `Interrupted` comes with nothing saved (a Cancel heard while a base of tens of
    gigabytes loaded no longer waits for a first step and its checkpoint).
    `force=True` replaces an existing scene and runs even while another process learns
    the same name; `replace=True` only replaces (an existing scene, an interrupted run's
    checkpoint), and is refused (Busy) while another process learns the name."""
    started = time.perf_counter()
    base_model = model_argument(base_model, "base_model")  # (a Path from Python: recorded as text)
    resume, force, replace = (flag_argument(value, what) for what, value in (("resume", resume), ("force", force),
                                                                              ("replace", replace)))
    report = function_argument(report, "report") or silent
    should_stop = function_argument(should_stop, "should_stop")
    # (From Python: one mask given alone is a list of one, not its letters.)
    image, masks = path_argument(image, "image"), path_arguments(masks, "masks")
    config = config_argument(config, LearnConfig)
    output = path_argument(output, "output") if output is not None else None
    if name is not None and not isinstance(name, str):
        raise InvalidInput(f"name must be text, not {type(name).__name__}")
    from ..masks.files import PREVIEW_SUFFIX

    for mask in masks:  # `STEM.mask*.png` also matches the preview `mask` writes beside the masks
        if mask.name.endswith(PREVIEW_SUFFIX):
            raise InvalidInput(f"{mask} is the preview `scenebreak mask` draws, not a mask: give the masks "
                               f"(STEM.mask[0-9]*.png)")
        if same_file(mask, image):  # (`--masks photo*.png` matches the photo too)
            raise InvalidInput(f"{mask} is the photo itself, not a mask: give one mask per object")
    # Everything that can be wrong with the input is checked before any model loads.
    config = config.validate(len(masks))
    tokens = config.handle_tokens(len(masks))
    check_handle_tokens(tokens)
    if name is not None and not str(name).strip():  # (an unset $NAME in a script: not the photo's name unasked)
        raise InvalidInput("--name is empty: give the scene a name, or leave --name out for the photo's")
    name = name or default_name(Path(output) if output else image)
    # A new name must be portable; one a scene or a run already has (made before that
    # rule) may still be resumed or replaced under it. (scene_path checks the name first.)
    check_name(name, new=not (scene_path(name).exists() or checkpoint_path(name).exists()))
    out = Path(output) if output else scene_path(name)
    replace = replace or force
    _check_output(out, force=replace, resume=resume)
    photo, notes = load_image(image), []
    object_masks = load_masks(masks, photo.size, orientation(photo), notes)
    for line in mask_warnings(image, photo.size, orientation(photo), object_masks, masks, notes):
        report(Message(line, "warning"))
    if config.background:
        background_mask(object_masks)
    if revision is not None and looks_like_path(base_model or default_base_model()):  # (SCENEBREAK_BASE_MODEL too)
        # A folder is what it holds: the scene must not claim a revision nothing read.
        report(Message(f"--revision {revision} is for a model on the hub: ignored for the local folder "
                       f"{base_model or default_base_model()}", "warning"))
        revision = None
    device = device if isinstance(device, Device) else choose_device(device)
    amp_dtype = device.train_dtype(config.mixed_precision)  # the one place the precision is decided
    if config.adam_8bit:
        from .optim import check_adam_8bit

        check_adam_8bit(device)
    if config.tune == "lora":  # (auto checks once it has chosen LoRA)
        from ..families.lora import require_peft

        require_peft()
    if config.compile and device.type != "cuda":
        raise InvalidInput(f"--compile speeds up training on CUDA GPUs only: leave it out on {device.type}")
    if config.quantize in ("nf4", "int8") and config.tune != "full":  # before the model loads (and again in the plan)
        from ..families.quantized import require_quantization

        require_quantization(f"--quantize {config.quantize}", device)
    # From here to the end, a stop is noted and said in one line (stops_noted); once the
    # scene is written, it changes nothing.
    stop = StopFlag(also=should_stop)
    with stops_noted(stop, lambda: _before_training(name, resume)):
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(scene_lock(name))
            except Busy:
                if not force:
                    raise
                # --force runs all the same (as documented), without the lock another run holds.
                report(Message(f"another process is learning {name!r}: --force runs anyway; the two share its "
                               "checkpoint", "warning"))
            _check_interrupted_run(name, resume=resume, force=replace)
            import torch

            # The caller's CPU generator as it found it: the handles' new embedding rows (and
            # the table resized back) are initialised from it, whatever the trainer then sets.
            with torch.random.fork_rng(devices=[]):
                result = _learn(image, masks, config, tokens, name, out, base_model, revision, device, amp_dtype,
                                resume, replace, report, stop, started, loaded=(photo, object_masks))
        # The training's models and optimizer state, which reference cycles hold (the trainer's
        # compiled steps), go now, not when Python's collector next runs: the same process's
        # next learn or generate (a notebook, the page, a batch worker) loads into that memory.
        # (After a failure the error's frames hold them; fixable_failures lets go of those
        # where the failure is no bug's evidence: out of memory, an interrupt.)
        kept.free_memory()
    return result


def _warn_vanishing_masks(masks, tokens: list[str], components, resolution: int, report: Reporter) -> None:
    """A mask that the losses' grids do not see (narrower than a latent, 8 px, or than an
    attention cell, 32 px on SD at 512): the handle's diffusion loss would be zero when
    it is drawn alone, and its attention target empty, a map the loss cannot fit."""
    from .losses import downsample_masks

    latent = resolution // components.vae_scale_factor
    hidden: dict[str, tuple[str, int]] = {}
    for what, size in (("latent", latent), ("attention", components.family.attention_size(latent))):
        for flip in (False, True):
            seen = downsample_masks((masks.flip(-1) if flip else masks).float(), size).flatten(1).any(1)
            for token, visible in zip(tokens, seen.tolist()):
                if not visible:
                    hidden.setdefault(token, (what, size))
    for token, (what, size) in hidden.items():
        report(Message(f"the mask of {token} is too small for the {size}x{size} {what} grid of the {resolution} px "
                       "training crop: grow it (scenebreak mask --dilate) or crop the photo closer around the "
                       "objects", "warning"))


def _check_interrupted_run(name: str, *, resume: bool, force: bool) -> None:
    """An interrupted run's checkpoint is never replaced unasked: run again without
    --resume (up-arrow, Enter, after a Ctrl-C), it would have been, at the end of phase 1,
    with all the training it held. Its stale temporaries go (before the disk-room check).
    A --resume with no checkpoint (a mistyped name) is said here, before any model loads."""
    from ..paths import remove_stale_temporaries

    path = checkpoint_path(name)
    remove_stale_temporaries(path)
    if resume and not os.path.lexists(path):  # (said before the base model loads, or downloads)
        raise InvalidInput(f"nothing to resume: no checkpoint for scene {name!r} (run without --resume)")
    if path.exists() and not resume and not force:
        raise InvalidInput(f"an interrupted run of {name!r} left a checkpoint ({path}): add --resume to continue it, "
                           "or --force to start over")


def _learn(image, masks, config, tokens, name, out, base_model, revision, device, amp_dtype, resume, replace, report,
           stop: StopFlag, started, loaded=None) -> LearnResult:
    """`loaded`: the photo and masks as read and checked before the models loaded (not
    decoded again, nor read again changed meanwhile); `stop`: asked before the training
    and after every step."""
    import torch

    from ..families.base_model import resolve_model_dir

    base_model = base_model or default_base_model()
    with downloads_reported(report):
        resolved = resolve_model_dir(base_model, revision)  # the family is checked here, before any weight
    from ..families import detect_family
    from ..families.base_model import load_tokenizers
    from .tokens import check_handles

    family = detect_family(resolved[0], base_model)
    if config.prior and config.class_scheduler:  # (its family's samplers known from the configs alone)
        family.choose_sampler(config.class_scheduler, None, "--class-scheduler")
    tokenizers = load_tokenizers(resolved[0], family)  # (read once: the models load with these)
    for tokenizer in tokenizers:  # the handles and init words, before any weight loads
        check_handles(tokenizer, tokens, config.handle_init_words())
    # The models kept since an earlier generate in this process go, before this base
    # loads and the memory plan measures what is free (else the plan, and with --tune
    # auto the kind of scene, would depend on what the process did before).
    kept.unload()
    if config.resolution:
        check_resolution_from_files(resolved[0], config.resolution)
    checked_tune = _check_room(resolved[0], config, out)
    report(Message(f"loading the base model {base_model}"))  # (FLUX.1's is tens of GB: seconds to minutes)
    components, resolution, prepared = _load_inputs(image, masks, config, base_model, revision, resolved, device,
                                                    amp_dtype, loaded, tokenizers)
    _stop_before_training_if_asked(stop, name, resume)
    if config.lambda_attn is None:  # the family's weight of the attention loss
        config = dataclasses.replace(config, lambda_attn=components.family.lambda_attn)
    checkpoints = Checkpoints(name, identity(prepared, config, components.base.fingerprint, components.base.weights),
                              config.checkpoint_every, config.steps2)
    state = checkpoints.load(report) if resume else None
    if state is not None and (state.get("device"), state.get("precision")) not in (
            (None, None), (device.type, precision_name(amp_dtype))):
        report(Message(f"resuming on {device.type} in {precision_name(amp_dtype)} a run that began on "
                       f"{state.get('device')} in {state.get('precision')}: the scene differs from an uninterrupted "
                       "run's by rounding", "warning"))
    if state is None and checkpoints.path.exists():  # (--force)
        report(Message(f"starting over: the checkpoint of an earlier run of {name!r} will be replaced", "warning"))
    plan = _plan(config, components, device, resolution, amp_dtype, report, state.get("tuning") if state else None,
                 state.get("quantize") if state else None, steps_left(state, config) if state else None)
    asked_lora = [f"--{name.replace('_', '-')}" for name in ("rank", "lr_lora")
                  if getattr(config, name) != getattr(LearnConfig(), name)]
    if config.tune == "auto" and plan.tune == "full" and asked_lora:  # (--tune full is warned of by the CLI)
        report(Message(f"{' and '.join(asked_lora)} {'are' if len(asked_lora) > 1 else 'is'} for LoRA tuning, but "
                       "--tune auto chose full tuning (it fits): ignored; pass --tune lora to use "
                       f"{'them' if len(asked_lora) > 1 else 'it'}", "warning"))
    config = dataclasses.replace(config, tune=plan.tune)  # --tune auto settled
    if state is not None and state.get("half_frozen", plan.half_frozen) != plan.half_frozen and amp_dtype is not None:
        # --memory or --standalone changed on resume: the frozen weights now wait in another precision.
        held = precision_name(amp_dtype) if plan.half_frozen else "fp32"
        report(Message(f"resuming with the frozen weights held in {held}, unlike the run's start (--memory or "
                       "--standalone changed): the scene differs from an uninterrupted run's by rounding", "warning"))
    if plan.tune != checked_tune:  # auto chose full tuning: its scene and checkpoint are far larger than LoRA's
        _check_room(resolved[0], config, out)
    widen = plan.tune == "full" or not plan.half_frozen  # loaded in half precision for a frozen base the plan does not keep
    if widen:
        for model in (components.denoiser, *components.text_encoders):
            if model.dtype != torch.float32 and model.device.type != "meta":
                model.float()
    if config.tune == "lora":
        from ..families.lora import require_peft

        require_peft()
    if components.deferred:
        from ..families.base_model import load_deferred

        _make_room_for_deferred(components, plan, device, amp_dtype)
        load_deferred(components, widen)
        _stop_before_training_if_asked(stop, name, resume)
    if plan.quantize != "none":
        # Before the class images: where the plan quantises (FLUX.1 on a 24 GB card), the
        # base fits the GPU only so, for sampling them as for training.
        from ..families.quantized import quantize_frozen_base

        quantize_frozen_base(components, plan.quantize, amp_dtype or torch.float32)

    from ..device import hold_in_fp32
    from .classimages import ensure_class_images
    from .tokens import add_handles
    from .trainer import Trainer, TrainInputs

    # Before the class images, which the text encoders condition too (FLUX.1's T5 in fp16).
    hold_in_fp32(components.text_encoders, amp_dtype, device.type)
    with _out_of_memory_in_one_line(plan, device), tf32_settings_kept(), compile_settings_kept(config.compile):
        with catch_interrupts(stop, report):
            class_images = []
            if config.prior:
                class_images = ensure_class_images(components, device, config.class_prompt, config.num_class_images,
                                                   resolution, amp_dtype, report=report, should_stop=stop,
                                                   scheduler=config.class_scheduler, quantized=plan.quantize)
            # Every text encoder gets the handles, each initialised by the same rule in its own table.
            handle_ids = [add_handles(tokenizer, text_encoder, tokens, config.handle_init_words())
                          for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders)]
            handle_ids = handle_ids[components.family.attention_text]  # the tokens the attention loss reads
            left, top, right, bottom = prepared.crop_box
            inputs = TrainInputs(prepared.image, torch.from_numpy(prepared.masks), handle_ids, class_images,
                                 crop_size=(bottom - top, right - left))
            _warn_vanishing_masks(inputs.masks, tokens, components, resolution, report)
            trainer = Trainer(components, inputs, config, device, tokens, plan=plan, amp_dtype=amp_dtype)
            if state is not None:
                try:
                    notes = trainer.load_state_dict(state)
                except (KeyError, TypeError, AttributeError, ValueError) as exc:  # a part missing or of another kind
                    raise InvalidInput(f"the checkpoint of {name!r} is damaged or from another version of scenebreak "
                                       f"({type(exc).__name__}: {str(exc)[:60]}): start over with --force in place "
                                       "of --resume") from None
                for note in notes:
                    report(Message(note, "warning"))
                del state
            _train(trainer, checkpoints, stop, device, report)
            stop.finishing = True
            checkpoints.before_final_save(trainer, report)
            # Still inside the handler: a Ctrl-C now lets the save finish (a second one
            # aborts it, and the atomic write leaves no partial file).
            meta = scene_metadata(name=name, tokens=tokens, components=components, prepared=prepared, config=config, plan=plan,
                                  precision=precision_name(amp_dtype), losses=trainer.loss_summary(), device=device,
                                  image=image, masks=masks, resolution=resolution, seconds=time.perf_counter() - started)
            scene = scene_from_training(components, meta, prepared)
            report(Message(f"writing the scene to {out}"))
            try:
                # What is there now, not at the start (hours ago): only a scene, and only
                # with --force or --resume, is replaced; anything else is kept.
                saved = save_scene(scene, out, config.save_dtype, replace=(replace or resume) and _scene_or_nothing(out))
            except OSError as exc:
                finished = checkpoints.saved == (trainer.phase, trainer.step)
                raise _unsaved(exc, out, checkpoints, finished) from exc
            stop.written = True
            if saved != out:
                report(Message(f"{out} appeared while learning and is kept: the scene went to {saved}", "warning"))
    checkpoints.remove()
    return LearnResult(saved, name, tokens, meta["losses"], time.perf_counter() - started, resumed=resume)


def _before_training(name: str, resume: bool) -> str:
    kept = f"the checkpoint of {name!r} is kept as it was: run again with --resume" if resume else \
        "nothing was learned or saved"
    return f"stopped before the training began: {kept}"


def _stop_before_training_if_asked(stop: StopFlag, name: str, resume: bool) -> None:
    """Interrupted (by SIGTERM: Terminated), with nothing saved, where `stop()` turned
    true while the models loaded: a Cancel, or a signal that a library swallowed."""
    if stop():
        if stop.terminated is not None:
            raise stopped_by(stop.terminated, _before_training(name, resume))
        raise Interrupted(_before_training(name, resume))


def _scene_or_nothing(path: Path) -> bool:
    """Whether `path` holds a scene (which --force may replace) or nothing."""
    return not os.path.lexists(path) or is_scene(path)


@contextlib.contextmanager
def _out_of_memory_in_one_line(plan, device: Device):
    """The device running out of memory inside: OutOfMemory's one line naming the fix."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:  # (torch.OutOfMemoryError is a RuntimeError)
        if not is_out_of_memory(exc):
            raise
        if device.type != "cpu" and (isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)):
            # The machine's RAM, not the GPU's: the GPU hints would not help.
            raise OutOfMemory(f"the machine ran out of RAM (not {device.name}, which had room): close other programs, "
                              "then run the same command again (with --resume, from its last checkpoint)") from None
        raise OutOfMemory(f"out of memory on {device.name}: {out_of_memory_hint(plan, device)}") from None


def out_of_memory_hint(plan, device: Device) -> str:
    """What to try after running out of memory under `plan`, the next step first. Only
    --memory continues with --resume; tuning, quantisation and resolution are part of
    what a checkpoint was made with, so changing them starts over."""
    elsewhere = ", or --device cpu" if device.type != "cpu" else ""
    if plan.policy != "low":
        return f"try --memory low (with --resume to continue){elsewhere}"
    if plan.tune != "lora":
        return f"try --tune lora, or a smaller --resolution (either starts over){elsewhere}"
    if plan.quantize == "none" and device.type == "cuda":
        return f"try --quantize nf4, or a smaller --resolution (either starts over){elsewhere}"
    return f"try a smaller --resolution (it starts over){elsewhere}"


def _make_room_for_deferred(components, plan, device: Device, amp_dtype) -> None:
    """Before the deferred text encoders load (FLUX's T5): where the frozen denoiser goes
    to a CUDA GPU as it is (LoRA over a base kept in half precision), it goes now,
    quantised first where the plan says (the move packs it), so that the host never
    holds it and T5 at once: FLUX's transformer is 24 GB in bf16, T5 9.5 GB, and a
    24 GB card often sits in a 32 GB machine. Elsewhere nothing moves early."""
    import torch

    if device.type != "cuda" or plan.tune != "lora" or not plan.half_frozen:
        return
    if plan.quantize != "none":
        from ..families.quantized import quantize_denoiser

        quantize_denoiser(components, plan.quantize, amp_dtype or torch.float32)
    with _out_of_memory_in_one_line(plan, device):
        components.denoiser.to(device.torch)


def _train(trainer, checkpoints: Checkpoints, stop: StopFlag, device: Device, report: Reporter) -> None:
    """Every step of both phases, with progress, checkpoints, and a stop on a NaN loss.
    A phase's bar shows from its start (its first step may compile for minutes)."""
    totals = {1: trainer.config.steps1, 2: trainer.config.steps2}

    def starting(phase: int, step: int) -> None:
        if phase in totals and step < totals[phase]:
            if trainer.config.compile:
                report(Message(f"phase {phase}: compiling its step first (a minute or two the first time; kept for "
                               "the next run)"))
            report(Progress(f"phase {phase}", step, totals[phase]))

    starting(*((trainer.phase, trainer.step) if trainer.step < totals.get(trainer.phase, 0) else (trainer.phase + 1, 0)))
    steps = trainer.run()
    try:
        for record in _report_progress(steps, device, report):
            checkpoints.after_step(trainer, record, stop, report)
            if record.phase == 1 and record.step == record.total:
                starting(2, 0)
    finally:
        # Closed here, not when collected: a second Ctrl-C while the trainer cleans up
        # (it puts the attention processors back) then propagates and ends in one line,
        # instead of in Python's "Exception ignored in <generator>" traceback.
        steps.close()
    trainer.check_finite()


def _check_output(out: Path, *, force: bool, resume: bool) -> None:
    """Where the scene goes: a writable folder, a file name the file system takes, and
    nothing there that is not a scene unless asked to replace one."""
    check_file_name_fits(out)
    if out.is_dir():
        raise InvalidInput(f"{out} is a folder: -o takes the path of the .scene file to write")
    if out.exists() and not force and not resume:
        raise InvalidInput(f"{out} already exists: pass --force to replace it, or --name to choose another name")
    if out.exists() and (force or resume) and not is_scene(out):
        raise InvalidInput(f"{out} is not a scene: only a scene is ever replaced; choose another -o")
    # The cache first: learn writes its checkpoints there wherever the scene goes (-o), so
    # an unwritable cache is the one fix to name.
    if not is_writable_folder(home()):
        raise SceneBreakError(f"the cache folder {home()} is not writable: set SCENEBREAK_HOME to a folder you can write to")
    if not is_writable_folder(out.parent):
        raise InvalidInput(f"cannot write the scene to {out.parent}: choose a writable folder with -o")


def _check_room(model_dir: Path, config: LearnConfig, out: Path) -> str:
    """Room for the scene, a phase-2 checkpoint and the class images, sized from the
    base model's weight files before any of it loads (at the upper bound: every class
    image still to make, the optimizer's states in fp32). `--tune auto` is settled only
    once the model has loaded (the memory plan): until then the room asked for is the
    family's usual tuning's (FLUX.1: LoRA), else LoRA's, and learn asks again if auto
    chooses full tuning (FLUX.1's would have asked for some 220 GiB it never uses).
    Returns the tuning checked for."""
    from ..estimates import checkpoint_bytes, scene_bytes
    from ..families.base_model import parameter_counts
    from ..paths import checkpoints_dir, class_images_dir

    from ..families import detect_family

    family = detect_family(model_dir, f"the base model {model_dir}")
    if config.tune == "auto":
        config = dataclasses.replace(config, tune=family.default_tune or "lora")
    counts = parameter_counts(model_dir, family)
    resolution = config.resolution or 768
    png = resolution * resolution * 3 // 2  # a class image PNG, roughly
    # A checkpoint replaced every N steps is there twice for a moment (the new beside the old).
    checkpoints = 2 if config.checkpoint_every else 1
    check_room([(out.parent, scene_bytes(counts, config)),
                (checkpoints_dir(), checkpoints * checkpoint_bytes(counts, config)),
                (class_images_dir(), config.num_class_images * png if config.prior else 0)],
               fix="free some space, or point SCENEBREAK_HOME and -o to a bigger disk")
    return config.tune


def _unsaved(exc: OSError, out: Path, checkpoints: Checkpoints, finished: bool) -> SceneBreakError:
    """The scene could not be written: say why, and how to finish with as little
    training again as the checkpoint kept allows (`finished`: it holds the end of
    training; a short run's last one is from earlier, and said so)."""
    why = NO_SPACE.get(exc.errno, exc.strerror or str(exc))
    if not checkpoints.path.exists():
        kept = "nothing could be kept"
    elif finished:
        kept = (f"the trained model is kept in {checkpoints.path}: fix that and run the same command with --resume to "
                "write the scene")
    else:
        kept = (f"the run's last checkpoint is kept in {checkpoints.path}: fix that and run the same command with "
                "--resume to train on from it and write the scene")
    error = NoSpace if exc.errno in NO_SPACE else SceneBreakError
    return error(f"could not write {out} ({why}); {kept}")


def _load_inputs(image: Path, masks: list[Path], config: LearnConfig, base_model: str, revision: str | None, resolved,
                 device: Device, amp_dtype, loaded=None, tokenizers=None):
    """The base model (its denoiser straight in half precision where the plan will keep
    it frozen there: memory.denoiser_load_dtype), the training resolution it implies,
    and the photo and masks cropped and resized to it; checked before anything is
    trained."""
    from ..families import detect_family
    from ..families.base_model import load_components, text_encoder_load_dtypes
    from .memory import denoiser_load_dtype

    family = detect_family(resolved[0], f"the base model {base_model}")
    dtype = denoiser_load_dtype(config, family, device, amp_dtype)
    # The text encoders without adapters (FLUX's T5, 9.5 GB) load after the plan, once the
    # denoiser has left the host where it goes to a GPU (_make_room_for_deferred).
    components = load_components(base_model, revision, resolved, denoiser_dtype=dtype,
                                 text_encoder_dtypes=text_encoder_load_dtypes(family, resolved[0], dtype),
                                 defer=tuple(family.adapterless_text_encoders()), tokenizers=tokenizers)
    resolution = config.resolution or components.native_resolution
    check_resolution(components.family, components.denoiser, components.vae, resolution)
    if config.lambda_attn != 0:  # (None: the family's, never 0)
        components.family.attention_layers(components.denoiser)  # the model has the loss's layers, or a clear error
    return components, resolution, prepare(image, masks, resolution, background=config.background, loaded=loaded)


def steps_left(state: dict, config: LearnConfig) -> tuple[int, int]:
    """The steps of each phase a resumed run still has to take."""
    phase, step = state.get("phase", 1), state.get("step", 0)
    return (max(0, config.steps1 - step) if phase == 1 else 0,
            config.steps2 if phase == 1 else max(0, config.steps2 - step))


def _plan(config: LearnConfig, components, device: Device, resolution: int, amp_dtype, report: Reporter,
          resumed_tuning: str | None = None, resumed_quantize: str | None = None, left: tuple[int, int] | None = None):
    """The memory plan (and the tuning), said out loud; on the CPU, with how long the run will take."""
    from .memory import choose

    plan = choose(config, components, device, resolution, amp_dtype, resumed_tuning, resumed_quantize)
    config = dataclasses.replace(config, tune=plan.tune)
    report(Message(plan.describe()))
    for warning in plan.warnings:
        report(Message(warning, "warning"))
    if device.type == "cpu":
        from ..estimates import cpu_training_estimate
        from .classimages import missing_count

        family = components.family
        missing = missing_count(components.base.fingerprint, config.class_prompt, resolution, config.num_class_images,
                                family, config.class_scheduler, plan.quantize, components.base.weights,
                                components.pipeline_options) if config.prior else 0
        class_steps = family.choose_sampler(config.class_scheduler if config.prior else None, None)[1]
        report(Message(cpu_training_estimate(components.denoiser, resolution, config, plan, missing, class_steps,
                                             bf16=amp_dtype is not None, left=left), "warning"))
    return plan


def _report_progress(records, device: Device, report: Reporter):
    """Pass the trainer's step records on, reporting progress. Reading the loss waits for
    the GPU, so on one it is read about once a second."""
    from .trainer import check_finite

    loss_read = 0.0
    for record in records:
        now = time.perf_counter()
        info = {}
        if device.type == "cpu" or record.step == record.total or now - loss_read > 1.0:
            info, loss_read = {"loss": record.loss}, now
            if not math.isfinite(info["loss"]):
                check_finite(record.losses, record.phase, record.step)
        report(Progress(f"phase {record.phase}", record.step, record.total, info))
        yield record
