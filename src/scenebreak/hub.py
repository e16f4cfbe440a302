"""Models from the Hugging Face hub or a local folder: a hub id (from the Hugging Face
cache, else downloaded) or a folder becomes a model folder, with a one-line fix-it
error when it is missing or damaged; and keeping the libraries' own chatter off
stderr. Base models are loaded in families/base_model.py, the detector and segmenter
in masks/, the scoring models in evaluation/."""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import shlex
from pathlib import Path

from .errors import InvalidInput, ModelNotAvailable
from .events import Message, Reporter

_TRANSFORMERS_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]
# Who hears that a model is being downloaded (minutes, gigabytes): the reporter of the
# command running in this thread, set by `downloads_reported`; the hub's own bars are off.
_DOWNLOADS: contextvars.ContextVar = contextvars.ContextVar("scenebreak_downloads", default=None)


@contextlib.contextmanager
def downloads_reported(report: Reporter):
    """Within the block, a model not in the Hugging Face cache is announced through
    `report` before it is downloaded."""
    token = _DOWNLOADS.set((report, set()))
    try:
        yield
    finally:
        _DOWNLOADS.reset(token)


def _announce_download(ref: str, what: str) -> None:
    listener = _DOWNLOADS.get()
    if listener is not None and ref not in listener[1]:
        listener[1].add(ref)
        listener[0](Message(f"downloading the {what} {ref} from the Hugging Face hub (once: it stays in its cache; "
                            "this can take minutes)"))


def _download_bar() -> dict:
    """snapshot_download's `tqdm_class` where a command reports its progress: a bar that
    draws nothing itself and reports what the hub counts ("download (MB)", and the
    files, "download (files)": an older hub counts only those). The hub's own bars are off (quiet_libraries):
    without this a first run's gigabytes came down with one line and nothing after it."""
    listener = _DOWNLOADS.get()
    if listener is None:
        return {}
    report = listener[0]
    from tqdm.std import tqdm

    from .events import Progress

    class ReportingBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            self.nowhere = open(os.devnull, "w")  # (drawn by the command's reporter)
            kwargs.update(disable=False, file=self.nowhere)
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            shown = super().update(n)
            if "reconstruct" in str(self.desc).lower():
                # (hf_xet's second bar of the same bytes, as it puts files together: its
                # lines came on top of the download's, each said twice.)
                return shown
            if self.total and self.unit == "B":  # (in MB: a bar of bytes counts to billions)
                report(Progress("download (MB)", int(self.n) >> 20, max(1, int(self.total) >> 20)))
            elif self.total:
                report(Progress("download (files)", int(self.n), int(self.total)))
            return shown

        def close(self):
            super().close()
            self.nowhere.close()

    return {"tqdm_class": ReportingBar}


def looks_like_path(ref: str | os.PathLike) -> bool:
    """A hub id is "name" or "owner/name"; anything else, or an existing path, is a folder."""
    if not isinstance(ref, str):  # a Path from Python is a folder, whatever it looks like
        return True
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref or Path(ref).exists()


def hub_snapshot(ref: str, revision: str | None, allow_patterns: list[str], what: str = "base model",
                 option: str = "--base-model", folder: str = "a/diffusers/folder", download: bool = True) -> tuple[Path, str]:
    """The local snapshot folder of a hub model and its commit: from the Hugging Face
    cache when it is there, else downloaded (unless `download` is False); a one-line
    fix-it error when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                         RepositoryNotFoundError)

    hint = dict(what=what, option=option, folder=folder)
    # Named files (not patterns) must all be there: a snapshot folder in the cache may
    # hold only some of them (e.g. the configs fetched to check a model's family).
    exact = [p for p in allow_patterns if not any(ch in p for ch in "*?[")]
    try:
        # The cache first: no network round trip when the weights are already here.
        path = snapshot_download(ref, revision=revision, allow_patterns=allow_patterns, local_files_only=True)
        missing = [p for p in exact if not in_snapshot(Path(path), p)]
        if missing:
            raise LocalEntryNotFoundError(f"{missing[0]} is not in the cache")
    except (LocalEntryNotFoundError, OSError, ValueError, HfHubHTTPError):
        if offline_variable():
            raise ModelNotAvailable(_missing_message(ref, revision, offline=True, **hint)) from None
        if not download:
            raise ModelNotAvailable(f"{what} {ref!r} is not in the Hugging Face cache, and a scene's word alone does "
                                    f"not download a model (it could name any model, of any size): pass {option} "
                                    f"{shlex.quote(ref)} to download it, or {option} /path/to/{folder}") from None
        _announce_download(ref, what)
        try:
            path = snapshot_download(ref, revision=revision, allow_patterns=allow_patterns, **_download_bar())
        except Exception as exc:  # every hub failure becomes the same actionable message
            if isinstance(exc, GatedRepoError):  # (FLUX.1-dev is: the terms are accepted once, on the model's page)
                raise ModelNotAvailable(f"{what} {ref!r} is gated on the Hugging Face hub: accept its terms at "
                                        f"https://huggingface.co/{ref} while logged in, then run `hf auth login` here "
                                        f"(or set HF_TOKEN), or pass {option} /path/to/{folder}") from None
            if type(exc) is RepositoryNotFoundError:  # (the hub answered: no such model, or not for you)
                raise InvalidInput(f"{what} {ref!r} is not on the Hugging Face hub (a typo? a private or gated model "
                                   f"needs `hf auth login` first), or pass {option} /path/to/{folder}") from None
            raise ModelNotAvailable(_missing_message(ref, revision, reason=exc, **hint)) from exc
        missing = [p for p in exact if not in_snapshot(Path(path), p)]
        if missing:  # (e.g. only .bin weights, or only an fp16 variant's)
            # (Or the hub could not be reached, and the download library fell back to the
            # part of a snapshot the cache holds, silently: said too.)
            raise InvalidInput(f"{what} {ref!r} has no {missing[0]} (nor its shards), on the hub or in the part of "
                               "it the Hugging Face cache holds: scenebreak reads a diffusers folder with safetensors "
                               f"weights; choose another model or convert it, or, if a download was cut short, run "
                               f"`hf download {shlex.quote(ref)}` where the hub can be reached")
    path = Path(path)
    return path, path.name


def in_snapshot(folder: Path, name: str) -> bool:
    """Whether the named file is in `folder`; a safetensors weights file also counts as
    there as its shards (the index beside it naming them, all present), and an index is
    needed only where the weights are sharded."""
    if (folder / name).exists() or name.endswith(".safetensors.index.json"):
        return True
    index = folder / f"{name}.index.json"
    if not name.endswith(".safetensors") or not index.is_file():
        return False
    try:
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return bool(shards) and all(isinstance(s, str) and (index.parent / s).is_file() for s in shards)


def offline_variable() -> str | None:
    """The variable that tells the hub libraries to stay offline, where one is set."""
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(name, "").lower() in ("1", "true", "yes", "on")), None)


def _missing_message(base_model: str, revision: str | None, offline: bool = False, reason: Exception | None = None,
                     what: str = "base model", option: str = "--base-model", folder: str = "a/diffusers/folder") -> str:
    rev = f" --revision {shlex.quote(revision)}" if revision else ""
    variable = offline_variable()
    why = f"{variable} is set and it is not in the Hugging Face cache" if offline else (
        f"it is not in the Hugging Face cache and could not be downloaded ({type(reason).__name__})"
    )
    unset = f" (or unset {variable})" if variable else ""
    return (
        f"{what} {base_model!r} is not available: {why}. Fix: on a connected machine run "
        f"`hf download {shlex.quote(base_model)}{rev}`{unset}, or pass {option} /path/to/{folder}"
    )


# What a tokenizer loads its vocabulary from: the fast tokenizer's file, or the slow one's
# (CLIP's BPE: vocab.json and merges.txt; BERT's WordPiece: vocab.txt; SentencePiece: *.model).
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("vocab.txt",))
NO_VOCABULARY = "holds no tokenizer vocabulary (tokenizer.json, or vocab.json and merges.txt, vocab.txt or a *.model)"


def has_vocabulary(folder: Path) -> bool:
    """Whether `folder` holds a vocabulary a tokenizer loads from. Without one,
    transformers builds a tokenizer of a few special tokens from its config alone,
    silently: every word is then unknown (a partly downloaded or copied model)."""
    folder = Path(folder)
    return (any(all((folder / name).is_file() for name in names) for names in TOKENIZER_FILES)
            or any(path.is_file() for path in folder.glob("*.model")))


def incomplete_download(ref: str, what: str, option: str, problem: str, folder: str) -> ModelNotAvailable:
    """The error for a model in the Hugging Face cache that lacks a part (an interrupted
    download, a cache pruned by hand)."""
    return ModelNotAvailable(f"{what} {ref!r} in the Hugging Face cache is incomplete: {problem}. Fix: run "
                             f"`hf download {shlex.quote(ref)}` again, or pass {option} /path/to/{folder}")


def transformers_model_folder(ref: str, what: str, option: str) -> Path:
    """The folder of a transformers model given as a hub id or a local folder; `what`
    and `option` (e.g. "segmenter", "--segmenter") name it in errors."""
    if looks_like_path(ref):
        ref = os.fspath(ref)
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            raise InvalidInput(f"{what} folder {folder} not found or not a transformers model folder (no config.json)")
        return folder
    folder = hub_snapshot(ref, None, _TRANSFORMERS_HUB_FILES, what=what, option=option, folder="a/model/folder")[0]
    if not any(folder.glob("*.safetensors")):
        # Some helper models publish PyTorch weights alone (facebook/dino-vits16, the
        # default identity model): take those (transformers reads them with torch's
        # weights-only loader, which runs no code from the file).
        folder = hub_snapshot(ref, None, [*_TRANSFORMERS_HUB_FILES, "pytorch_model.bin"], what=what, option=option,
                              folder="a/model/folder")[0]
    return folder


def transformers_model_of_kind(ref: str, what: str, option: str, kinds: tuple[str, ...], wanted: str,
                               tokenizer: bool = False) -> tuple[Path, str]:
    """The folder (as `transformers_model_folder`) and `model_type` of a transformers
    model that must be one of `kinds`; another kind is bad input, and the error ends
    with `wanted` (what to use instead). `tokenizer`: the model reads text, so its
    folder must hold a vocabulary."""
    folder = transformers_model_folder(ref, what, option)
    kind = model_type(folder)
    if kind not in kinds:
        raise InvalidInput(f"{option} {ref} is {f'a {kind} model' if kind else 'not a model of a known kind'}: {wanted}")
    if tokenizer and not has_vocabulary(folder):
        if looks_like_path(ref):
            raise InvalidInput(f"{what} folder {folder} {NO_VOCABULARY}")
        raise incomplete_download(ref, what, option, f"it {NO_VOCABULARY}", "a/model/folder")
    return folder, kind


def model_load_failure(what: str, ref: str, folder: Path, option: str, exc: Exception,
                       example: str = "/path/to/a/model/folder") -> ModelNotAvailable:
    """The error for a model folder that is there but does not load (one line): `what`
    from `ref` (a hub id or a path) in `folder`, and the fix, `option` with `example`."""
    again = "copy the model there again" if looks_like_path(ref) else f"download it again (`hf download {shlex.quote(ref)}`)"
    why = " ".join(str(exc).split()).rstrip(". ")
    return ModelNotAvailable(f"cannot load the {what} from {folder}: {why}. Fix: {again} or pass {option} {example}")


@contextlib.contextmanager
def loading_model(what: str, ref: str, folder: Path, option: str, example: str = "/path/to/a/model/folder"):
    """Around the loading of a model folder (transformers' or diffusers'): what a damaged
    one raises becomes model_load_failure's one line naming it and the fix. That is
    unreadable or malformed files (OSError, ValueError), safetensors' own error for a
    garbled or cut-short weights file, which is neither, and the RuntimeError
    transformers raises for weights of other sizes than config.json says (another
    model's config)."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:  # (json.JSONDecodeError is a ValueError)
        raise model_load_failure(what, ref, folder, option, exc, example) from exc
    except RuntimeError as exc:
        if not _is_size_mismatch(exc):
            raise
        why = ValueError("its weights do not fit its config.json (tensors of other sizes: a config from another model?)")
        raise model_load_failure(what, ref, folder, option, why, example) from exc


def _is_size_mismatch(exc: BaseException) -> bool:
    """transformers' (and torch's load_state_dict's) error for weights whose shapes are
    not the model's."""
    text = str(exc)
    return "ignore_mismatched_sizes" in text or "size mismatch" in text


def check_models_available(models: list[tuple[str, str, str]]) -> None:
    """Fail before loading anything, naming every missing model in one line (a first
    offline run would otherwise learn about them one at a time). `models` holds
    (ref, what, option) for `transformers_model_folder`."""
    missing = []
    for ref, what, option in models:
        try:
            transformers_model_folder(ref, what, option)
        except ModelNotAvailable as exc:
            missing.append((ref, what, exc))
    if len(missing) > 1:
        also = "; ".join(f"the {what} {ref!r} is missing too (`hf download {shlex.quote(ref)}`)" for ref, what, _ in missing[1:])
        raise ModelNotAvailable(f"{missing[0][2]}; {also}")
    if missing:
        raise missing[0][2]


def model_type(folder: Path) -> str:
    """The `model_type` in a transformers folder's config.json ("" when unreadable)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, ValueError):
        return ""


def quiet_bitsandbytes() -> None:
    """bitsandbytes, which diffusers and peft import whenever it is installed, warns at
    import on CPUs with bf16 instructions that it could not fetch an optional kernel from
    the hub (always, offline), and LLM.int8() at every product whose input is not fp16
    (under bf16 autocast: all of them, its documented cast): neither is news. Nor is the
    note of `kernels`, which fetches that kernel for it, that offline it skips checking
    the kernel's publisher. Set before anything imports them."""
    import logging

    for name in ("bitsandbytes", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_library_logging_from_the_start() -> None:
    """The command line's: transformers' and diffusers' logging at errors only from their
    import on (their own settings, read once then), so that what they log before
    `quiet_libraries` runs (a tokenizer's note on a long prompt, FLUX's image processors
    without torchvision) stays off stderr too. Not for the library: the environment is
    the caller's, and its children's."""
    for variable in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(variable, "error")
    quiet_bitsandbytes()


_LIBRARIES_IMPORTED = False  # (then no thread need wait for another's model load to use them)


def _library_logging():
    global _LIBRARIES_IMPORTED
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    _LIBRARIES_IMPORTED = True
    return diffusers_logging, transformers_logging


def quiet_libraries() -> None:
    """Keep diffusers/transformers/hub chatter (load bars, notices) off our stderr."""
    import warnings

    quiet_bitsandbytes()  # first: importing diffusers below may import it
    from .kept import one_builder_at_a_time

    # (Their first import, by two threads at once, hands one of them a half-made module:
    # "cannot import name 'DDIMScheduler' from 'diffusers'". Imported whole here, by one.)
    diffusers_logging, transformers_logging = (_library_logging() if _LIBRARIES_IMPORTED
                                               else one_builder_at_a_time(_library_logging)())

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    # torch's note that an RMS norm under bf16 autocast (T5's, FLUX's) runs unfused: harmless.
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    # transformers 4's SamProcessor passing its own `point_pad_value` to its image processor,
    # which ignores it (fixed in 5): noise, nothing the user did.
    warnings.filterwarnings("ignore", message="The following named arguments are not valid for `SamImageProcessor")
