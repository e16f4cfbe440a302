"""Where every benchmark leaves its figures (no torch here: the lightest benchmark
imports it too)."""

from __future__ import annotations

import json
from pathlib import Path


def save_results(folder: Path, stem: str, table: str, data) -> None:
    """A benchmark's figures as folder/stem.md (the table people read) and
    folder/stem.json (the rows, for tools); each file replaced whole."""
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in ((folder / f"{stem}.md", table.rstrip("\n") + "\n"),
                       (folder / f"{stem}.json", json.dumps(data, indent=2, default=str) + "\n")):
        part = path.with_name(path.name + ".part")
        part.write_text(text)
        part.replace(path)  # (a run stopped while writing leaves the last figures whole)
