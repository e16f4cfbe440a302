"""Wall time of `learn`, from the command to the scene written: issue 22's headline
target (400+400 steps with the class images cached in at most 60 s on an H200,
model loading and any compilation included; a second run of the same base pays only
seconds for compilation, its artifacts cached in scenebreak's cache folder).

The SD2.1-base architecture with random weights is saved as a diffusers folder, fp32
as the hub's is (tests/tinymodels.build_sd21_base; `--tiny`: the tests' tiny model).
Each run is a fresh process calling `scenebreak.learn` as the CLI does, on the bundled
example (examples/creature, its first two masks), in one scratch SCENEBREAK_HOME:

    cache         --steps1 1 --steps2 1: makes the class images (not a target row)
    plain         learn's defaults
    compile       --compile, with the compile cache empty (a fresh machine)
    compile-warm  --compile again: the compiled step comes from the cache

For each run: the wall time the parent measures around the process; when the first
step of each phase ended (start-up, imports, model load, the plan and, with
--compile, the compile happen before the first); the steady seconds per step of each
phase (from its first step's end to its last's); and the time after the last step
(writing the scene). Step ends are stamped by `learn`'s progress events, which on a
GPU read the loss about once a second (no sync otherwise): a stamp may run ahead of
the GPU by the steps queued since, at most about a second; the last step of a phase
always waits for its loss. With fewer steps than 400+400 (`--steps1/--steps2`, as the
GPU check runs it to save time), the table also extrapolates each run to 400+400 at
its steady rates.

    python benchmarks/learn_wall.py --device cuda                      # 400+400, ~8 min on an H200
    python benchmarks/learn_wall.py --device cuda --steps1 100 --steps2 100
    python benchmarks/learn_wall.py --tiny --steps1 3 --steps2 3       # the dry run on the CPU

Prints the table and saves it to benchmarks/results/learn_wall-<device>.md (and .json),
rewritten after every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

EXAMPLE = ROOT / "examples" / "creature"
RUNS = {"cache": {"steps1": 1, "steps2": 1}, "plain": {}, "compile": {"compile": True}, "compile-warm": {"compile": True}}
PAPER_STEPS = 400


def child(spec: dict) -> None:
    """One `learn` in this (fresh) process; prints one JSON line of stamps, in seconds
    after the parent launched the process."""
    launched = spec["launched"]
    from scenebreak import LearnConfig, learn
    from scenebreak.events import Progress

    imported = time.time() - launched
    marks: dict = {}

    def report(event) -> None:
        if isinstance(event, Progress) and event.task.startswith("phase"):
            now = time.time() - launched
            marks.setdefault(f"{event.task} first", now)
            marks[f"{event.task} last"] = now
            marks[f"{event.task} steps"] = event.total

    config = LearnConfig(**spec["config"])
    masks = sorted(EXAMPLE.glob("mask*.png"))[:2]
    result = learn(EXAMPLE / "img.jpg", masks, config, name=spec["name"], base_model=spec["base"],
                   device=spec["device"], force=True, report=report)
    print(json.dumps({"imported": imported, "done": time.time() - launched, "learn_seconds": result.seconds, **marks}),
          flush=True)


def run(name: str, base: Path, device: str, steps1: int, steps2: int, env: dict) -> dict:
    settings = {"steps1": steps1, "steps2": steps2, **RUNS[name]}
    spec = {"config": settings, "name": f"wall-{name}", "base": str(base), "device": device}
    print(f"run {name}: {settings} ...", file=sys.stderr, flush=True)
    started = time.time()
    spec["launched"] = started
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          stdout=subprocess.PIPE, text=True)
    wall = time.time() - started
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"run": name, "ok": False, "rc": proc.returncode, "wall_s": wall, **settings}
    return summarise({"run": name, "ok": True, "wall_s": wall, **settings}, json.loads(lines[-1]))


def summarise(row: dict, stamps: dict) -> dict:
    """A run's row from its stamps: steady seconds per step of each phase, the time after
    the last step, and the wall time at 400+400 steps at those rates."""
    row = {**row, **stamps}
    for phase in (1, 2):
        first, last, total = (stamps.get(f"phase {phase} {k}") for k in ("first", "last", "steps"))
        if first is not None and total and total > 1:
            row[f"p{phase}_s_per_step"] = (last - first) / (total - 1)
    row["after_last_step_s"] = row["wall_s"] - stamps.get("phase 2 last", row["wall_s"])
    if "p1_s_per_step" in row and "p2_s_per_step" in row:
        row["est_400_400_s"] = (row["wall_s"] + (PAPER_STEPS - row["steps1"]) * row["p1_s_per_step"]
                                + (PAPER_STEPS - row["steps2"]) * row["p2_s_per_step"])
    return row


def render(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| run | steps | wall s | imports done s | phase 1 first step ended s | phase 1 s/step | phase 2 first step ended s"
             " | phase 2 s/step | after last step s | 400+400 wall s (measured or extrapolated) |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, digits=2):
        return "–" if x is None else f"{x:.{digits}f}"

    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['run']} | {r['steps1']}+{r['steps2']} | failed (exit {r.get('rc')}) after {r['wall_s']:.1f} s |"
                         " | | | | | | |")
            continue
        estimate = None if r["run"] == "cache" else r.get("est_400_400_s")
        lines.append(f"| {r['run']} | {r['steps1']}+{r['steps2']} | {f(r['wall_s'], 1)} | {f(r.get('imported'), 1)}"
                     f" | {f(r.get('phase 1 first'), 1)} | {f(r.get('p1_s_per_step'), 3)} | {f(r.get('phase 2 first'), 1)}"
                     f" | {f(r.get('p2_s_per_step'), 3)} | {f(r.get('after_last_step_s'), 1)} | {f(estimate, 1)} |")
    return "\n".join(lines) + "\n"


def describe_machine(device: str) -> str:
    import torch

    from train_step import machine  # (the GPU's name, or the CPU's model name and threads)

    return f"{machine(device)}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of SD2.1-base (dry runs)")
    parser.add_argument("--steps1", type=int, default=PAPER_STEPS)
    parser.add_argument("--steps2", type=int, default=PAPER_STEPS)
    parser.add_argument("--runs", nargs="+", choices=list(RUNS),
                        help="default: all on CUDA; elsewhere cache and plain (learn refuses --compile off CUDA)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--jsonl", type=Path, help="also append each row here as soon as it is measured")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    from tinymodels import build_sd21_base, build_tiny_model

    runs = args.runs or (list(RUNS) if args.device.startswith("cuda") else ["cache", "plain"])
    rows: list[dict] = []
    suffix = args.device.split(":")[0] + ("-tiny" if args.tiny else "")
    out = args.results_dir / f"learn_wall-{suffix}.md"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        base = (build_tiny_model if args.tiny else build_sd21_base)(work / "base")
        print(f"base model saved in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        env = dict(os.environ, SCENEBREAK_HOME=str(work / "home"), HF_HUB_OFFLINE="1")
        model = "the tests' tiny model at 64x64" if args.tiny else "SD2.1-base architecture, random weights, fp32 folder, 512x512"
        header = (f"# `learn` wall time, {describe_machine(args.device)}\n\n{model}; learn's defaults otherwise "
                  "(prior preservation with the cached class images, union sampling, the attention loss); each run a "
                  "fresh process (benchmarks/learn_wall.py). Seconds are after the process was launched.")
        for name in runs:
            row = run(name, base, args.device, args.steps1, args.steps2, env)
            rows.append(row)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps({"part": "learn_wall", "device": args.device, **row}) + "\n")
            text = render(rows, header)
            out.write_text(text)
            out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
