"""Does the cross-attention loss do its job? A mechanics check on the tiny model.

A synthetic photo holds a red and a blue square of equal size with exact masks.
scenebreak learns it on the tiny random-initialised model (the one the tests use)
with --lambda-attn 0.01 and with 0, for several seeds, and measures how much each
handle's averaged latent/4 cross-attention map overlaps its own mask and the other
one (soft IoU: sum(min)/sum(max) of the max-normalised map and the mask).

A random model has no concepts to find, so its phase-2 learning rate is raised to
1e-4 (the paper's 2e-6 is tuned for trained SD weights and barely moves random
ones); everything else is the paper's: 400 + 400 steps, lr1 5e-4, union sampling,
flips, masked loss. Prior preservation is off (class images of a random model are
noise and only add time).

    python benchmarks/attention_iou.py [--seeds 0 1 2 3 4] [--model sdxl]

Prints a table and saves it to benchmarks/results/attention_iou.md (and .json);
`--model sdxl` runs it on the tiny SDXL instead (two text encoders, 8x VAE, 256x256:
8x8 maps too) and saves attention_iou-sdxl.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

SETTINGS = dict(steps1=400, steps2=400, lr2=1e-4, prior=False)


def run(seeds, lambdas=(0.01, 0.0), family: str = "sd") -> list[dict]:
    from conftest import write_synthetic_scene

    from scenebreak import LearnConfig, learn
    from scenebreak.diagnostics import attention_overlap
    from tinymodels import build_tiny_model, build_tiny_sdxl

    tmp = Path(tempfile.mkdtemp())
    os.environ["SCENEBREAK_HOME"] = str(tmp / "home")
    model = build_tiny_sdxl(tmp / "tiny-sdxl") if family == "sdxl" else build_tiny_model(tmp / "tiny-sd")
    image, red, blue = write_synthetic_scene(tmp / "inputs")
    rows = []
    for seed in seeds:
        for lam in lambdas:
            started = time.perf_counter()
            result = learn(image, [red, blue], LearnConfig(lambda_attn=lam, seed=seed, **SETTINGS), base_model=str(model),
                           device="cpu", name=f"s{seed}-l{lam}")
            overlap = attention_overlap(result.path, device="cpu")
            for h in overlap["handles"]:
                rows.append({"seed": seed, "lambda_attn": lam, "handle": h["handle"], "own": h["own"], "other": h["other"]})
            print(f"seed {seed} lambda {lam}: " + ", ".join(f"{h['handle']} own {h['own']:.3f} other {h['other']:.3f}"
                  for h in overlap["handles"]) + f" ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| seed | lambda_attn | handle | IoU own mask | IoU other mask | own - other |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['lambda_attn']} | {r['handle']} | {r['own']:.3f} | {r['other']:.3f} | {r['own'] - r['other']:+.3f} |")
    lines += ["", "| lambda_attn | mean own | mean other | mean own - other | handles with own > other |", "|---|---|---|---|---|"]
    for lam in sorted({r["lambda_attn"] for r in rows}, reverse=True):
        sel = [r for r in rows if r["lambda_attn"] == lam]
        own = sum(r["own"] for r in sel) / len(sel)
        other = sum(r["other"] for r in sel) / len(sel)
        wins = sum(r["own"] > r["other"] for r in sel)
        lines.append(f"| {lam} | {own:.3f} | {other:.3f} | {own - other:+.3f} | {wins}/{len(sel)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--model", choices=("sd", "sdxl"), default="sd", help="the tiny SD 2.x (default) or the tiny SDXL")
    args = parser.parse_args()
    import torch

    rows = run(args.seeds, family=args.model)
    xl = args.model == "sdxl"
    shape = "tiny SDXL, resolution 256 (8x VAE: 8x8 maps)" if xl else "resolution 64 (8x8 maps)"
    command = f"python benchmarks/attention_iou.py --seeds {' '.join(map(str, args.seeds))}" + (" --model sdxl" if xl else "")
    header = [
        f"# Attention-loss mechanics: handle attention vs. masks (tiny random {'SDXL' if xl else 'model'})",
        "",
        f"- settings: {json.dumps(SETTINGS)}; synthetic 96x80 photo, two 32x32 squares; {shape}",
        f"- torch {torch.__version__}, CPU; date {time.strftime('%Y-%m-%d')}; command: `{command}`",
        "",
    ]
    text = "\n".join(header) + "\n" + table(rows) + "\n"
    print(text)
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    stem = "attention_iou-sdxl" if xl else "attention_iou"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"settings": SETTINGS, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
