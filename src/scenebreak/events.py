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
    """The default reporter: drops every event."""
