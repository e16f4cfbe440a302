"""Model loading: a hub id (from the Hugging Face cache, else downloaded) or a local folder
becomes a model folder, with a one-line fix-it error when it is missing. The base Stable
Diffusion is loaded from its folder here; the detector and segmenter from theirs in
detector.py and segmenter.py."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidInput, ModelNotAvailable

# A transformers model (detector, segmenter): configs, tokenizer files and safetensors weights.
_TRANSFORMERS_HUB_FILES = ["*.json", "*.txt", "*.model", "*.safetensors"]


@dataclass
class BaseModel:
    """Who the base model is: recorded in every scene."""

    id: str
    revision: str | None
    commit: str | None  # the hub snapshot actually used
    fingerprint: str  # sha256 of the configs and the token-embedding matrix
    family: str = ""  # "SD 1.x" | "SD 2.x" | "SDXL" (families.py)

    def to_dict(self) -> dict:
        return dict(id=self.id, revision=self.revision, commit=self.commit, fingerprint=self.fingerprint, family=self.family)


@dataclass
class Components:
    """A base model's parts, in fp32 on the CPU. SD 1.x/2.x have one text encoder and
    tokenizer, SDXL two (`family.text_encoders` names them)."""

    unet: object
    vae: object
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    base: BaseModel
    family: "Family" = None  # noqa: F821 - families.Family

    def __post_init__(self):
        if self.family is None:
            from .families import family_named

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
        return [self.unet, self.vae, *self.text_encoders]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    def noise_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler_config)


def looks_like_path(ref: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else, or an existing path, is a folder."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or "\\" in ref or Path(ref).exists()


def resolve_model_dir(base_model: str, revision: str | None = None) -> tuple[Path, str | None]:
    """A local folder holding the diffusers layout, and the hub commit if any. The
    model's family is checked from its config files first: a model scenebreak cannot
    train is refused before its weights are loaded or downloaded."""
    from .families import CONFIG_FILES, detect_family

    if looks_like_path(base_model):
        folder = Path(base_model).expanduser()
        if not folder.is_dir():
            raise InvalidInput(f"base model folder not found: {folder}")
        family = detect_family(folder, f"the base model {folder}")
        for part in ("unet", *family.text_encoders, *family.tokenizers):
            if not (folder / part).is_dir():
                raise InvalidInput(f"{folder} is not a diffusers {family.name} folder (no {part}/)")
        return folder, None
    configs, _ = hub_snapshot(base_model, revision, CONFIG_FILES)
    family = detect_family(configs, f"the base model {base_model}")
    # Only what scenebreak uses: no root checkpoints, no fp16/ema variants, no .bin twins.
    return hub_snapshot(base_model, revision, list(family.hub_files))


WEIGHT_FILES = {"unet": "unet/diffusion_pytorch_model.safetensors", "text_encoder": "text_encoder/model.safetensors",
                "text_encoder_2": "text_encoder_2/model.safetensors", "vae": "vae/diffusion_pytorch_model.safetensors"}


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters of each component, read from the safetensors headers alone (no weight
    is loaded): enough to size what a run will write before it starts. A component
    whose file is missing or unreadable counts 0 (loading it will say what is wrong),
    as does SD 1.x/2.x's absent second text encoder."""
    from safetensors import safe_open

    counts = {}
    for name, relative in WEIGHT_FILES.items():
        total = 0
        try:
            with safe_open(str(Path(folder) / relative), framework="pt") as f:
                for key in f.keys():
                    size = 1
                    for dim in f.get_slice(key).get_shape():
                        size *= dim
                    total += size
        except Exception:  # safetensors raises several types for missing or damaged files
            total = 0
        counts[name] = total
    return counts


def hub_snapshot(ref: str, revision: str | None, allow_patterns: list[str], what: str = "base model",
                 option: str = "--base-model", folder: str = "a/diffusers/folder") -> tuple[Path, str]:
    """The local snapshot folder of a hub model and its commit: from the Hugging Face
    cache when it is there, else downloaded; a one-line fix-it error when neither works."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hint = dict(what=what, option=option, folder=folder)
    # Named files (not patterns) must all be there: a snapshot folder in the cache may
    # hold only some of them (e.g. the configs fetched to check a model's family).
    exact = [p for p in allow_patterns if not any(ch in p for ch in "*?[")]
    try:
        # The cache first: no network round trip when the weights are already here.
        path = snapshot_download(ref, revision=revision, allow_patterns=allow_patterns, local_files_only=True)
        missing = [p for p in exact if not (Path(path) / p).exists()]
        if missing:
            raise LocalEntryNotFoundError(f"{missing[0]} is not in the cache")
    except (LocalEntryNotFoundError, OSError, ValueError, HfHubHTTPError):
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
            raise ModelNotAvailable(_missing_message(ref, revision, offline=True, **hint)) from None
        try:
            path = snapshot_download(ref, revision=revision, allow_patterns=allow_patterns)
        except Exception as exc:  # every hub failure becomes the same actionable message
            raise ModelNotAvailable(_missing_message(ref, revision, reason=exc, **hint)) from exc
    path = Path(path)
    return path, path.name


def _missing_message(base_model: str, revision: str | None, offline: bool = False, reason: Exception | None = None,
                     what: str = "base model", option: str = "--base-model", folder: str = "a/diffusers/folder") -> str:
    rev = f" --revision {shlex.quote(revision)}" if revision else ""
    why = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if offline else (
        f"it is not in the Hugging Face cache and could not be downloaded ({type(reason).__name__})"
    )
    return (
        f"{what} {base_model!r} is not available: {why}. Fix: on a connected machine run "
        f"`hf download {shlex.quote(base_model)}{rev}` (or unset HF_HUB_OFFLINE), or pass {option} /path/to/{folder}"
    )


def transformers_model_folder(ref: str, what: str, option: str) -> Path:
    """The folder of a transformers model given as a hub id or a local folder; `what`
    and `option` (e.g. "segmenter", "--segmenter") name it in errors."""
    if looks_like_path(ref):
        folder = Path(ref).expanduser()
        if not (folder / "config.json").is_file():
            raise InvalidInput(f"{what} folder {folder} not found or not a transformers model folder (no config.json)")
        return folder
    return hub_snapshot(ref, None, _TRANSFORMERS_HUB_FILES, what=what, option=option, folder="a/model/folder")[0]


def transformers_model_of_kind(ref: str, what: str, option: str, kinds: tuple[str, ...], wanted: str) -> tuple[Path, str]:
    """The folder (as `transformers_model_folder`) and `model_type` of a transformers
    model that must be one of `kinds`; another kind is bad input, and the error ends
    with `wanted` (what to use instead)."""
    folder = transformers_model_folder(ref, what, option)
    kind = model_type(folder)
    if kind not in kinds:
        raise InvalidInput(f"{option} {ref} is {f'a {kind} model' if kind else 'not a model of a known kind'}: {wanted}")
    return folder, kind


def model_load_failure(what: str, ref: str, folder: Path, option: str, exc: Exception) -> ModelNotAvailable:
    """The error for a transformers model folder that is there but does not load (one line)."""
    again = "copy the model there again" if looks_like_path(ref) else f"download it again (`hf download {shlex.quote(ref)}`)"
    return ModelNotAvailable(f"cannot load the {what} from {folder}: {' '.join(str(exc).split())}. Fix: {again} "
                             f"or pass {option} /path/to/a/model/folder")


def load_errors() -> tuple[type[Exception], ...]:
    """What loading a damaged transformers model folder raises: unreadable or malformed
    files (OSError, ValueError), and safetensors' own error for a garbled or cut-short
    weights file, which is neither."""
    from safetensors import SafetensorError

    return (OSError, ValueError, SafetensorError)


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
        return json.loads((folder / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        return ""


def fingerprint(unet, vae, *text_encoders) -> str:
    """A content hash that tells base models apart without reading every weight (for
    SD 1.x/2.x exactly what it was before SDXL: scenes keep matching their base)."""
    digest = hashlib.sha256()
    for model in (unet, vae, *text_encoders):
        config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype")}
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for text_encoder in text_encoders:
        embedding = text_encoder.get_input_embeddings().weight.detach()
        digest.update(embedding.float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def quiet_libraries() -> None:
    """Keep diffusers/transformers/hub chatter (load bars, notices) off our stderr."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for logging in (diffusers_logging, transformers_logging):
        logging.set_verbosity_error()
        logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")


def load_components(base_model: str, revision: str | None = None,
                    resolved: tuple[Path, str | None] | None = None) -> Components:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler config in fp32 on the
    CPU; `resolved` is what resolve_model_dir already returned for them, if it was called."""
    quiet_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from .families import detect_family, pool_at_end_of_text

    folder, commit = resolved or resolve_model_dir(base_model, revision)
    family = detect_family(folder, f"the base model {base_model}")
    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        vae = AutoencoderKL.from_pretrained(folder / "vae")
        text_encoders = [family.text_encoder_class(name).from_pretrained(folder / name) for name in family.text_encoders]
        tokenizers = [family.tokenizer_class(name)[0].from_pretrained(folder / name) for name in family.tokenizers]
        scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ModelNotAvailable(
            f"cannot load the base model from {folder}: {exc}. Fix: download it again "
            f"(`hf download {shlex.quote(base_model)}`) or pass --base-model /path/to/a/diffusers/folder"
        ) from exc
    for model in (unet, vae, *text_encoders):
        model.requires_grad_(False)
        model.eval()
    base = BaseModel(
        id=base_model if commit else str(Path(base_model).expanduser().resolve()),
        revision=revision,
        commit=commit,
        fingerprint=fingerprint(unet, vae, *text_encoders),
        family=family.name,
    )
    # After the fingerprint, which stays that of the folder as it is (scenes match by it).
    for text_encoder, tokenizer in zip(text_encoders, tokenizers):
        pool_at_end_of_text(text_encoder, tokenizer)
    return Components(unet, vae, text_encoders, tokenizers, scheduler_config, base, family)
