"""Arguments given from Python, checked where they come in: a path, a list of them (one
alone counts as a list of one, not its letters), a list of texts, a config of the right
kind. Anything else is one InvalidInput naming the argument, not a TypeError from
pathlib or an AttributeError from deep inside (the command line cannot give these)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import InvalidInput


def _kind(value) -> str:
    return "None" if value is None else type(value).__name__


def path_argument(value, what: str) -> Path:
    """`value` (a str or a path-like) as a Path."""
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, bytes):
        return Path(value)
    raise InvalidInput(f"{what} must be a path (a str or a pathlib.Path), not {_kind(value)}")


def _many(value) -> bool:
    """A list, a tuple or another iterable of items (a glob's generator), not one text or a dict."""
    return isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))


def path_arguments(value, what: str) -> list[Path]:
    """One path, or a list (or any iterable) of them, as a list of Paths."""
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    if _many(value):
        return [path_argument(item, f"each of {what}") for item in value]
    raise InvalidInput(f"{what} must be a path or a list of paths, not {_kind(value)}")


def text_arguments(value, what: str, allow_none: bool = False) -> list[str]:
    """One text, or a list (or any iterable) of them, as a list (None: empty, where allowed)."""
    if value is None and allow_none:
        return []
    if isinstance(value, str):
        return [value]
    if _many(value):
        texts = list(value)
        if all(isinstance(item, str) for item in texts):
            return texts
    raise InvalidInput(f"{what} must be a text or a list of texts, not {_kind(value)}")


def flag_argument(value, what: str) -> bool:
    """A yes-or-no keyword: True or False (1 or 0), not any value Python finds true
    (`force="no"` replaced a scene)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise InvalidInput(f"{what} must be True or False, not {_kind(value)} {str(value)[:40]!r}")


def function_argument(value, what: str):
    """A callback (`report`, `should_stop`), or None."""
    if value is None or callable(value):
        return value
    raise InvalidInput(f"{what} must be a function (or None), not {_kind(value)}")


def model_argument(value, what: str) -> str | None:
    """A hub id or a folder (a str or a path-like), as text; None stays None."""
    if value is None:
        return None
    return os.fspath(path_argument(value, what)) if not isinstance(value, str) else value


def config_argument(value, kind: type, default: type | None = None):
    """`value`, a config of `kind` (or of a kind derived from it), or `default()` (else
    `kind()`) for None."""
    if value is None:
        return (default or kind)()
    if isinstance(value, kind):
        return value
    raise InvalidInput(f"config must be a scenebreak.{(default or kind).__name__}, not {_kind(value)}")
