"""What differs between the transformers versions scenebreak runs on (4.49 to 5.x).

A scene written under one version must open under the other (a user upgrades, or
opens a scene someone else made), and what scenebreak writes for other tools must load
under either. What changed in transformers 5:
- CLIPTextModel's weights lost their `text_model.` prefix (4: `text_model.encoder.
  layers.0...`, 5: `encoder.layers.0...`); CLIPTextModelWithProjection kept it. 5 reads
  either; 4 left a folder saved by 5 at random weights, with a warning only. The hub's
  folders carry the prefix, and so do the folders scenebreak writes.
- Tokenizers are saved as tokenizer.json alone, which transformers 4's slow classes
  (CLIPTokenizer) cannot read; their fast twins (CLIPTokenizerFast) can. In 5 the two
  names are one class. A T5 tokenizer's config lists its 100 sentinel tokens as
  `extra_special_tokens`, a key 4 reads as a dict of named tokens (it failed).
"""

from __future__ import annotations

CLIP_TEXT_PREFIX = "text_model."


def transformers_dtype(dtype) -> dict:
    """from_pretrained's keyword for a dtype (transformers 4.56 renamed torch_dtype)."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def with_model_key_names(state: dict, model_keys) -> dict:
    """`state` (weights or LoRA adapters) with its names as the model's own
    (`model_keys`) spell them, where the two differ only by CLIPTextModel's
    `text_model.` prefix, all names alike; otherwise `state` as it is (a real mismatch
    is for the caller to refuse)."""
    model_keys = set(model_keys)
    if not state or not model_keys or set(state) == model_keys:
        return state
    prefixed = [name.startswith(CLIP_TEXT_PREFIX) for name in state]
    model_prefixed = [name.startswith(CLIP_TEXT_PREFIX) for name in model_keys]
    if all(prefixed) and not any(model_prefixed):  # written under transformers 4, read under 5
        return {name.removeprefix(CLIP_TEXT_PREFIX): value for name, value in state.items()}
    if not any(prefixed) and all(model_prefixed):  # written under 5, read under 4
        return with_hub_names(state)
    return state


def with_hub_names(state: dict) -> dict:
    """A CLIPTextModel's weights named as the hub's folders name them (with the
    `text_model.` prefix, as transformers 4 saved them): what transformers 4 and 5 both
    read, and ComfyUI's loaders, which recognise CLIP-L by
    `text_model.encoder.layers.0.mlp.fc1.weight`."""
    if not state or any(name.startswith(CLIP_TEXT_PREFIX) for name in state):
        return state
    return {CLIP_TEXT_PREFIX + name: value for name, value in state.items()}


def tokenizer_overrides(config: dict) -> dict:
    """What a tokenizer config written by transformers 5 must have instead under 4
    (none under 5): its `extra_special_tokens` list as 4's `additional_special_tokens`."""
    import transformers

    extra = config.get("extra_special_tokens")
    if int(transformers.__version__.split(".")[0]) >= 5 or not isinstance(extra, list):
        return {}
    return {"extra_special_tokens": {}, "additional_special_tokens": config.get("additional_special_tokens") or extra}


def tokenizer_class_name_for(name: str, file_names) -> str:
    """The name of the class that reads a tokenizer saved as class `name` in files named
    `file_names`: its fast twin where only tokenizer.json holds the vocabulary."""
    if "tokenizer.json" not in file_names or "vocab.json" in file_names or name.endswith("Fast"):
        return name
    return f"{name}Fast"


def tokenizer_class_for(cls, file_names) -> type:
    """The class (see tokenizer_class_name_for) that reads a saved tokenizer of class `cls`."""
    name = tokenizer_class_name_for(cls.__name__, file_names)
    if name == cls.__name__:
        return cls
    import transformers

    return getattr(transformers, name, cls)


def in_fp32() -> dict:
    """from_pretrained's keywords for weights in fp32 whatever the files hold: transformers
    5 loads a model in its files' dtype, 4 in fp32 (the helper models, SAM, the
    detectors and the scorers, then ran in fp16 under 5 and in fp32 under 4 for the same
    checkpoint; in fp16 on the CPU they fail or crawl)."""
    import torch

    return transformers_dtype(torch.float32)
