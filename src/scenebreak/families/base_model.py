"""A base model: finding its folder (checked for its family before any weight is
loaded or downloaded), sizing its parts from the safetensors headers alone, loading
its parts in fp32 on the CPU, and the fingerprint that tells base models apart."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidInput
from ..hub import (NO_VOCABULARY, has_vocabulary, hub_snapshot, incomplete_download, loading_model, looks_like_path,
                   quiet_libraries)
from ..kept import one_builder_at_a_time
from ..paths import is_regular_file
from .family import vae_scale
from .versions import (CLIP_TEXT_PREFIX, tokenizer_class_for, tokenizer_overrides, transformers_dtype, with_hub_names,
                       with_model_key_names)


@dataclass
class BaseModel:
    """Who the base model is: recorded in every scene."""

    id: str
    revision: str | None
    commit: str | None  # the hub snapshot actually used
    fingerprint: str  # sha256 of the configs and the token-embedding matrix
    family: str = ""  # the family's name, as families/ records it
    # The same from the config files as stored: the fingerprint above hashes the configs as
    # the installed libraries fill them in, so an upgrade that adds a field changes it.
    config_fingerprint: str = ""
    # weights_print of the weights as stored: a fine-tune of the denoiser (or a copy in
    # another precision) shares the fingerprints above, not this.
    weights: str = ""

    def to_dict(self) -> dict:
        return dict(id=self.id, revision=self.revision, commit=self.commit, fingerprint=self.fingerprint, family=self.family,
                    config_fingerprint=self.config_fingerprint, weights=self.weights)

    def other_weights(self, recorded: dict) -> bool:
        """Whether `recorded` (a scene's base model, which `matches`) was stored with other
        weights: a fine-tune of it, or a copy in another precision (unknown for scenes
        from before the print: False)."""
        theirs = recorded.get("weights")
        return bool(self.weights and theirs and theirs != self.weights)

    def matches(self, recorded: dict) -> bool:
        """Whether `recorded` (a scene's base model) is this one: by either fingerprint
        (scenes before config_fingerprint have only the first)."""
        files = recorded.get("config_fingerprint")
        return self.fingerprint == recorded.get("fingerprint") or bool(files and files == self.config_fingerprint)


@dataclass
class Components:
    """A base model's parts, in fp32 on the CPU. SD 1.x/2.x have one text encoder and
    tokenizer, SDXL two (`family.text_encoders` names them)."""

    denoiser: object  # the UNet (SD, SDXL); family.denoiser names its folder
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    base: BaseModel
    family: "Family" = None  # noqa: F821 - families.Family
    # Text encoders not loaded yet (load_components' `defer`): name -> where they load
    # from and in which dtype; until load_deferred, their place holds a weightless model
    # on the meta device (its config and sizes only).
    deferred: dict = field(default_factory=dict)
    # The pipeline settings of the folder's model_index.json that change what it makes
    # (Family.pipeline_options).
    pipeline_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.family is None:
            from . import family_named

            self.family = family_named(self.base.family, self.scheduler_config.get("prediction_type", "epsilon"))

    @property
    def text_encoder(self):
        """The first text encoder (the only one before SDXL)."""
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    def models(self) -> list:
        """Every network: UNet, VAE, then the text encoders."""
        return [self.denoiser, self.vae, *self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale(self.vae)

    @property
    def native_resolution(self) -> int:
        return self.family.native_resolution(self.denoiser, self.vae)

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type


def resolve_model_dir(base_model: str, revision: str | None = None, download: bool = True) -> tuple[Path, str | None]:
    """A local folder holding the diffusers layout, and the hub commit if any (a hub
    model not in the cache is downloaded, unless `download` is False). The model's
    family is checked from its config files first: a model scenebreak cannot train is
    refused before its weights are loaded or downloaded."""
    from . import CONFIG_FILES, detect_family

    if looks_like_path(base_model):
        folder = Path(base_model).expanduser()
        if folder.is_file() and folder.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf"):
            raise InvalidInput(f"{folder} is a single-file checkpoint: scenebreak needs a diffusers folder (convert it "
                               "with diffusers' from_single_file(...).save_pretrained(DIR), then --base-model DIR)")
        if not folder.is_dir():
            raise InvalidInput(f"base model folder not found: {folder}")
        family = detect_family(folder, f"the base model {folder}")
        for part in (family.denoiser, *family.text_encoders, *family.tokenizers):
            if not (folder / part).is_dir():
                raise InvalidInput(f"{folder} is not a diffusers {family.name} folder (no {part}/)")
        for part in family.tokenizers:
            if not has_vocabulary(folder / part):
                raise InvalidInput(f"{folder} is not a complete diffusers {family.name} folder: {part}/ "
                                   f"{NO_VOCABULARY}")
        return folder, None
    configs, _ = hub_snapshot(base_model, revision, CONFIG_FILES, download=download)
    family = detect_family(configs, f"the base model {base_model}")
    # Only what scenebreak uses: no root checkpoints, no fp16/ema variants, no .bin twins.
    folder, commit = hub_snapshot(base_model, revision, list(family.hub_files), download=download)
    for part in family.tokenizers:  # (its files are patterns, which a partial snapshot meets with none)
        if not has_vocabulary(folder / part):
            raise incomplete_download(base_model, "base model", "--base-model", f"{part}/ {NO_VOCABULARY}",
                                      "a/diffusers/folder")
    return folder, commit


def parameter_counts(folder: Path, family) -> dict[str, int]:
    """Parameters of the denoiser, the text encoders together and the VAE of a base
    model folder of `family`, read from the safetensors headers alone (no weight is
    loaded; sharded files summed): enough to size what a run will write before it
    starts. A part whose files are missing or unreadable counts 0 (loading it will say
    what is wrong)."""
    folder = Path(folder)
    parts = {"denoiser": [family.denoiser], "text_encoders": list(family.text_encoders), "vae": ["vae"]}
    return {role: sum(_header_parameters(folder / name) for name in names) for role, names in parts.items()}


# A part's own weights: one file, or its shards; not a variant's beside them
# (diffusion_pytorch_model.fp16.safetensors, .non_ema., which a full download also holds).
_WEIGHTS = re.compile(r"(model|diffusion_pytorch_model)(-\d+-of-\d+)?\.safetensors")


def weight_files(part: Path) -> list[Path]:
    """The safetensors files that hold a part's weights (what diffusers and transformers load)."""
    return sorted(p for p in part.iterdir() if _WEIGHTS.fullmatch(p.name)) if part.is_dir() else []


def load_text_encoder(cls, part: Path, **kwargs):
    """`cls.from_pretrained(part, **kwargs)`, also where the files name CLIPTextModel's
    weights as the other major version of transformers does (versions.py): transformers
    4 reads a folder saved by 5 with the weights it cannot match left at their random
    initialisation, with a warning only. Those are loaded here by the model's names."""
    import torch
    from safetensors.torch import load_file

    model, info = cls.from_pretrained(part, output_loading_info=True, **kwargs)
    missing = set(info.get("missing_keys") or ())
    files = weight_files(part)
    # (only that case: re-reading the files for any other gap would cost T5-XXL's 9 GB)
    if missing and files and all(name.startswith(CLIP_TEXT_PREFIX) for name in missing):
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        state = with_model_key_names(state, model.state_dict())
        if missing <= set(state):
            with torch.no_grad():  # (copied into each weight's own dtype)
                model.load_state_dict({name: state[name] for name in missing}, strict=False)
    return model


def name_as_on_the_hub(part: Path) -> None:
    """The weight files of a CLIPTextModel saved in folder `part` (by transformers 5)
    rewritten with the names the hub's folders use (versions.with_hub_names), so that
    transformers 4 and ComfyUI read the folder too; other models are left as they are."""
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((part / "config.json").read_text(encoding="utf-8"))
    if config.get("architectures") != ["CLIPTextModel"]:
        return
    renamed = {}
    for file in weight_files(part):
        with safe_open(str(file), framework="pt") as f:
            metadata, state = f.metadata(), {name: f.get_tensor(name) for name in f.keys()}
        hub = with_hub_names(state)
        if hub is state:
            continue
        renamed.update({old: new for old, new in zip(state, hub)})
        save_file(hub, str(file.with_suffix(".tmp")), metadata=metadata)
        # The tensors read are views of the mapped file: on Windows a file cannot be
        # replaced while mapped, so they go first.
        del state, hub
        os.replace(file.with_suffix(".tmp"), file)
    index = part / "model.safetensors.index.json"
    if renamed and index.exists():  # sharded: the index names each weight's shard
        data = json.loads(index.read_text(encoding="utf-8"))
        data["weight_map"] = {renamed.get(name, name): shard for name, shard in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


WEIGHTS_PRINT_SAMPLES = 32  # stretches of each weights file read for weights_print
WEIGHTS_PRINT_BYTES = 4096


def weights_print(folder: Path, family) -> str:
    """A print of the base model's weights as stored, read in milliseconds: each weights
    file's name and size and 32 stretches of 4 KiB spread over it. The fingerprint
    hashes the configs and the token tables, which a fine-tune of the denoiser (or of
    FLUX's transformer) shares with its base: this tells them apart, for a resume."""
    digest, read = hashlib.sha256(), 0
    for part in (family.denoiser, "vae", *family.text_encoders):
        for file in weight_files(Path(folder) / part):
            if not is_regular_file(file):  # never open a FIFO: it would block
                continue
            read += 1
            size = file.stat().st_size
            digest.update(f"{part}/{file.name}:{size}".encode())
            with open(file, "rb") as f:
                for i in range(WEIGHTS_PRINT_SAMPLES):
                    f.seek(size * i // WEIGHTS_PRINT_SAMPLES)
                    digest.update(f.read(WEIGHTS_PRINT_BYTES))
    return digest.hexdigest() if read else ""  # (no safetensors file: unknown, as before the print)


def stored_dtype(part: Path) -> str | None:
    """The dtype a part's weights are stored in ("BF16", "F16", "F32"), from its first
    safetensors file's header (no weight is read); None where it cannot be read."""
    from safetensors import safe_open

    files = weight_files(part)
    if not files or not is_regular_file(files[0]):  # never open a FIFO: it would block
        return None
    try:
        with safe_open(str(files[0]), framework="pt") as f:
            return next((f.get_slice(key).get_dtype() for key in f.keys()), None)
    except Exception:  # no file, or a damaged one: loading it will say what is wrong
        return None


def text_encoder_load_dtypes(family, folder, half) -> dict:
    """Text encoders to load in `half` (denoiser_load_dtype's) as well: those LoRA gives
    no adapters (FLUX's T5, 19 GB in fp32: only its handle rows train, in fp32 beside its
    table), where their files hold exactly that precision, so that their token table,
    which a scene's base fingerprint hashes, is the same as an fp32 load's."""
    if half is None:
        return {}
    import torch

    stored = {torch.bfloat16: "BF16", torch.float16: "F16"}.get(half)
    return {name: half for name in family.adapterless_text_encoders() if stored_dtype(folder / name) == stored}


def _header_parameters(part: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in weight_files(part):
        if not is_regular_file(file):  # never open a FIFO: it would block
            return 0
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    size = 1
                    for dim in f.get_slice(key).get_shape():
                        size *= dim
                    total += size
        except Exception:  # safetensors raises several types for missing or damaged files
            return 0
    return total


def _loading(base_model: str, folder: Path):
    """Around loading a base model's parts: a folder that is there but does not load
    (unreadable, damaged or mismatched files) is hub.loading_model's one line naming the fix."""
    return loading_model("base model", base_model, folder, "--base-model", "/path/to/a/diffusers/folder")


def fingerprint(denoiser, vae, *text_encoders, embeddings: dict | None = None) -> str:
    """A content hash that tells base models apart without reading every weight (for
    SD 1.x/2.x exactly what it was before SDXL: scenes keep matching their base).
    `embeddings` gives the token table of a text encoder not loaded yet (by position),
    as stored in its files."""
    configs = [model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
               for model in (denoiser, vae, *text_encoders)]
    return _digest(configs, text_encoders, embeddings, ("transformers_version", "dtype", "torch_dtype"))


def config_fingerprint(folder: Path, family, text_encoders: list, embeddings: dict | None = None) -> str:
    """As `fingerprint`, from the parts' config files as stored (the same whatever the
    installed libraries' defaults) and the token tables."""
    configs = []
    for part in (family.denoiser, "vae", *family.text_encoders):
        try:
            config = json.loads((Path(folder) / part / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        configs.append(config if isinstance(config, dict) else {})
    return _digest(configs, text_encoders, embeddings, ("transformers_version", "diffusers_version", "dtype", "torch_dtype"))


def _digest(configs: list[dict], text_encoders, embeddings: dict | None, ignored: tuple[str, ...]) -> str:
    """sha256 of the configs (less private and version keys) and the text encoders' token
    tables (`embeddings`: a table by position, for one not loaded yet)."""
    digest = hashlib.sha256()
    for config in configs:
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ignored}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for i, text_encoder in enumerate(text_encoders):
        embedding = (embeddings or {}).get(i)
        if embedding is None:
            embedding = text_encoder.get_input_embeddings().weight.detach()
        digest.update(embedding.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _weightless(cls, part: Path):
    """The text encoder of the folder `part` built from its config on the meta device
    (no memory, no weight read), and its token table as stored in its files (None
    where it cannot be found by name: then it is loaded as usual)."""
    import torch
    from safetensors import safe_open

    config = cls.config_class.from_pretrained(part)
    with torch.device("meta"):
        model = cls(config)
    table = model.get_input_embeddings().weight
    names = {name for name, param in model.named_parameters(remove_duplicate=False) if param is table}
    for file in weight_files(part):
        if not is_regular_file(file):  # never open a FIFO: it would block (loading says what is wrong)
            continue
        with safe_open(str(file), framework="pt") as f:
            for name in names & set(f.keys()):
                return model, f.get_tensor(name)
    return model, None


@one_builder_at_a_time
def load_deferred(components: Components, widen: bool = False) -> None:
    """Load the text encoders load_components deferred, in place: in the dtype it would
    have loaded them in, or in fp32 with `widen` (the plan tunes them, or keeps frozen
    weights in fp32), as load_components does them."""
    import torch

    from . import pool_at_end_of_text

    family = components.family
    for i, name in enumerate(family.text_encoders):
        if name not in components.deferred:
            continue
        base_model, part, dtype = components.deferred[name]
        with _loading(base_model, part.parent):
            # (fp32 named: transformers 5 loads in the files' dtype when none is given)
            model = load_text_encoder(family.text_encoder_class(name), part,
                                      **transformers_dtype(torch.float32 if widen else dtype))
        model.requires_grad_(False)
        model.eval()
        pool_at_end_of_text(model, components.tokenizers[i])
        components.text_encoders[i] = model
    components.deferred = {}


def load_tokenizers(folder: Path, family) -> list:
    """The base folder's tokenizers, one per text encoder of `family`."""
    from . import json_object

    tokenizers = []
    for name in family.tokenizers:
        cls, max_length = family.tokenizer_class(name)  # the text encoder's length, whatever the files say
        cls = tokenizer_class_for(cls, {p.name for p in (folder / name).iterdir()})  # (saved by transformers 5)
        overrides = tokenizer_overrides(json_object(folder / name / "tokenizer_config.json"))
        tokenizers.append(cls.from_pretrained(folder / name, model_max_length=max_length, **overrides))
    return tokenizers


def base_tokenizers(base_model: str, revision: str | None = None) -> tuple:
    """(family, tokenizers) of a base model that is here (a folder, or in the Hugging
    Face cache: nothing is downloaded), for checks made before it loads."""
    from . import detect_family

    folder, _ = resolve_model_dir(base_model, revision, download=False)
    family = detect_family(folder, f"the base model {base_model}")
    with _loading(base_model, folder):
        return family, load_tokenizers(folder, family)


@one_builder_at_a_time
def load_components(base_model: str, revision: str | None = None,
                    resolved: tuple[Path, str | None] | None = None, denoiser_dtype=None,
                    text_encoder_dtypes: dict | None = None, defer: tuple[str, ...] = (),
                    tokenizers: list | None = None) -> Components:
    """Load the denoiser, VAE, text encoder(s), tokenizer(s) and scheduler config in fp32
    on the CPU (the denoiser in `denoiser_dtype`, a text encoder in its entry of
    `text_encoder_dtypes`, where one is given); `resolved` is what resolve_model_dir
    already returned for them, if it was called. The text encoders named in `defer`
    wait: built without weights on the meta device (sizes and config, for a memory
    plan), the fingerprint read from their files, loaded by load_deferred (so that
    `learn` can move FLUX's transformer off the host before T5 needs the room)."""
    quiet_libraries()
    from diffusers import AutoencoderKL

    from . import detect_family, json_object, pool_at_end_of_text

    folder, commit = resolved or resolve_model_dir(base_model, revision)
    family = detect_family(folder, f"the base model {base_model}")
    with _loading(base_model, folder):
        denoiser = family.denoiser_class().from_pretrained(
            folder / family.denoiser, **({"torch_dtype": denoiser_dtype} if denoiser_dtype is not None else {}))
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        text_encoders, stored_tables, deferred = [], {}, {}
        for i, name in enumerate(family.text_encoders):
            dtype = (text_encoder_dtypes or {}).get(name)
            if name in defer:
                model, table = _weightless(family.text_encoder_class(name), folder / name)
                if table is not None:
                    text_encoders.append(model)
                    stored_tables[i], deferred[name] = table, (base_model, folder / name, dtype)
                    continue
            text_encoders.append(load_text_encoder(family.text_encoder_class(name), folder / name, **transformers_dtype(dtype)))
        tokenizers = tokenizers or load_tokenizers(folder, family)  # (`tokenizers`: the folder's, read already)
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    for model in (denoiser, vae, *text_encoders):
        model.requires_grad_(False)
        model.eval()
    base = BaseModel(
        id=base_model if commit else str(Path(base_model).expanduser().resolve()),
        revision=revision,
        commit=commit,
        fingerprint=fingerprint(denoiser, vae, *text_encoders, embeddings=stored_tables),
        family=family.name,
        config_fingerprint=config_fingerprint(folder, family, text_encoders, stored_tables),
        weights=weights_print(folder, family),
    )
    # After the fingerprint, which stays that of the folder as it is (scenes match by it).
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        pool_at_end_of_text(text_encoder, tokenizer)
    options = family.pipeline_options(json_object(folder / "model_index.json"))
    return Components(denoiser, vae, text_encoders, tokenizers, scheduler_config, base, family, deferred, options)
