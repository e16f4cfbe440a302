"""JOBS files for the batch tests (imported by them: pytest puts this folder on the path)."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import write_synthetic_scene

TINY = {"steps1": 2, "steps2": 2, "no-prior": True}
GENERATE = {"steps": 2, "seed": 3}


def write_jobs(folder: Path, jobs: list[dict]) -> Path:
    path = folder / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def three_jobs(folder: Path, tiny_model) -> Path:
    """Jobs a and c learn and generate; b asks for a base model that is not there."""
    write_synthetic_scene(folder / "in")
    learn = {**TINY, "base-model": str(tiny_model)}
    return write_jobs(folder, [
        {"photo": "in/photo.png", "masks": ["in/red.png", "in/blue.png"], "name": "a", "learn": learn,
         "prompts": ["a photo of <asset1>"], "generate": GENERATE},
        {"photo": "in/photo.png", "masks": ["in/red.png"], "name": "b", "learn": {**learn, "base-model": str(folder / "nothing")}},
        {"photo": "in/photo.png", "masks": ["in/blue.png"], "name": "c", "names": ["blue"], "learn": learn,
         "prompts": ["<blue> on a table", "<blue> in the snow"], "generate": GENERATE},
    ])


def lines(stdout: str) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, stdout.splitlines())}


def files(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}
