"""Does the cross-attention loss do its job? A mechanics check on the tiny model.

A synthetic photo holds a red and a blue square of equal size with exact masks.
scenebreak learns it on the tiny random-initialised model (the one the tests use)
with --lambda-attn 0.01 and with 0, for several seeds, and measures how much each
handle's averaged latent/4 cross-attention map overlaps its own mask and the other
one (soft IoU: sum(min)/sum(max) of the max-normalised map and the mask), and how far
the map is from its own mask (mean squared difference, what the loss minimises).

A random model has no concepts to find, so its phase-2 learning rate is raised to
1e-4 (the paper's 2e-6 is tuned for trained SD weights and barely moves random
ones); everything else is the paper's: 400 + 400 steps, lr1 5e-4, union sampling,
flips, masked loss. Prior preservation is off (class images of a random model are
noise and only add time).

Precision: `--precision fp32` trains as a CPU without bf16 instructions does
(SCENEBREAK_CPU_BF16=0), `bf16` as one with them (SCENEBREAK_CPU_BF16=1: bf16
autocast, emulated by torch where the CPU lacks them); the default runs fp32 and,
where the CPU has them, bf16. `--threads` sets torch's thread count (the rounding of
a sum depends on it). ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 make torch
run as on an AVX2-only CPU (no AVX-512, no bf16 instructions); the header names the
kernels used.

    python benchmarks/attention_iou.py [--seeds 0 1 ... 7] [--model sdxl] [--precision fp32 bf16] [--threads 1]

Prints a table and saves it to benchmarks/results/attention_iou.md (and .json), the
table rewritten after each run; `--model sdxl` runs it on the tiny SDXL instead (two
text encoders, 8x VAE, 256x256: 8x8 maps too) and saves attention_iou-sdxl.md.
`--model small` is the fast test's model (tests/test_mechanics.py), and its setting
`--model small --steps1 0 --steps2 100 --lr2 1e-3 --lambda-attn 0.3` gives
attention_iou-small.md (`--out` names another file).
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
sys.path.insert(0, str(HERE))

SETTINGS = dict(steps1=400, steps2=400, lr2=1e-4, prior=False)
MODELS = ("sd", "small", "sdxl")


def build_model(family: str, folder: Path) -> Path:
    from tinymodels import build_small_model, build_tiny_model, build_tiny_sdxl

    builders = {"sd": build_tiny_model, "small": build_small_model, "sdxl": build_tiny_sdxl}
    return builders[family](folder / f"tiny-{family}")


def run(seeds, lambdas=(0.01, 0.0), family: str = "sd", precisions=("fp32",), settings=None, save=None) -> list[dict]:
    """Learn the synthetic scene for each precision, seed and lambda; one row per handle.
    `save(rows)` is called after each run (a long run keeps what it measured)."""
    from conftest import write_synthetic_scene

    from scenebreak import LearnConfig, learn
    from scenebreak.device import CPU_BF16_ENV
    from scenebreak.evaluation.diagnostics import attention_overlap

    settings = settings or SETTINGS
    tmp = Path(tempfile.mkdtemp())
    os.environ["SCENEBREAK_HOME"] = str(tmp / "home")
    model = build_model(family, tmp)
    image, red, blue = write_synthetic_scene(tmp / "inputs")
    rows = []
    for precision in precisions:
        os.environ[CPU_BF16_ENV] = "1" if precision == "bf16" else "0"  # as on a CPU with / without bf16 instructions
        for seed in seeds:
            for lam in lambdas:
                started, cpu = time.perf_counter(), time.process_time()
                result = learn(image, [red, blue], LearnConfig(lambda_attn=lam, seed=seed, **settings), base_model=str(model),
                               device="cpu", name=f"{precision}-s{seed}-l{lam}")
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                overlap = attention_overlap(result.path, device="cpu")
                for h in overlap["handles"]:
                    rows.append({"precision": precision, "seed": seed, "lambda_attn": lam, "handle": h["handle"], "own": h["own"],
                                 "other": h["other"], "distance": h["distance"], "seconds": round(seconds, 1),
                                 "cpu_seconds": round(cpu, 1)})
                print(f"{precision} seed {seed} lambda {lam}: " + ", ".join(
                    f"{h['handle']} own {h['own']:.3f} other {h['other']:.3f} distance {h['distance']:.3f}"
                    for h in overlap["handles"]) + f" ({seconds:.0f} s)", file=sys.stderr, flush=True)
                if save:
                    save(rows)
    os.environ.pop(CPU_BF16_ENV, None)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per precision and lambda: mean IoU with the own and the other mask, handles that
    overlap their own mask more, and the mean distance to the own mask."""
    out = []
    for precision in dict.fromkeys(r["precision"] for r in rows):
        for lam in sorted({r["lambda_attn"] for r in rows}, reverse=True):
            sel = [r for r in rows if r["precision"] == precision and r["lambda_attn"] == lam]
            if sel:
                n = len(sel)
                out.append({"precision": precision, "lambda_attn": lam, "own": sum(r["own"] for r in sel) / n,
                            "other": sum(r["other"] for r in sel) / n, "wins": sum(r["own"] > r["other"] for r in sel),
                            "handles": n, "distance": sum(r["distance"] for r in sel) / n})
    return out


def table(rows: list[dict]) -> str:
    lines = ["| precision | seed | lambda_attn | handle | IoU own mask | IoU other mask | own - other | distance to own mask |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['precision']} | {r['seed']} | {r['lambda_attn']} | {r['handle']} | {r['own']:.3f} | "
                     f"{r['other']:.3f} | {r['own'] - r['other']:+.3f} | {r['distance']:.3f} |")
    lines += ["", "| precision | lambda_attn | mean own | mean other | mean own - other | handles with own > other "
              "| mean distance to own mask |",
              "|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['precision']} | {s['lambda_attn']} | {s['own']:.3f} | {s['other']:.3f} | {s['own'] - s['other']:+.3f} | "
                     f"{s['wins']}/{s['handles']} | {s['distance']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--model", choices=MODELS, default="sd",
                        help="the tiny SD 2.x (default), a smaller one (the fast test's), or the tiny SDXL")
    parser.add_argument("--precision", choices=("fp32", "bf16"), nargs="+",
                        help="fp32 (as without bf16 instructions) and/or bf16 (default: fp32, and bf16 where the CPU has it)")
    parser.add_argument("--threads", type=int, help="torch's CPU thread count (default: torch's own)")
    parser.add_argument("--steps1", type=int, default=SETTINGS["steps1"])
    parser.add_argument("--steps2", type=int, default=SETTINGS["steps2"])
    parser.add_argument("--lr1", type=float, help="phase-1 learning rate (default: LearnConfig's, 5e-4)")
    parser.add_argument("--lr2", type=float, default=SETTINGS["lr2"])
    parser.add_argument("--lambda-attn", type=float, default=0.01, help="the loss weight compared with 0 (default 0.01)")
    parser.add_argument("--out", type=Path, help="where to save the .md and .json (default benchmarks/results/attention_iou[-small|-sdxl])")
    args = parser.parse_args()
    import torch

    from train_step import cpu_name

    from scenebreak.device import cpu_bf16_instructions

    has_bf16 = cpu_bf16_instructions()
    precisions = args.precision or (["fp32", "bf16"] if has_bf16 else ["fp32"])
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(SETTINGS, steps1=args.steps1, steps2=args.steps2, lr2=args.lr2, **({"lr1": args.lr1} if args.lr1 else {}))
    xl = args.model == "sdxl"
    shape = {"sd": "resolution 64 (8x8 maps)", "small": "the smaller tiny model (tinymodels.build_small_model), resolution 64 (8x8 maps)",
             "sdxl": "tiny SDXL, resolution 256 (8x VAE: 8x8 maps)"}[args.model]
    emulation = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k))
    command = (emulation + " " if emulation else "") + "python benchmarks/attention_iou.py " + " ".join(sys.argv[1:])
    machine = {"cpu": cpu_name(), "cpu_bf16": has_bf16, "kernels": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    header = [
        f"# Attention-loss mechanics: handle attention vs. masks (tiny random {'SDXL' if xl else 'model'})",
        "",
        f"- settings: {json.dumps(settings)}; lambda_attn {args.lambda_attn} vs 0; synthetic 96x80 photo, two 32x32 squares; {shape}",
        f"- CPU: {machine['cpu']} ({'with' if has_bf16 else 'without'} bf16 instructions; torch kernels: {machine['kernels']}), "
        f"{machine['threads']} torch thread(s); precision: {', '.join(precisions)} (fp32: SCENEBREAK_CPU_BF16=0, as on a CPU "
        f"without bf16 instructions; bf16: SCENEBREAK_CPU_BF16=1, bf16 autocast{'' if has_bf16 else ', emulated by torch'})",
        f"- torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}; command: `{command}`",
        "",
    ]
    out = args.out or HERE / "results" / ("attention_iou" if args.model == "sd" else f"attention_iou-{args.model}")
    out = out.parent / out.name.removesuffix(".md").removesuffix(".json")  # a stem: "0.3" has no suffix to replace
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows, complete=False):
        text = "\n".join(header) + ("" if complete else "\n(incomplete: still running)\n") + "\n" + table(rows) + "\n"
        record = {"settings": settings, "lambda_attn": args.lambda_attn, "machine": machine, "command": command,
                  "complete": complete, "rows": rows, "summary": summary(rows)}
        out.parent.joinpath(out.name + ".md").write_text(text)
        out.parent.joinpath(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
        return text

    rows = run(args.seeds, lambdas=(args.lambda_attn, 0.0), family=args.model, precisions=precisions, settings=settings, save=save)
    print(save(rows, complete=True))


if __name__ == "__main__":
    main()
