"""The JOBS file of `batch`: JSON Lines, one job a line, every line checked before any
work starts (a problem is exit 2 naming its line), the `--shard I/N` split, and each
job's key: what its results depend on, so a rerun can tell they are already there.

A job's "learn", "mask" and "generate" options take the command's long option names
(`num-class-images` or `num_class_images`; `prior: false` or `no-prior: true`) and are
checked by the same config classes, bounds and choices as the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import GenerateConfig, LearnConfig, MaskConfig, default_base_model
from ..errors import InvalidInput
from ..handles import check_handle_tokens, handles_in
from ..masks.files import PREVIEW_SUFFIX
from ..paths import check_name, is_pipe, is_regular_file, read_text_file, same_file

MAX_JOBS_FILE = 64 * 2**20  # bytes: a hundred thousand jobs and more
MAX_JOBS = 100_000
KEYS = ("photo", "masks", "objects", "name", "names", "learn", "mask", "prompts", "generate")
# What `learn` and `generate` take besides their config's fields (the device is the batch's).
LEARN_EXTRA = ("base_model", "revision")
TYPE_NAMES = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}


@dataclass(frozen=True)
class Job:
    """One line of the JOBS file, checked, with its paths made absolute."""

    number: int  # 1, 2, ...: its place among the jobs
    line: int  # its line in the file
    photo: str
    name: str
    masks: tuple[str, ...] = ()
    objects: tuple[str, ...] = ()  # words: the masks are made by `mask`
    learn: LearnConfig = LearnConfig()
    base_model: str | None = None
    revision: str | None = None
    mask: MaskConfig = MaskConfig()
    prompts: tuple[str, ...] = ()
    generate: GenerateConfig = GenerateConfig()
    raw: dict = field(default_factory=dict, compare=False)  # the line as written, for the record

    def key(self) -> str:
        """A digest of everything the job's scene and images depend on: the photo's and
        masks' bytes, the words and mask settings, the base model and every setting."""
        parts = {**self._scene_parts(), "learn": _settings(self.learn), "prompts": list(self.prompts),
                 "generate": _settings(self.generate)}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def scene_key(self) -> str:
        """A digest of what the scene alone depends on: a line whose prompts or sampling
        settings changed (or only how often it checkpoints) keeps its scene, and makes
        only its images again."""
        learn = {k: v for k, v in _settings(self.learn).items() if k != "checkpoint_every"}
        parts = {**self._scene_parts(), "learn": learn}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    def _scene_parts(self) -> dict:
        return {"photo": _digest(self.photo), "masks": [_digest(m) for m in self.masks], "objects": list(self.objects),
                "mask": _settings(self.mask) if self.objects else None, "name": self.name,
                "base": [self.base_model or default_base_model(), self.revision]}


def _digest(path: str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _settings(config) -> dict:
    return {k: v for k, v in dataclasses.asdict(config).items() if k != "device"}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N` (0 <= I < N): this run takes jobs I, I+N, I+2N, ... (counted from 0)."""
    if text is None:
        return None
    index, _, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise InvalidInput(f"--shard {text!r}: give I/N, e.g. --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidInput(f"--shard {text}: I must be from 0 to N-1 and N at least 1 (e.g. 0/4 ... 3/4)")
    return i, n


def shard_of(jobs: list[Job], shard: tuple[int, int] | None) -> list[Job]:
    if shard is None:
        return jobs
    i, n = shard
    return [job for job in jobs if (job.number - 1) % n == i]


def read_jobs(source: str | os.PathLike) -> list[Job]:
    """Every job of the JOBS file `source` ("-": stdin; relative paths are relative to
    the file's folder, or to the current one for stdin), all checked; no two jobs may
    share a scene name."""
    text = read_text_file(source, "JOBS file", MAX_JOBS_FILE)
    # (A link's folder, not its target's; stdin's and a pipe's (`<(...)`, /dev/fd/63): the current one.)
    folder = Path.cwd() if str(source) == "-" or is_pipe(Path(source)) else Path(source).absolute().parent
    source = source_name(source)
    jobs, names = [], {}
    # JSON Lines end at "\n" only: splitlines() also split inside strings at U+2028 or \f.
    for line_number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        if len(jobs) == MAX_JOBS:
            raise InvalidInput(f"JOBS file {source}: more than {MAX_JOBS} jobs; split it")
        try:
            job = _parse(line, line_number, len(jobs) + 1, folder)
        except InvalidInput as exc:
            raise InvalidInput(f"JOBS file {source}, line {line_number}: {exc}") from None
        other = names.get(job.name.lower())  # case-insensitive file systems would mix the two
        if other:
            raise InvalidInput(f"JOBS file {source}, line {line_number}: scene name {job.name!r} is also line {other}'s: "
                               'give one of them another "name"')
        names[job.name.lower()] = line_number
        jobs.append(job)
    if not jobs:
        raise InvalidInput(f"JOBS file {source} holds no job: one JSON object per line, e.g. "
                           '{"photo": "cat.jpg", "masks": ["cat.mask1.png"]}')
    return jobs


def source_name(source: str | os.PathLike) -> str:
    """The JOBS file as its messages name it."""
    return "(standard input)" if str(source) == "-" else str(source)


def check_prompts_fit(jobs: list[Job], source) -> None:
    """A handle past the text encoder's limit (77 tokens on CLIP) failed a job's images
    only after its scene was learned, hours in: checked before any job starts, on each
    base model whose tokenizers are here (a folder, or the Hugging Face cache; a base
    that is not is left to its jobs, which say what is wrong with it)."""
    import copy

    from ..errors import SceneBreakError
    from ..events import silent
    from ..families.base_model import base_tokenizers
    from ..sample.sampling import check_prompt_lengths

    bases: dict = {}
    for job in jobs:
        if not job.prompts:
            continue
        base = (job.base_model or default_base_model(), job.revision)
        if base not in bases:
            try:
                bases[base] = base_tokenizers(*base)
            except (SceneBreakError, OSError, ValueError):
                bases[base] = None
        if bases[base] is None:
            continue
        family, tokenizers = bases[base]
        tokenizer = copy.deepcopy(tokenizers[family.attention_text])  # the one whose tokens the image sees
        tokenizer.add_tokens(job.learn.handle_tokens(len(job.masks) or len(job.objects)))
        try:
            check_prompt_lengths(None, list(job.prompts), tokenizer, silent)
        except InvalidInput as exc:
            raise InvalidInput(f"JOBS file {source_name(source)}, line {job.line}: {exc}") from None


def _parse(line: str, line_number: int, number: int, folder: Path) -> Job:
    try:
        data = json.loads(line, object_pairs_hook=_one_of_each_key)
    except _TwiceGiven as exc:
        raise InvalidInput(f"{exc} is given twice in one object: keep one (JSON keeps the last without a word)") from None
    except ValueError as exc:
        raise InvalidInput(f"not JSON ({exc})") from None
    except RecursionError:  # nested deeper than Python's stack
        raise InvalidInput("not JSON a job can be (nested too deeply)") from None
    if not isinstance(data, dict):
        raise InvalidInput('a job is a JSON object, e.g. {"photo": "cat.jpg", "masks": ["cat.mask1.png"]}')
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise InvalidInput(f"unknown key {unknown[0]!r}: a job takes {', '.join(KEYS)}")
    if "photo" not in data:
        raise InvalidInput('no "photo"')
    photo = _file(folder, _text(data["photo"], "photo"), "photo")
    if ("masks" in data) == ("objects" in data):
        raise InvalidInput('give either "masks" (mask files) or "objects" (words, for `mask` to find)')
    masks = tuple(_file(folder, m, "mask") for m in _texts(data.get("masks"), "masks"))
    for mask in masks:
        if same_file(mask, photo):
            raise InvalidInput(f"mask {mask} is the photo itself, not a mask: give one mask per object")
    objects = _texts(data.get("objects"), "objects")
    count = len(masks) or len(objects)

    learn_options = dict(_options(data.get("learn"), "learn"))
    if "names" in data:
        if any(_field_name(k) == "names" for k in learn_options):
            raise InvalidInput('"names" is given twice: at the top and in "learn"; keep one')
        learn_options["names"] = data["names"]
    extra = {_field_name(k): learn_options.pop(k) for k in list(learn_options) if _field_name(k) in LEARN_EXTRA}
    learn = _config(LearnConfig, learn_options, "learn")
    try:
        learn = learn.validate(count)
    except InvalidInput as exc:
        raise InvalidInput(f"learn: {exc}") from None
    for key, value in extra.items():
        _text(value, f"learn: {key.replace('_', '-')}")
    mask = _config(MaskConfig, _options(data.get("mask"), "mask"), "mask")
    # As `mask` takes them: the environment's models where the job names none (an offline cluster).
    mask = dataclasses.replace(
        mask, detector=model_ref(folder, mask.detector) or model_ref(Path.cwd(), os.environ.get("SCENEBREAK_DETECTOR")),
        segmenter=model_ref(folder, mask.segmenter) or model_ref(Path.cwd(), os.environ.get("SCENEBREAK_SEGMENTER")))
    if "mask" in data and not objects:
        raise InvalidInput('"mask" options apply to "objects" only')
    try:
        mask.validate()
    except InvalidInput as exc:
        raise InvalidInput(f"mask: {exc}") from None

    from ..train.learn import default_name  # no torch: the name rule only

    name = check_name(_text(data["name"], "name") if "name" in data else default_name(Path(photo)), new=True)
    prompts = _texts(data.get("prompts"), "prompts", empty=True)
    handles = learn.handle_tokens(count)
    try:
        check_handle_tokens(handles)  # (learn would refuse them, after the masks were made)
    except InvalidInput as exc:
        raise InvalidInput(f"learn: {exc}") from None
    for prompt in prompts:
        for token in handles_in(prompt):
            if token not in handles:
                raise InvalidInput(f"prompt {prompt!r} names {token}, which this job does not learn ({', '.join(handles)})")
    generate = _config(GenerateConfig, _options(data.get("generate"), "generate"), "generate")
    if "generate" in data and not prompts:
        raise InvalidInput('"generate" options without "prompts": add the prompts to generate')
    try:
        generate = generate.validate()
    except InvalidInput as exc:
        raise InvalidInput(f"generate: {exc}") from None
    return Job(number, line_number, photo, name, masks, objects, learn, model_ref(folder, extra.get("base_model")),
               extra.get("revision"), mask, prompts, generate, raw=data)


def model_ref(folder: Path, ref: str | None) -> str | None:
    """A hub id as it is; a folder given relative (./models/sd, or one that is there
    below `folder`) made absolute from `folder`, as the job's photo and masks are:
    workers (Ray's on other machines) run in other folders."""
    if not ref:
        return None
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    if ref.startswith(".") or (folder / path).exists():
        return os.path.normpath(folder / path)
    return ref


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(f'"{what}" must be a non-empty string, not {json.dumps(value)}')
    return value


def _texts(value, what: str, empty: bool = False) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or (not value and not empty):
        raise InvalidInput(f'"{what}" must be a list of strings')
    return tuple(_text(v, what) for v in value)


class _TwiceGiven(Exception):
    pass


def _one_of_each_key(pairs: list) -> dict:
    """A JSON object whose keys are all different: {"photo": "a.jpg", ..., "photo": "b.jpg"}
    is refused, not read as b.jpg."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise _TwiceGiven(repr(key))
        data[key] = value
    return data


def _file(folder: Path, path: str, what: str) -> str:
    if what == "mask" and Path(path).name.endswith(PREVIEW_SUFFIX):  # (a `STEM.mask*` glob picks it up)
        raise InvalidInput(f"{path} is the preview `scenebreak mask` draws, not a mask: give the masks "
                           "(STEM.mask[0-9]*.png)")
    full = folder / Path(path).expanduser()
    if not full.exists():
        # (The folder named: the JOBS file's, or for stdin the current one.)
        raise InvalidInput(f"{what} {path} not found (relative paths start from {folder})")
    if not is_regular_file(full):
        raise InvalidInput(f"{what} {path} is not a regular file")
    return os.path.normpath(full.absolute())  # (a link stays a link: its name names the scene, as for learn)


def _options(value, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f'"{what}" must be an object of options, e.g. {{"steps1": 200}}')
    return value


def _config(config_class, options: dict, what: str):
    """`config_class` from a job's options, checked like the command line checks them:
    only the command's options (by their long names), of the right types."""
    fields = {f.name: f for f in dataclasses.fields(config_class) if f.metadata.get("cli")}
    allowed = set(fields)
    values = {}
    # A switch's "off" side by the command line's name for it (`keep-holes`: fill_holes false).
    off_names = {_field_name(flag.split("/")[1]): f.name for f in fields.values()
                 for flag in f.metadata["option"].get("flags", ()) if "/" in flag}
    for key, value in options.items():
        name = _field_name(key)
        on = off_names.get(name) or (name[3:] if name.startswith("no_") and name[3:] in fields
                                     and fields[name[3:]].default is True else None)
        if on:  # the switch's off side: `no-prior`, `keep-holes`
            if not isinstance(value, bool):
                raise InvalidInput(f"{what}: {key} takes true or false, not {json.dumps(value)}")
            name, value = on, not value
        if name not in allowed:
            extra = LEARN_EXTRA if config_class is LearnConfig else ()
            known = ", ".join(sorted(n.replace("_", "-") for n in (*allowed, *extra)))
            raise InvalidInput(f"{what}: unknown option {key!r}; {what} takes {known}")
        if name in values:
            raise InvalidInput(f"{what}: {key!r} is given twice")
        values[name] = _typed(fields[name], value, f"{what}: {key}")
    return config_class(**values)


def _field_name(key) -> str:
    """An option's config field: `num-class-images`, `--num-class-images` or `num_class_images`."""
    return str(key).lstrip("-").replace("-", "_")


def _typed(f: dataclasses.Field, value, what: str):
    """`value` as field `f` takes it, or an error naming the type it needs; bounds and
    choices are the config's validate()'s."""
    annotation = str(f.type)
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise InvalidInput(f"{what} cannot be null")
    if annotation.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidInput(f"{what} takes a list of strings, not {json.dumps(value)}")
        return tuple(value)
    kind = annotation.split("|")[0].strip()
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an integer of hundreds of digits: past any float
            raise InvalidInput(f"{what} is far too large ({str(value)[:12]}... with {len(str(value))} digits)") from None
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InvalidInput(f"{what} takes {TYPE_NAMES.get(kind, 'a string')}, not {json.dumps(value)}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise InvalidInput(f"{what} takes {', '.join(choices)}, not {json.dumps(value)}")
    return value
