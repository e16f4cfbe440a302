"""Prior-preservation class images: generated once by the base model, then reused
by every scene with the same base model, prompt and resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import Interrupted
from ..events import Message, Progress, Reporter, silent
from ..paths import class_images_dir, is_regular_file, write_atomically

STEPS_TASK = "class image steps"  # the bar of their making counts sampling steps, images x steps each
MADE_BY = ".base-weights"  # in a cache folder: the weights_print of the model that made its images


def cache_folder(fingerprint: str, prompt: str, resolution: int, family, scheduler: str | None = None,
                 quantized: str = "none", weights: str = "", options: dict | None = None) -> Path:
    """The folder of the class images of this base model (fingerprint, family), prompt,
    size and sampler (default: the family's), at that sampler's usual steps and the
    family's usual guidance, made by the base as it is or `quantized` (nf4, int8), with
    the pipeline `options` its folder sets (Family.pipeline_options: an SDXL folder whose
    unconditional half is the empty prompt's, not zeros, makes other images).

    A fine-tune of the denoiser shares its base's fingerprint: the folder records the
    stored weights that made its images (`weights`, weights_print), and a model with
    others gets a folder of its own. A folder from before that record serves as before."""
    scheduler, steps = family.choose_sampler(scheduler, None)
    # DDIM 50 keeps the key it had before there was a choice, so those caches stay valid;
    # so do those of an unquantised base.
    key = [fingerprint, prompt, resolution, steps, family.guidance, scheduler]
    if quantized != "none":
        key.append(quantized)
    changed = _changed_options(family, options or {})
    if changed:  # (a folder that sets only the pipeline's defaults keeps the key it had)
        key.append(changed)
    folder = class_images_dir() / hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
    if weights and _made_by(folder) not in (None, weights):
        folder = class_images_dir() / hashlib.sha256(json.dumps([*key, weights]).encode()).hexdigest()[:16]
    return folder


def _changed_options(family, options: dict) -> dict:
    """Those of `options` that differ from the family's pipeline's own defaults."""
    import inspect

    defaults = inspect.signature(family.pipeline_class()).parameters
    return {name: value for name, value in sorted(options.items())
            if name not in defaults or defaults[name].default != value}


def claim(folder: Path, weights: str) -> None:
    """Record `weights` as the maker of the folder's images where this model makes its
    first ones: the folder is its own from then on. A folder of an earlier version's
    images (by a model nobody recorded) is left unclaimed."""
    if weights and _made_by(folder) is None and not any(usable(p) for p in folder.glob("*.png")):
        write_atomically(folder / MADE_BY, lambda tmp: Path(tmp).write_text(weights + "\n", encoding="utf-8"))


def _made_by(folder: Path) -> str | None:
    """The weights_print recorded in a cache folder, or None (none recorded, or unreadable)."""
    if not is_regular_file(folder / MADE_BY):
        return None
    try:
        return (folder / MADE_BY).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def class_image_paths(fingerprint: str, prompt: str, resolution: int, count: int, family,
                      scheduler: str | None = None, quantized: str = "none", weights: str = "",
                      options: dict | None = None) -> list[Path]:
    """Where class images 0..count-1 for this model, prompt, size and sampler live (made or not)."""
    folder = cache_folder(fingerprint, prompt, resolution, family, scheduler, quantized, weights, options)
    return [folder / f"{i:04d}.png" for i in range(count)]


def missing_count(fingerprint: str, prompt: str, resolution: int, count: int, family, scheduler: str | None = None,
                  quantized: str = "none", weights: str = "", options: dict | None = None) -> int:
    """How many of those class images still have to be made."""
    return sum(not usable(p) for p in class_image_paths(fingerprint, prompt, resolution, count, family, scheduler,
                                                        quantized, weights, options))


def usable(path: Path) -> bool:
    """A cached class image that reads as a whole PNG (an empty or cut one, as a power cut
    or a full disk can leave, is made again instead of failing every later learn)."""
    from PIL import Image

    if not is_regular_file(path):
        return False
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # Pillow raises many types for damaged files
        return False


def ensure_class_images(components, device, prompt: str, count: int, resolution: int, amp_dtype=None,
                        report: Reporter = silent, should_stop=lambda: False, batch_size: int | None = None,
                        scheduler: str | None = None, quantized: str = "none") -> list[Path]:
    """The paths of `count` class images, generating only the ones not cached yet, in
    the training's precision `amp_dtype` (None: fp32), with `scheduler` (default: the
    family's) at its usual step count. Image i is always made from seed i, so the cache
    grows consistently."""
    scheduler, _ = components.family.choose_sampler(scheduler, None)
    paths = class_image_paths(components.base.fingerprint, prompt, resolution, count, components.family, scheduler,
                              quantized, components.base.weights, components.pipeline_options)
    folder = paths[0].parent
    if all(usable(p) for p in paths):
        report(Message(f"using {count} cached class images from {folder}"))
        return paths
    from .locks import class_images_lock

    folder.mkdir(parents=True, exist_ok=True)
    waiting = lambda holder: report(Message(f"waiting for {holder}, which is making the same class images"))  # noqa: E731
    weights = components.base.weights
    with class_images_lock(folder, on_wait=waiting):
        if not weights or _made_by(folder) in (None, weights):
            missing = [i for i, p in enumerate(paths) if not usable(p)]  # another run may have made them meanwhile
            if missing:
                _make(components, device, prompt, resolution, amp_dtype, [(i, paths[i]) for i in missing], report,
                      should_stop, batch_size, scheduler)
            return paths
    # A run of another model with this fingerprint (a fine-tune of the same base) made them
    # while this one waited: this one's go into a folder of their own, as cache_folder now says.
    return ensure_class_images(components, device, prompt, count, resolution, amp_dtype, report, should_stop,
                               batch_size, scheduler, quantized)


def _make(components, device, prompt: str, resolution: int, amp_dtype, todo: list[tuple[int, Path]], report: Reporter,
          should_stop, batch_size: int | None, scheduler: str) -> None:
    """Generate class image i (from seed i) into its path, for each (i, path) in `todo`."""
    from ..sample.pipeline import images_per_pass, make_pipeline, run_in_passes, sample

    folder = todo[0][1].parent
    claim(folder, components.base.weights)
    info = folder / "info.json"
    if not info.exists():  # (for people looking into the cache; whole or absent, as every file written)
        text = json.dumps({"prompt": prompt, "resolution": resolution, "scheduler": scheduler,
                           "steps": components.family.sampler_steps(scheduler), "base_model": components.base.to_dict()},
                          indent=2)
        write_atomically(info, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    report(Message(f"generating {len(todo)} class images for {prompt!r}, {components.family.sampler_steps(scheduler)} "
                   f"steps each (once; cached in {folder})"))
    c = components
    for model in c.models():
        model.to(device.torch)
    pipe = make_pipeline(c.family, c.denoiser, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, scheduler,
                         c.pipeline_options)
    steps = c.family.sampler_steps(scheduler)
    batch = images_per_pass(device, batch_size)
    autocast = device.autocast(amp_dtype)
    total, done = len(todo) * steps, 0
    report(Progress(STEPS_TASK, 0, total))  # (the bar counts steps: images x steps each)

    def one_pass(chunk, more: bool) -> None:
        nonlocal done
        images = sample(pipe, c.family, prompt, [i for i, _ in chunk], steps=steps, guidance=c.family.guidance,
                        resolution=resolution, autocast=autocast, report=report, task=STEPS_TASK, done=done,
                        total=total)
        for (_, path), image in zip(chunk, images):
            write_atomically(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        done += len(chunk) * steps
        if should_stop() and more:
            raise Interrupted("interrupted: the class images made so far are cached; run the same command again to continue")

    run_in_passes(todo, batch, one_pass, report, "class images")
