"""`learn(image, masks)`: from one photo and its masks to a `.scene` file."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .bundle import Scene, save_scene
from .config import SD21_UNET_PARAMS, LearnConfig, default_base_model
from .device import Device, choose_device
from .errors import Interrupted, InvalidInput, OutOfMemory, SceneBreakError
from .events import Message, Progress, Reporter, silent
from .images import background_mask, load_image, load_masks, prepare
from .lora import lora_settings
from .paths import check_name, checkpoint_path, scene_path, write_atomically
from .tokens import check_handle_tokens

# Seconds per step measured on a 2-core CPU (AVX512-BF16) with SD2.1-base at 512x512 and
# prior preservation (benchmarks/results/train_step-cpu.md), used to warn CPU users
# before hours of work. Keys: phase 1, or the phase-2 mode; then the precision.
CPU_SECONDS = {
    ("phase1", "fp32"): 13.1, ("phase1", "bf16"): 8.9,
    ("fast", "fp32"): 45.4, ("low", "fp32"): 49.9, ("low", "bf16"): 28.8,
    ("lora", "bf16"): 19.3, ("lora-low", "bf16"): 21.0,
}
BF16_SPEEDUP = 13.1 / 8.9  # phase 1 fp32 / bf16, for the combinations not measured
# One image-step of guided sampling (the UNet on a batch of 2), fp32: 705 s per image
# at 50 steps, generating two at a time.
CPU_SECONDS_SAMPLING_STEP = 14.1


@dataclass
class LearnResult:
    path: Path
    name: str
    handles: list[str]
    losses: dict = field(default_factory=dict)
    seconds: float = 0.0
    resumed: bool = False

    def to_dict(self) -> dict:
        return {"path": str(self.path), "name": self.name, "handles": self.handles, "losses": self.losses,
                "seconds": round(self.seconds, 2), "resumed": self.resumed}


def check_resolution(components, resolution: int) -> None:
    """The UNet halves the latent once per down block; the loss needs latent/4."""
    factor = components.vae_scale_factor * 2 ** (len(components.unet.config.down_block_types) - 1)
    factor = max(factor, components.vae_scale_factor * 4)
    if resolution < factor or resolution % factor:
        raise InvalidInput(f"--resolution {resolution} does not suit this model: use a multiple of {factor} (its native size is {components.native_resolution})")


def default_name(image: Path) -> str:
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in Path(image).stem).strip("-._")
    return stem or "scene"


def cpu_seconds_per_step(phase: str, precision: str) -> float:
    """A measured figure, or one derived from the nearest measured one: fast bf16 does
    not fit the 24 GiB machine (scaled from low by the fp32 fast/low ratio), fp32 LoRA
    runs on CPUs without bf16 (scaled by the phase-1 bf16 speed-up)."""
    if (phase, precision) in CPU_SECONDS:
        return CPU_SECONDS[(phase, precision)]
    if phase == "fast":
        return CPU_SECONDS[("low", "bf16")] * CPU_SECONDS[("fast", "fp32")] / CPU_SECONDS[("low", "fp32")]
    return CPU_SECONDS[(phase, "bf16")] * BF16_SPEEDUP


def cpu_estimate(components, resolution: int, config: LearnConfig, class_images_missing: int, bf16: bool = False) -> str:
    """A rough duration from the measured SD2.1-base figures, scaled by UNet size and
    pixel count, for the memory mode and tuning chosen. Phase 1 runs the instance alone
    either way; phase 2 without prior preservation runs a batch of one (estimated at
    0.6 of the time)."""
    from .classimages import STEPS

    precision = "bf16" if bf16 else "fp32"
    mode = ("lora-low" if config.memory == "low" else "lora") if config.tune == "lora" else config.memory
    params = sum(p.numel() for p in components.unet.parameters())
    scale = params / SD21_UNET_PARAMS * (resolution / 512) ** 2
    seconds = scale * (config.steps1 * cpu_seconds_per_step("phase1", precision)
                       + config.steps2 * cpu_seconds_per_step(mode, precision) * (1.0 if config.prior else 0.6))
    sampling = CPU_SECONDS_SAMPLING_STEP / (BF16_SPEEDUP if bf16 else 1.0)
    class_seconds = scale * class_images_missing * STEPS * sampling
    text = f"training on the CPU: expect roughly {format_duration(seconds)} for {config.steps1}+{config.steps2} steps"
    if class_seconds:
        text += f", plus {format_duration(class_seconds)} once for {class_images_missing} class images (--num-class-images or --no-prior make it shorter)"
    return text + "; a CUDA GPU takes minutes (--device cuda)"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} hours"


class StopFlag:
    """Set by the first Ctrl-C (or SIGTERM); the loop stops at the next step boundary."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


@contextlib.contextmanager
def catch_interrupts(flag: StopFlag, report: Reporter):
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        flag.requested = True
        report(Message("stopping after this step to save a checkpoint (press Ctrl-C again to abort now)", "warning"))

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# Settings that do not change the result: a resumed run may change them (e.g. add
# --gradient-checkpointing after running out of memory).
# The memory switches change at most the clipping of phase 2 (per tensor with the
# optimizer in the backward pass), and resuming with less memory is their point.
_RESUMABLE_CHANGES = ("checkpoint_every", "gradient_checkpointing", "save_dtype", "memory", "optimizer_in_backward",
                      "compile", "standalone")


def _identity(prepared, config: LearnConfig, fingerprint: str) -> dict:
    """What a checkpoint must match to be resumed: same photo, masks, settings, model."""
    masks_digest = hashlib.sha256(prepared.masks.tobytes()).hexdigest()
    settings = {k: v for k, v in config.to_dict().items() if k not in _RESUMABLE_CHANGES}
    return {"source": prepared.source_sha256, "masks": masks_digest, "config": repr(sorted(settings.items())), "base": fingerprint}


def _save_checkpoint(trainer, path: Path, identity: dict) -> None:
    import torch

    state = trainer.state_dict()
    state["identity"] = identity
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _tokenizer_files(tokenizer) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {f"tokenizer/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def _config_dict(model) -> dict:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype", "transformers_version", "_name_or_path")}


def learn(image: str | os.PathLike, masks: list[str | os.PathLike], config: LearnConfig = LearnConfig(), *,
          name: str | None = None, output: str | os.PathLike | None = None, base_model: str | None = None,
          revision: str | None = None, device: str | Device | None = None, resume: bool = False, force: bool = False,
          report: Reporter = silent, should_stop=None) -> LearnResult:
    """Learn one handle per mask from one photo and write the scene; returns where it went.

    `should_stop()` (optional) is polled after every step, like Ctrl-C: when it turns
    true a checkpoint is saved and `Interrupted` is raised; `resume=True` continues it."""
    import torch

    started = time.perf_counter()
    masks = [Path(m) for m in masks]
    # Everything that can be wrong with the input is checked before any model loads.
    config = config.validate(len(masks))
    tokens = config.handle_tokens(len(masks))
    check_handle_tokens(tokens)
    name = check_name(name or default_name(Path(output) if output else Path(image)))
    out = Path(output) if output else scene_path(name)
    if out.exists() and not force and not resume:
        raise InvalidInput(f"{out} already exists: pass --force to replace it, or --name to choose another name")
    object_masks = load_masks(masks, load_image(Path(image)).size)
    if config.background:
        background_mask(object_masks)
    device = device if isinstance(device, Device) else choose_device(device)
    device.train_dtype(config.mixed_precision)
    if config.adam_8bit:
        from .optim import BNB_HINT, bitsandbytes_available

        if device.type != "cuda":
            raise InvalidInput("--adam-8bit needs a CUDA device")
        if not bitsandbytes_available():
            raise SceneBreakError(f"--adam-8bit needs bitsandbytes: {BNB_HINT}")
    if config.tune == "lora":
        from .lora import require_peft

        require_peft()

    from .models import load_components

    components = load_components(base_model or default_base_model(), revision)
    resolution = config.resolution or components.native_resolution
    check_resolution(components, resolution)
    if config.lambda_attn > 0:
        from .attention import cross_attention_layers

        cross_attention_layers(components.unet)
    prepared = prepare(Path(image), masks, resolution, background=config.background)
    identity = _identity(prepared, config, components.base.fingerprint)
    ckpt = checkpoint_path(name)
    state = _load_checkpoint(ckpt, identity, name, report) if resume else None
    if state is None and ckpt.exists():
        report(Message(f"starting over: the checkpoint of an earlier run of {name!r} will be replaced (--resume continues it)", "warning"))
    from .memory import choose as choose_memory

    config = choose_memory(config, components, device, resolution, report)
    if device.type == "cpu":
        bf16 = device.train_dtype(config.mixed_precision) is not None
        report(Message(cpu_estimate(components, resolution, config, _missing_class_images(components, config, resolution), bf16),
                       "warning"))

    from .classimages import ensure_class_images
    from .tokens import add_handles
    from .train import Trainer, TrainInputs

    stop = StopFlag()
    stopping = lambda: stop() or bool(should_stop and should_stop())  # noqa: E731
    try:
        with catch_interrupts(stop, report):
            class_images = []
            if config.prior:
                class_images = ensure_class_images(components, device, config.class_prompt, config.num_class_images,
                                                   resolution, report=report, should_stop=stopping)
            handle_ids, _ = add_handles(components.tokenizer, components.text_encoder, tokens, config.handle_init_words())
            inputs = TrainInputs(prepared.image, torch.from_numpy(prepared.masks), handle_ids, class_images)
            trainer = Trainer(components, inputs, config, device, tokens)
            if state is not None:
                trainer.load_state_dict(state)
                del state
            loss_read = 0.0
            for record in trainer.run():
                # Reading the loss waits for the GPU: on one, about once a second.
                now = time.perf_counter()
                info = {}
                if device.type == "cpu" or record.step == record.total or now - loss_read > 1.0:
                    info, loss_read = {"loss": record.loss}, now
                report(Progress(f"phase {record.phase}", record.step, record.total, info))
                last_step = record.step == record.total and (record.phase == 2 or config.steps2 == 0)
                periodic = config.checkpoint_every and record.step % config.checkpoint_every == 0 and record.step < record.total
                phase1_done = record.phase == 1 and record.step == record.total and config.steps2 > 0
                if (stopping() and not last_step) or periodic or phase1_done:
                    _save_checkpoint(trainer, ckpt, identity)
                if stopping() and not last_step:
                    raise Interrupted("interrupted: checkpoint saved; run the same command with --resume to continue")
            # Still inside the handler: a Ctrl-C now lets the save finish (a second one
            # aborts it, and the atomic write leaves no partial file).
            meta = _scene_metadata(name, tokens, components, prepared, config, trainer, device, Path(image), masks, resolution)
            meta["seconds"] = round(time.perf_counter() - started, 2)
            save_scene(_scene(components, meta, prepared), out, config.save_dtype)
    except torch.OutOfMemoryError:
        hint = "--tune lora" if config.memory == "low" else "--memory low"
        raise OutOfMemory(f"out of memory on {device.name}: try {hint}, a smaller --resolution or --device cpu") from None
    if ckpt.exists():
        ckpt.unlink()
    return LearnResult(out, name, tokens, meta["losses"], time.perf_counter() - started, resumed=resume)


def _load_checkpoint(ckpt: Path, identity: dict, name: str, report: Reporter) -> dict:
    import torch

    if not ckpt.exists():
        raise InvalidInput(f"nothing to resume: no checkpoint for scene {name!r} (run without --resume)")
    # Memory-mapped: a phase-2 checkpoint holds the model and the optimizer state, which
    # must not sit in RAM a second time next to the live ones.
    state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
    if state.get("identity") != identity:
        raise InvalidInput(f"the checkpoint of {name!r} was made from other inputs or settings: run the same command, or drop --resume to start over")
    report(Message(f"resuming {name!r} at phase {state['phase']}, step {state['step']}"))
    return state


def _missing_class_images(components, config: LearnConfig, resolution: int) -> int:
    if not config.prior:
        return 0
    from .classimages import class_image_paths

    paths = class_image_paths(components.base.fingerprint, config.class_prompt, resolution, config.num_class_images)
    return sum(not p.exists() for p in paths)


def _scene_metadata(name, tokens, c, prepared, config, trainer, device, image: Path, masks: list[Path], resolution: int) -> dict:
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
        "crop_box": list(prepared.crop_box),
        "source": {"file": image.name, "size": list(prepared.source_size), "sha256": prepared.source_sha256,
                   "masks": [m.name for m in masks]},
        "config": config.to_dict(),
        "losses": trainer.loss_summary(),
        **({"lora": lora_settings(config.rank)} if config.tune == "lora" else {}),
        "device": device.name,
        "configs": {"unet": _config_dict(c.unet), "vae": _config_dict(c.vae), "text_encoder": _config_dict(c.text_encoder),
                    "scheduler": dict(c.scheduler_config)},
    }


def _scene(c, meta: dict, prepared) -> Scene:
    """The trained models as a self-contained scene (the handles put back into an
    ordinary embedding matrix, so other tools can load the text encoder)."""
    import numpy as np

    from .lora import lora_state_dict, merge_lora
    from .tokens import remove_handle_embedding

    handles = remove_handle_embedding(c.text_encoder)
    if meta["tuning"] == "lora" and not meta["standalone"]:
        # Only the adapters: the scene loads them onto its recorded base model.
        weights = {"unet_lora": lora_state_dict(c.unet), "text_encoder_lora": lora_state_dict(c.text_encoder)}
    else:
        if meta["tuning"] == "lora":
            merge_lora(c.unet)
            merge_lora(c.text_encoder)
        weights = {"unet": c.unet.state_dict(), "text_encoder": c.text_encoder.state_dict(), "vae": c.vae.state_dict()}
    return Scene(meta=meta, embeddings=handles, image=np.asarray(prepared.image), masks=prepared.masks, weights=weights,
                 files=_tokenizer_files(c.tokenizer))
