"""Seconds `export -f a1111` spends extracting a fully tuned scene's LoRA (truncated
SVD of every carried layer's weight difference) at full size, on this machine.

The base is the SD2.1-base (or, `--sdxl`, SDXL base) architecture with random weights;
the "tuned" weights are the base plus a small random change to every weight, which
is what a fine-tune looks like to the SVD's cost (its shape, not its values, sets the
time). The share of the difference kept is printed too, but for random changes it
says nothing about real scenes (a real phase-2 change is far closer to low rank).

    python benchmarks/lora_extraction.py               # SD2.1-base, rank 64
    python benchmarks/lora_extraction.py --sdxl --rank 32

Prints a table and writes benchmarks/results/lora_extraction-<model>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdxl", action="store_true")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()

    from figures import save_results
    from train_step import random_model

    from scenebreak.exports.kohya import extract_layers, kohya_state_dict

    started = time.perf_counter()
    c, _ = random_model(sdxl=args.sdxl)
    names = ["text_encoder", "text_encoder_2"][: len(c.text_encoders)]
    base = {"unet": c.denoiser.state_dict(), **{n: te.state_dict() for n, te in zip(names, c.text_encoders)}}
    generator = torch.Generator().manual_seed(0)
    tuned = {component: {k: v + 1e-3 * v.std() * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
                         for k, v in state.items()} for component, state in base.items()}
    print(f"model built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    started = time.perf_counter()
    layers, extraction = extract_layers(tuned, base, args.rank, torch.float16)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    state = kohya_state_dict(layers, c.family, unet_config=c.denoiser.config)  # SDXL: SGM names from its layout
    convert = time.perf_counter() - started
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
    row = {"model": "SDXL base" if args.sdxl else "SD2.1-base", "rank": args.rank, "layers": extraction.layers,
           "svd_seconds": round(seconds, 1), "convert_seconds": round(convert, 1), "lora_mib": round(megabytes, 1),
           "kept": round(extraction.kept, 4), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "machine": platform.processor() or platform.machine()}
    print(json.dumps(row), file=sys.stderr)
    table = "\n".join([
        f"# LoRA extraction for `export -f a1111` ({row['model']}, rank {args.rank})",
        "",
        f"- machine: {row['machine']}, {row['threads']} threads; torch {row['torch']}; date {time.strftime('%Y-%m-%d')}",
        "- random weights plus a small random change to every weight (the time depends on the shapes only; "
        "the share kept of a random change says nothing about real scenes)",
        f"- command: `python benchmarks/lora_extraction.py{' --sdxl' if args.sdxl else ''} --rank {args.rank}`",
        "",
        "| model | rank | layers | SVD seconds | conversion seconds | LoRA file (fp16) |",
        "|---|---|---|---|---|---|",
        f"| {row['model']} | {args.rank} | {row['layers']} | {row['svd_seconds']} | {row['convert_seconds']} | "
        f"{row['lora_mib']} MiB |",
    ]) + "\n"
    save_results(args.results_dir, f"lora_extraction-{'sdxl' if args.sdxl else 'sd21'}", table, row)
    print(table)


if __name__ == "__main__":
    main()
