"""Handles as text: what a handle's name may be, finding handles in a prompt, and the
training prompt that names some of them. No torch: the command line, the scene file
and the samplers check handles without loading a model."""

from __future__ import annotations

import re

from .errors import InvalidInput

HANDLE_RE = re.compile(r"<[^<>\s]+>")  # anything that looks like a handle in a prompt


def valid_handle_token(token: str) -> bool:
    """`<NAME>` where NAME follows the scene-name rule: handle names become file names
    (`export -f embeddings` writes NAME.safetensors), so no separators and no '..'."""
    from .paths import valid_name

    return token.startswith("<") and token.endswith(">") and valid_name(token[1:-1])


def check_handle_tokens(tokens: list[str]) -> None:
    """The handles a new scene gets: valid, portable (they name exported files), distinct."""
    from .paths import not_portable

    for token in tokens:
        if not valid_handle_token(token):
            raise InvalidInput(f"invalid handle name {token!r}: use letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit")
        why = not_portable(token[1:-1])
        if why:
            raise InvalidInput(f"invalid handle name {token!r}: {why} (a handle names the files `export` writes): "
                               "choose other --names")
    seen: dict[str, str] = {}  # lowercased -> as given
    for token in tokens:
        if token in seen.values():
            raise InvalidInput(f"duplicate handle name {token}: every object needs its own name")
        if token.lower() in seen:  # CLIP's tokenizer lowercases: both would be one token
            raise InvalidInput(f"handles {seen[token.lower()]} and {token} differ only in letter case, which the "
                               "text encoder's tokenizer does not tell apart: choose other --names")
        seen[token.lower()] = token


def prompt_for(tokens: list[str]) -> str:
    """The training prompt of a set of handles, e.g. "a photo of <asset1> and <asset2>"."""
    return "a photo of " + " and ".join(tokens)


def handles_in(prompt: str) -> list[str]:
    return HANDLE_RE.findall(prompt)
