"""The `.scene` bundle: one safetensors file with the learned tensors and a JSON header.

Tensor names:
  handles.embeddings        (N, D) learned handle embeddings, fp32
  handles.embeddings_2      (N, D2) SDXL only: the handles' rows in the second text encoder
  source.image              (R, R, 3) uint8 training crop
  source.masks              (N, R, R) uint8 masks of the crop
  unet.* / text_encoder.* / vae.*   full weights (self-contained: no base model needed); the
                                    denoiser's component is named by its family (unet)
  unet_lora.* / text_encoder_lora.* LoRA adapters instead (`--tune lora`): the base model is needed
  text_encoder_2.* / text_encoder_2_lora.*  SDXL's second text encoder, the same way
  file.tokenizer/NAME       uint8 bytes of each tokenizer file (handles included)
  file.tokenizer_2/NAME     SDXL's second tokenizer
Metadata: {"format": "scenebreak.scene", "scenebreak": "<JSON>"}; the JSON holds
format_version, versions, base model, handles, resolution, configs, losses...

Format 2 added SDXL (the `_2` entries), format 3 FLUX.1 (its denoiser is `transformer`,
its second text encoder T5). Each scene is written in the oldest format that holds it
(SD 1.x/2.x: 1, SDXL: 2), so an older scenebreak keeps reading what it can.

This module owns that format: writing it, and reading it as a stranger's file
(train/assemble.py makes a scene from a finished training run).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..arguments import path_argument
from ..config import MAX_HANDLES, MAX_LORA_RANK, MAX_RESOLUTION
from ..errors import BundleError, InvalidInput
from ..families.versions import tokenizer_class_for, tokenizer_overrides
from ..paths import (SCENE_SUFFIX, in_a_private_folder, is_regular_file, resolve_scene, scenes_dir, text_path,
                     write_atomically, write_new_file)

FORMAT = "scenebreak.scene"
FORMAT_VERSION = 4  # the newest this version reads and writes
PROFILE_FORMAT = 4  # the format that added the photo's colour profile (source.icc_profile)
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
# The tokenizer files a scene may hold: what transformers' tokenizers write (5.x writes
# the first two). A scene is a stranger's file: no other name is ever written anywhere.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
# Bounds on what a scene may ask of the machine: more than any real scene needs (the
# handles and the LoRA rank are bounded where learn takes them, in config.py).
MAX_STRING = 4096  # characters of any one string in the metadata
MAX_METADATA = 2**20  # characters of the whole JSON metadata (a real scene's: some 10-40 thousand)
MAX_LORA_TARGETS = 64  # module names per LoRA target list (real ones: 4 to 12)
MAX_TOKENIZER_FILE = 2**24  # bytes of one tokenizer file (real ones: up to some 3 MB)
MAX_ICC_PROFILE = 2**22  # bytes of the photo's colour profile (a phone's Display P3: under 1 KB; a printer's: MBs)


@dataclass
class Handle:
    token: str  # "<asset1>"
    mask_index: int  # zero-based position in the --masks list (the background's comes last)
    background: bool = False  # learned from the complement of the object masks

    @property
    def name(self) -> str:
        return self.token.strip("<>")


@dataclass
class Scene:
    """A learned scene. `weights` is empty until loaded with `weights=True`."""

    meta: dict
    embeddings: "torch.Tensor"  # noqa: F821 - (N, D): the handles' rows in the (first) text encoder
    image: np.ndarray  # (R, R, 3) uint8
    masks: np.ndarray  # (N, R, R) uint8
    weights: dict = field(default_factory=dict)  # component -> state dict
    files: dict = field(default_factory=dict)  # "tokenizer/vocab.json" -> bytes
    path: Path | None = None
    embeddings_2: "torch.Tensor | None" = None  # noqa: F821 - SDXL: (N, D2) in the second text encoder
    stamp: tuple | None = None  # the file's identity when read (stat_stamp): a later read must find the same file
    icc_profile: bytes | None = None  # the photo's RGB colour profile (its numbers are used as they are), if it had one

    def __repr__(self) -> str:
        # What a notebook shows when a cell ends with the scene: the dataclass's own repr
        # printed its tokenizer files' bytes and every weight (megabytes).
        return (f"Scene(name={self.name!r}, family={self.family.name!r}, handles={self.tokens!r}, "
                f"resolution={self.resolution}, weights={'loaded' if self.weights else 'not loaded'}, path={self.path!r})")

    @property
    def family(self):
        """The base model's family (families.Family); scenes from before SDXL are SD 1.x/2.x."""
        return _family(self.meta)

    @property
    def handle_embeddings(self) -> list:
        """The handles' rows in each text encoder, in the family's order."""
        return [self.embeddings] if self.embeddings_2 is None else [self.embeddings, self.embeddings_2]

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "scene")

    @property
    def handles(self) -> list[Handle]:
        return [Handle(h["token"], h["mask_index"], bool(h.get("background"))) for h in self.meta["handles"]]

    @property
    def tokens(self) -> list[str]:
        return [h.token for h in self.handles]

    @property
    def object_tokens(self) -> list[str]:
        return [h.token for h in self.handles if not h.background]

    @property
    def background_token(self) -> str | None:
        return next((h.token for h in self.handles if h.background), None)

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def needs_base_model(self) -> bool:
        """A LoRA scene holds adapters only: it generates on top of its base model."""
        return self.meta.get("tuning") == "lora" and not self.meta.get("standalone", True)

    @property
    def stored_dtype(self):
        """The torch dtype the scene's weights are stored in (`learn --save-dtype`)."""
        import torch

        return torch.float16 if self.meta.get("weights_dtype", "fp16") == "fp16" else torch.float32

    @property
    def weight_components(self) -> tuple[str, ...]:
        """Full weights (the scene generates on its own), or for a LoRA scene the
        adapters for its recorded base model: the denoiser's and those of each text
        encoder that has LoRA targets (FLUX's T5 has none)."""
        encoders = self.family.text_encoders
        if self.needs_base_model:
            from ..families.lora import text_encoder_targets

            adapted = [name for name in encoders if text_encoder_targets(self.meta["lora"], name)]
            return (f"{self.family.denoiser}_lora", *(f"{name}_lora" for name in adapted))
        return (self.family.denoiser, *encoders, "vae")


def embedding_keys(family) -> list[str]:
    """The tensor of the handles' rows in each text encoder of `family`, first to last."""
    return ["handles.embeddings" + (f"_{i + 1}" if i else "") for i in range(len(family.text_encoders))]


def _family(meta: dict):
    from ..families import family_named

    return family_named(meta.get("base_model", {}).get("family", ""), meta.get("prediction_type", "epsilon"))


def save_scene(scene: Scene, path: Path, save_dtype: str = "fp16", replace: bool = True) -> Path:
    """Write atomically: a temp file next to `path`, renamed over it when complete; with
    `replace` False, a file already at `path` is kept and the scene takes the first free
    name numbered -1, -2, ... (paths.write_new_file). Returns where it went."""
    import torch
    from safetensors.torch import save_file

    from ..arguments import flag_argument, path_argument
    from ..config import SAVE_DTYPES

    if not isinstance(scene, Scene):
        raise InvalidInput(f"save_scene takes a Scene (load_scene(..., weights=True)), not {type(scene).__name__}")
    path, replace = path_argument(path, "path"), flag_argument(replace, "replace")
    if save_dtype not in SAVE_DTYPES:
        raise InvalidInput(f"save_dtype must be {' or '.join(map(repr, SAVE_DTYPES))}, not {save_dtype!r}")
    missing = [c for c in scene.weight_components if not (scene.weights or {}).get(c)]
    if missing:  # (it wrote a scene that then failed in generate: "holds no unet ... weights")
        raise InvalidInput(f"scene {scene.name!r} was opened without its weights ({', '.join(missing)}): open it with "
                           "load_scene(..., weights=True) to save it")
    dtype = torch.float16 if save_dtype == "fp16" else torch.float32
    tensors = {
        "handles.embeddings": scene.embeddings.detach().float().cpu().contiguous(),
        "source.image": torch.from_numpy(np.array(scene.image, dtype=np.uint8)),
        "source.masks": torch.from_numpy(np.array(scene.masks, dtype=np.uint8)),
    }
    if scene.embeddings_2 is not None:
        tensors["handles.embeddings_2"] = scene.embeddings_2.detach().float().cpu().contiguous()
    if scene.icc_profile:  # (format 4: an older version refuses the tensor, so it is told to upgrade instead)
        tensors["source.icc_profile"] = torch.frombuffer(bytearray(scene.icc_profile), dtype=torch.uint8).clone()
    tied: dict[str, dict[str, str]] = {}
    for component, state in scene.weights.items():
        first: dict[tuple, str] = {}
        for key, value in state.items():
            # A weight tied to another (T5's shared table is its encoder's embed_tokens:
            # half a gigabyte in T5-XXL) is stored once; reading ties it again.
            where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()),
                     value.dtype, value.device)
            if value.numel() and where in first:
                tied.setdefault(component, {})[key] = first[where]
                continue
            first[where] = key
            value = value.detach().cpu()
            # The token-embedding tables (CLIP's, T5's) stay at full precision, so
            # ordinary words keep exactly their base-model values.
            if value.is_floating_point() and not is_token_table(key):
                value = value.to(dtype)
            tensors[f"{component}.{key}"] = value.contiguous().clone()
    for name, data in scene.files.items():
        tensors[f"file.{name}"] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone() if data else torch.zeros(0, dtype=torch.uint8)
    # Format 2 only where it is needed (SDXL): SD scenes stay readable by older versions.
    meta = {key: value for key, value in scene.meta.items() if key != "tied"}  # (this file's ties, not a read one's)
    version = max(scene.family.scene_format, PROFILE_FORMAT if scene.icc_profile else 0)
    meta = dict(meta, format_version=version, weights_dtype=save_dtype, **({"tied": tied} if tied else {}))
    write = write_atomically if replace else write_new_file
    path = write(Path(path), in_a_private_folder(Path(path), lambda tmp: save_file(
        tensors, str(tmp), metadata={"format": FORMAT, "scenebreak": json.dumps(meta)})))
    scene.path = path
    return path


TOKEN_TABLES = ("token_embedding.weight", "shared.weight", "embed_tokens.weight")  # CLIP's; T5's (tied)


def is_token_table(key: str) -> bool:
    """Whether a text encoder's state-dict key is its table of token embeddings."""
    return key.endswith(TOKEN_TABLES)


def is_scene(path: Path) -> bool:
    """Whether `path` is a regular file that reads as a scene (read_metadata's checks)."""
    try:
        read_metadata(path)
    except BundleError:
        return False
    return True


def read_metadata(path: Path) -> dict:
    """The scene's JSON metadata, checked; reads no tensor data."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"scene not found: {path} (see `scenebreak list`)")
    if not is_regular_file(path):  # a FIFO or a device would block or never end
        raise BundleError(f"{path} is not a scene file (not a regular file)")
    from safetensors import safe_open

    try:
        with text_path(path) as name, safe_open(name, framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
    except Exception as exc:  # safetensors raises several types for damaged files
        raise BundleError(f"{path} is not a readable .scene file (truncated or corrupt: {str(exc).splitlines()[0][:120]})") from None
    if header.get("format") != FORMAT or "scenebreak" not in header:
        raise BundleError(f"{path} is not a scenebreak scene (a safetensors file of another kind)")
    if len(header["scenebreak"]) > MAX_METADATA:  # parsing it would cost memory and time the file chooses
        raise BundleError(f"{path} is not a valid scene: its metadata has {len(header['scenebreak'])} characters "
                          f"(at most {MAX_METADATA})")
    try:
        meta = json.loads(header["scenebreak"], parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
        raise BundleError(f"{path} has damaged scenebreak metadata") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{path} has damaged scenebreak metadata")
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{path} has no valid format version")
    if version > FORMAT_VERSION:
        raise BundleError(f"{path} was written by a newer scenebreak (format {version}; this one reads up to {FORMAT_VERSION}): upgrade scenebreak")
    problem = metadata_problem(meta)
    if problem:
        raise BundleError(f"{path} is not a valid scene: {problem}")
    for key in (*embedding_keys(_family(meta)), "source.image", "source.masks"):
        if key not in keys:
            raise BundleError(f"{path} is incomplete: tensor {key!r} is missing")
    problem = _stray_tensor(meta, keys) or _family_mismatch(meta)
    if problem:
        raise BundleError(f"{path} is not a valid scene: {problem}")
    return meta


def _no_constant(name: str):
    """JSON's NaN and Infinity, which Python reads but no scene writes (a NaN LoRA alpha
    would sample black images): refused as damaged metadata."""
    raise ValueError(f"{name} is not a number a scene holds")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refusing one past float's range (1e400 reads as inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is not a number a scene holds")
    return value


def _family_mismatch(meta: dict) -> str | None:
    """The recorded family against the family the recorded configs build."""
    from ..families import family_named, family_of_configs

    configs, family = meta.get("configs"), _family(meta)
    built = family_of_configs(configs) if configs else None
    if configs and (built is None or type(family_named(built)) is not type(family)):
        return f"its model configs build {built or 'no model scenebreak knows'}, but the scene says {family.name}"
    return None


def _stray_tensor(meta: dict, keys: set[str]) -> str | None:
    """A tensor this scene's family and tuning do not have (e.g. an SDXL scene's second
    encoder in a scene that says SD 2.x), or None."""
    components = Scene(meta=meta, embeddings=None, image=None, masks=None).weight_components
    fixed = {*embedding_keys(_family(meta)), "source.image", "source.masks",
             *(["source.icc_profile"] if meta.get("format_version", 0) >= PROFILE_FORMAT else [])}
    for key in sorted(keys):
        if key.startswith("file.") and not is_tokenizer_entry(key[5:]):
            return f"it holds a file entry {key[5:65]!r}, which no scene has"
        if key in fixed or key.startswith("file.") or key.partition(".")[0] in components:
            continue
        family, tuning = _family(meta).name, "LoRA" if meta.get("tuning") == "lora" and not meta.get("standalone", True) else "full"
        return f"it holds a tensor {key[:60]!r}, which a {family} scene of {tuning} weights does not have"
    return None


def metadata_problem(meta: dict) -> str | None:
    """What makes this metadata unsafe or unusable, or None. Every value that names a
    file or sizes work is checked: names follow the scene-name rule, sizes have bounds."""
    from ..paths import valid_name
    from ..handles import valid_handle_token

    too_long = _long_string(meta)
    if too_long:
        return too_long
    handles, base, resolution = meta.get("handles"), meta.get("base_model"), meta.get("resolution")
    if not isinstance(handles, list) or not handles or not all(isinstance(h, dict) and "token" in h and "mask_index" in h for h in handles):
        return "its handles are missing or damaged"
    if len(handles) > MAX_HANDLES:
        return f"{len(handles)} handles (at most {MAX_HANDLES})"
    tokens = [h["token"] for h in handles]
    for h in handles:
        if not isinstance(h["token"], str) or not valid_handle_token(h["token"]):
            return f"handle {str(h['token'])[:40]!r} is not a valid handle name"
        if not isinstance(h["mask_index"], int) or isinstance(h["mask_index"], bool) or not 0 <= h["mask_index"] < len(handles):
            return f"handle {h['token']} has no valid mask index"
    if len(set(tokens)) != len(tokens):
        return "two handles have the same name"
    if len({t.lower() for t in tokens}) != len(tokens):  # CLIP's tokenizer lowercases: one token for both
        return "two handles differ only in letter case"
    if len({h["mask_index"] for h in handles}) != len(handles):
        return "two handles have the same mask index"
    backgrounds = sum(bool(h.get("background")) for h in handles)
    if backgrounds > 1 or backgrounds == len(handles):  # learn makes at most one, beside at least one object
        return "its handles are damaged (a scene has one or more objects and at most one background)"
    if not isinstance(base, dict) or not isinstance(base.get("id"), str) or not base.get("id") or not base.get("fingerprint"):
        return "its base model is missing or damaged"
    if not all(base.get(key) is None or isinstance(base[key], str)
               for key in ("revision", "commit", "fingerprint", "family", "config_fingerprint", "weights")):
        return "its base model is damaged"
    from ..families import SUPPORTED

    family = base.get("family", "")
    if family and family not in SUPPORTED:
        return f"its base model family {str(family)[:40]!r} is not one scenebreak knows ({', '.join(SUPPORTED)})"
    if meta.get("format_version", 0) < _family(meta).scene_format:
        return f"its family {_family(meta).name} needs format {_family(meta).scene_format}"
    if not isinstance(resolution, int) or isinstance(resolution, bool) or not 8 <= resolution <= MAX_RESOLUTION or resolution % 8:
        return f"resolution {str(resolution)[:20]} is not a multiple of 8 between 8 and {MAX_RESOLUTION}"
    name = meta.get("name")
    if name is not None and (not isinstance(name, str) or not valid_name(name)):
        return f"its name {str(name)[:40]!r} is not a valid scene name"
    lora = meta.get("lora")
    if lora is None and Scene(meta=meta, embeddings=None, image=None, masks=None).needs_base_model:
        return "it holds LoRA weights but no LoRA settings"
    if lora is not None:
        rank = lora.get("rank") if isinstance(lora, dict) else None
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_LORA_RANK:
            return f"its LoRA rank is not between 1 and {MAX_LORA_RANK}"
        alpha = lora.get("alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha <= 1e6:
            return "its LoRA alpha is not a positive number"
        for key in ("unet_targets", "text_encoder_targets"):  # (the same targets in every text encoder)
            targets = lora.get(key)
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
                return f"its LoRA {key} are damaged"
        for name in _family(meta).text_encoders:  # an encoder's own targets, where it differs ([]: none)
            targets = lora.get(f"{name}_targets", [])
            if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
                return f"its LoRA {name}_targets are damaged"
        if any(isinstance(value, list) and len(value) > MAX_LORA_TARGETS for value in lora.values()):
            return f"a LoRA target list of more than {MAX_LORA_TARGETS} modules"
    configs = meta.get("configs")
    needed = (_family(meta).denoiser, "vae", "scheduler", *_family(meta).text_encoders)
    if configs is not None and not (isinstance(configs, dict) and all(isinstance(configs.get(k), dict) for k in needed)
                                    and all(isinstance(c, dict) for c in configs.values())):
        return "its model configs are damaged"
    if configs is None:  # (every scene records them: its sampler is made from them)
        return "it holds no model configs"
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or len(tied) > 8 or not all(
            isinstance(c, str) and isinstance(a, dict) and len(a) <= 8
            and all(isinstance(k, str) and isinstance(v, str) and k != v for k, v in a.items())
            for c, a in tied.items()):
        return "its tied weights are damaged"
    return _config_problem(configs)


# Config values that size a model, bounded so that a crafted scene cannot make
# scenebreak build a giant one (even without memory, on the meta device, a model of
# millions of layers takes hours to build). Real SD, SDXL and FLUX are far inside.
_CONFIG_LIMITS = {"layers_per_block": 8, "transformer_layers_per_block": 16,
                  "reverse_transformer_layers_per_block": 16}
_CONFIG_LAYERS = 64  # any other count of layers ("num_layers", "num_hidden_layers", "num_single_layers", ...)
_CONFIG_INT = 2**17  # channels, widths, vocabularies, positions
_CONFIG_LIST = 8  # blocks


def _config_problem(configs: dict) -> str | None:
    """Every number of a config, at any depth of its lists and dicts (diffusers takes
    `transformer_layers_per_block` as a list of lists), within its key's bound; the
    VAE's latent scale a positive number (0 made every image black, text failed after
    all the sampling) and its shift a number or nothing."""
    vae = configs["vae"]
    for key, positive in (("scaling_factor", True), ("shift_factor", False)):
        value = vae.get(key)
        if key not in vae or (value is None and not positive):  # (absent: diffusers' default)
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or \
                (positive and value <= 0):
            return f"its vae config's {key} is {str(value)[:40]!r}, not a{' positive' if positive else ''} number"
    for component, config in configs.items():
        for key, value in config.items():
            limit = _CONFIG_LIMITS.get(key, _CONFIG_LAYERS if "layers" in key else _CONFIG_INT)
            problem = _config_value_problem(component, key, value, limit)
            if problem:
                return problem
    return None


def _config_value_problem(component: str, key: str, value, limit: int, depth: int = 0) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and not -_CONFIG_INT <= value <= limit:
        return f"its {component} config's {key} is {value} (at most {limit})"
    if isinstance(value, list) and len(value) > _CONFIG_LIST and component != "scheduler":  # (betas may be listed)
        return f"its {component} config's {key} lists {len(value)} values (at most {_CONFIG_LIST})"
    for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
        problem = _config_value_problem(component, key, item, limit, depth + 1)
        if problem:
            return problem
    return None


def _long_string(value, depth: int = 0) -> str | None:
    if depth > 12:
        return "its metadata is nested too deeply"
    if isinstance(value, str):
        return f"a metadata string of {len(value)} characters (at most {MAX_STRING})" if len(value) > MAX_STRING else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = _long_string(key, depth + 1) if isinstance(key, str) else None
        problem = problem or _long_string(item, depth + 1)
        if problem:
            return problem
    return None


_FLOAT_KINDS = ("F32", "F16", "BF16")  # safetensors' names of the float dtypes a scene stores


def _check_header(path: Path, meta: dict, tensors: dict[str, tuple[tuple, str]]) -> None:
    """The tensors other than the model weights (their (shape, dtype) from the file's
    header) agree with the metadata, before any is read: the handles' rows one per
    handle, as wide as their text encoder's, in a float dtype; the image and masks at
    the scene's resolution, 8-bit; file entries tokenizer files of bounded size."""
    n, r = len(meta["handles"]), meta["resolution"]
    family = _family(meta)

    def fail(why: str):
        raise BundleError(f"{path} is not a valid scene: {why}")

    for key, encoder in zip(embedding_keys(family), family.text_encoders):
        shape, kind = tensors[key]
        config = meta["configs"][encoder]
        width = config.get("hidden_size", config.get("d_model"))
        if len(shape) != 2 or shape[0] != n or (isinstance(width, int) and shape[1] != width):
            fail(f"{n} handles of {encoder} width {width} but embeddings of shape {shape}")
        if kind not in _FLOAT_KINDS:
            fail(f"its handle embeddings are {kind}, not floats")
    if tensors["source.image"] != ((r, r, 3), "U8") or tensors["source.masks"] != ((n, r, r), "U8"):
        fail(f"its image or masks are not 8-bit at resolution {r} for {n} handles")
    profile = tensors.get("source.icc_profile")
    if profile is not None and (len(profile[0]) != 1 or profile[1] != "U8" or profile[0][0] > MAX_ICC_PROFILE):
        fail(f"its colour profile is not bytes, or more than {MAX_ICC_PROFILE} of them")
    for key, (shape, kind) in tensors.items():
        if not key.startswith("file."):
            continue
        if len(shape) != 1 or kind != "U8":
            fail(f"its file entry {key[5:65]!r} is not bytes")
        if shape[0] > MAX_TOKENIZER_FILE:  # a vocabulary of millions would size the text encoder's table
            fail(f"its {key[5:]} has {shape[0]} bytes (at most {MAX_TOKENIZER_FILE})")


def _check_tensors(path: Path, meta: dict, embeddings, image, masks, files: dict, embeddings_2=None) -> None:
    """What the header cannot tell: the handles' rows are finite (a NaN row samples
    black images, and exports as one)."""
    import torch

    for rows in (embeddings, embeddings_2):
        if rows is not None and not bool(torch.isfinite(rows.float()).all()):
            raise BundleError(f"{path} is not a valid scene: its handle embeddings are not finite numbers")


def is_tokenizer_entry(name: str) -> bool:
    """Whether a `file.*` entry name is one of the tokenizer files a scene may hold."""
    folder, _, base = name.partition("/")
    return folder in TOKENIZER_FOLDERS and base in TOKENIZER_FILES


def load_scene(ref, weights: bool = False, device="cpu") -> Scene:
    """Open a scene by path or cached name; `weights=True` also loads the model weights,
    read from the memory-mapped file straight onto `device` (no copy in RAM for a GPU)."""
    from safetensors import safe_open

    path = resolve_scene(path_argument(ref, "a scene (its path, or a cached scene's name)"))
    if weights:  # (a device that is not there, or a Device, was blamed on the file: "not a readable .scene file")
        from ..device import Device, choose_device

        device = str((device if isinstance(device, Device) else choose_device(device)).torch)
    stamp = stat_stamp(path)
    meta = read_metadata(path)
    expected = Scene(meta=meta, embeddings=None, image=None, masks=None).weight_components
    scene_weights: dict = {component: {} for component in expected} if weights else {}
    files: dict = {}
    try:
        with text_path(path) as name, safe_open(name, framework="pt") as f:
            # Sizes and kinds from the header first: nothing is read that the scene could not hold.
            _check_header(path, meta, {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                                       for key in f.keys() if not key.partition(".")[0] in expected})
            # Copies, not views of the mapped file (small): a Scene kept in a notebook kept
            # the file mapped, which on Windows cannot then be replaced (learn --force) or
            # deleted (rm).
            embeddings = f.get_tensor("handles.embeddings").clone()
            embeddings_2 = f.get_tensor("handles.embeddings_2").clone() if "handles.embeddings_2" in f.keys() else None
            image = f.get_tensor("source.image").numpy().copy()
            masks = f.get_tensor("source.masks").numpy().copy()
            icc_profile = f.get_tensor("source.icc_profile").numpy().tobytes() if "source.icc_profile" in f.keys() \
                else None
            for key in f.keys():
                if key.startswith("file."):
                    files[key[5:]] = f.get_tensor(key).numpy().tobytes()
        if weights:
            with text_path(path) as name, safe_open(name, framework="pt", device=device) as f:
                for key in f.keys():
                    component, _, name = key.partition(".")
                    if component in scene_weights:
                        scene_weights[component][name] = f.get_tensor(key)
            for component, aliases in meta.get("tied", {}).items():
                for alias, source in aliases.items():
                    stored = scene_weights.get(component, {})
                    if source not in stored or alias in stored or alias in aliases.values():
                        raise BundleError(f"{path} is not a valid scene: its tied weights name weights it does not "
                                          "hold, or hold twice")
                    stored[alias] = stored[source]
    except BundleError:
        raise
    except Exception as exc:
        raise BundleError(f"{path} is not a readable .scene file ({str(exc).splitlines()[0][:120]})") from None
    if weights:
        empty = [c for c, s in scene_weights.items() if not s]
        if empty:
            raise BundleError(f"{path} holds no {', '.join(empty)} weights, so it cannot generate")
    _check_tensors(path, meta, embeddings, image, masks, files, embeddings_2)
    if stat_stamp(path) != stamp:  # replaced while being read (an atomic write of another run): parts of two scenes
        raise BundleError(f"{path} was replaced while it was being read (another learn writing it?): run again")
    return Scene(meta=meta, embeddings=embeddings, image=image, masks=masks, weights=scene_weights, files=files, path=path,
                 embeddings_2=embeddings_2, stamp=stamp, icc_profile=icc_profile or None)


def stat_stamp(path: Path) -> tuple | None:
    """Which file `path` is now (device, inode, size, modification time), or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def open_scene(scene) -> Scene:
    """A Scene as given, or loaded from its path or cache name (metadata only)."""
    return scene if isinstance(scene, Scene) else load_scene(scene)


def list_scenes() -> list[Path]:
    folder = scenes_dir()
    return sorted(folder.glob(f"*{SCENE_SUFFIX}")) if folder.exists() else []


# -- the tokenizer files a scene holds ----------------------------------------------------------------

def tokenizer_files(tokenizer, folder: str = "tokenizer") -> dict[str, bytes]:
    """The tokenizer's files (handles included), as the scene stores them under `folder`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {f"{folder}/{p.name}": p.read_bytes() for p in sorted(Path(tmp).iterdir())
                if p.is_file() and p.name in TOKENIZER_FILES}


def tokenizer_from_files(files: dict[str, bytes], folder: str, family) -> object:
    """The tokenizer a scene stores under `folder`, rebuilt in a private temp folder
    (mode 0700) that only ever receives the allowed tokenizer file names, whatever the
    scene says. A scene is a stranger's file: its tokenizer is built by the family's
    own class (never the Auto classes, which follow a config's `auto_map` to custom
    code and may stop to ask whether to run it), and its length limit is the text
    encoder's, not what the files claim."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="scenebreak-tokenizer-") as tmp:
        for name, data in files.items():
            if not is_tokenizer_entry(name):
                raise BundleError(f"not a valid scene: it holds a file entry {name[:60]!r}, which no scene has")
            if name.partition("/")[0] == folder:
                if name.endswith("_config.json") or name.endswith("special_tokens_map.json"):
                    data = _without_code_references(data, name)
                (Path(tmp) / name.partition("/")[2]).write_bytes(data)
        if not any(Path(tmp).iterdir()):
            raise BundleError(f"not a valid scene: it holds no {folder} files")
        cls, max_length = family.tokenizer_class(folder)
        cls = tokenizer_class_for(cls, {p.name for p in Path(tmp).iterdir()})  # (written under another transformers)
        try:
            return cls.from_pretrained(tmp, model_max_length=max_length, local_files_only=True)
        except Exception as exc:  # tokenizers raise many types for damaged files
            raise BundleError(f"not a valid scene: its {folder} files do not load "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None


def _without_code_references(data: bytes, name: str) -> bytes:
    """A tokenizer config with nothing in it that names code to load (`auto_map`) or
    another file to read."""
    try:
        config = json.loads(data)
    except (ValueError, RecursionError):
        raise BundleError(f"not a valid scene: its {name} is not valid JSON") from None
    if not isinstance(config, dict):
        raise BundleError(f"not a valid scene: its {name} is not a JSON object")
    config.pop("auto_map", None)
    if name.endswith("tokenizer_config.json"):
        config.update(tokenizer_overrides(config))  # (written under another transformers)
    # A file name in the config (vocab_file, tokenizer_file, ...) would be read instead of
    # the folder's own files on older transformers: the tokenizer is only what the scene holds.
    for key in [key for key in config if key.endswith("_file") or key.endswith("_files")]:
        config.pop(key)
    return json.dumps(config).encode()
