"""Small records that long operations report, so any front end can draw them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union


@dataclass
class Progress:
    task: str  # "class images", "phase 1", "phase 2", "generate"
    completed: int
    total: int
    info: dict = field(default_factory=dict)  # e.g. {"loss": 0.12}


@dataclass
class Message:
    text: str
    level: str = "info"  # info | warning


Event = Union[Progress, Message]
Reporter = Callable[[Event], None]


def silent(event: Event) -> None:
    """The default reporter, where none is given: progress and notes are dropped, but a
    warning (a prompt cut at the text encoder's limit, a setting ignored, a mask that
    nearly vanishes) goes to Python's logging, logger "scenebreak": shown on stderr where
    logging is not set up (a script, a notebook), as a library's warnings are. Pass
    `report=lambda event: None` for none at all."""
    if isinstance(event, Message) and event.level == "warning":
        import logging

        logging.getLogger("scenebreak").warning(event.text)


def printable(text: str, keep_newlines: bool = False) -> str:
    """`text` as it may be shown on a terminal: every character that is not printable
    (control characters: escape sequences that move the cursor, clear the screen or
    retitle the window; C1 controls; bidirectional overrides that reorder what is
    shown) written as its Python escape (`\\x1b`), newlines too unless
    `keep_newlines`. What a scene's metadata or a file name says is a stranger's text:
    it is shown, never obeyed."""
    return "".join(ch if ch.isprintable() or (ch == "\n" and keep_newlines) else ch.encode("unicode_escape").decode()
                   for ch in text)
