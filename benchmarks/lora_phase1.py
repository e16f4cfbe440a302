"""Phase 1 of `--tune lora` with its adapters switched off (the trainer's way: their B
matrices are still zero, so they add nothing) against the same steps with the adapters
as peft runs them: seconds per step, SD2.1-base architecture with random weights, in
one process (train_step.py's measurement, one model build).

    python benchmarks/lora_phase1.py                      # CPU, 512x512, 2 timed steps
    python benchmarks/lora_phase1.py --device cuda --steps 10
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    import torch

    import train_step
    import scenebreak.train.trainer as trainer
    from scenebreak.device import choose_device

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model (a dry run)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()

    device = choose_device(args.device)
    source = train_step.ModelSource(args.tiny, reuse=True)
    real = trainer.Trainer._adapters_for
    rows = []
    for how, adapters_for in (("adapters off (scenebreak)", real),
                              ("adapters as peft runs them", lambda self, phase: contextlib.nullcontext())):
        trainer.Trainer._adapters_for = adapters_for
        try:
            train_step.start_row(device)
            row = train_step.measure("scenebreak LoRA", 1, args.steps, args.device, args.resolution, source)
        finally:
            trainer.Trainer._adapters_for = real
        rows.append({"how": how, **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    command = "python benchmarks/lora_phase1.py " + " ".join(sys.argv[1:])
    lines = ["# LoRA phase 1: adapters off against peft's adapters", "",
             f"- machine: {train_step.machine(args.device)}; torch {torch.__version__}; "
             f"{'the tiny model' if args.tiny else 'SD2.1-base architecture'}, random weights, "
             f"{args.resolution}x{args.resolution}; {args.steps} timed steps after the warm-up",
             f"- date: {datetime.date.today()}; command: `{command.strip()}`", "",
             "| phase 1 of `--tune lora` | precision | memory | s/step |", "|---|---|---|---|"]
    lines += [f"| {r['how']} | {r['precision']} | {r['memory']} | {r['s_per_step']:.2f} |" for r in rows]
    stem = f"lora_phase1-{device.type}" + ("-tiny" if args.tiny else "")
    train_step.save_results(args.results_dir, stem, "\n".join(lines), {"command": command, "rows": rows})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
