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
`--model small` is the fast test's model (tests/train/test_mechanics.py), and its setting
`--model small --steps1 0 --steps2 100 --lr2 1e-3 --lambda-attn 0.3` gives
attention_iou-small.md (`--out` names another file).

`--model flux` (or `flux-schnell`) runs it on the tiny FLUX.1 dev (schnell): 64x64, a
2x VAE and 2x2 tokens, so 16x16 maps of the joint attention, LoRA in phase 2 as FLUX
learns by default (its rate LearnConfig's 1e-4; the handles' rows at --lr2).
`--form text joint output` trains with each form of the map (AttentionStore.form;
lambda 0 is run once, it records no map) and measures every scene in every form;
`--double-blocks 4` gives the tiny FLUX four double-stream blocks instead of one, and
`--blocks 1 4` trains on the last block and on all four (flux.ATTENTION_BLOCKS),
each scene measured on both. Saved as attention_iou-flux[-schnell].md unless --out.
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
MODELS = ("sd", "small", "sdxl", "flux", "flux-schnell")
FLUX_MODELS = ("flux", "flux-schnell")


def build_model(family: str, folder: Path, double_blocks: int | None = None) -> Path:
    from tinymodels import build_small_model, build_tiny_flux, build_tiny_model, build_tiny_sdxl

    if family in FLUX_MODELS:
        variant = "schnell" if family == "flux-schnell" else "dev"
        path = build_tiny_flux(folder / f"tiny-{family}", variant=variant)
        if double_blocks:
            rebuild_flux_transformer(path, variant, double_blocks)
        return path
    builders = {"sd": build_tiny_model, "small": build_small_model, "sdxl": build_tiny_sdxl}
    return builders[family](folder / f"tiny-{family}")


def rebuild_flux_transformer(path: Path, variant: str, double_blocks: int, sharpen: float = 2.0) -> None:
    """The tiny FLUX's transformer again with `double_blocks` double-stream blocks (built
    and sharpened as tinymodels.build_tiny_flux builds its one)."""
    import shutil

    import torch
    from diffusers import FluxTransformer2DModel
    from tinymodels import sharpen_joint_attention, tiny_flux_configs

    config = dict(tiny_flux_configs(variant)["transformer"], num_layers=double_blocks)
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**config)
    sharpen_joint_attention(transformer, sharpen)
    shutil.rmtree(path / "transformer")
    transformer.save_pretrained(path / "transformer")


def measure(path, forms, blocks) -> list[dict]:
    """attention_overlap of a scene, once per map form and number of last double blocks
    (FLUX; None: the model's one kind of map), one entry per handle and map."""
    from scenebreak.evaluation.diagnostics import attention_overlap
    from scenebreak.families import flux
    from scenebreak.train.attention import AttentionStore

    out = []
    default_form, default_blocks = AttentionStore.form, flux.ATTENTION_BLOCKS
    try:
        for form in forms:
            for count in blocks:
                if form:
                    AttentionStore.form = form
                if count:
                    flux.ATTENTION_BLOCKS = count
                for h in attention_overlap(path, device="cpu")["handles"]:
                    out.append(dict(h, map_form=form, map_blocks=count))
    finally:
        AttentionStore.form, flux.ATTENTION_BLOCKS = default_form, default_blocks
    return out


def run(seeds, lambdas=(0.01, 0.0), family: str = "sd", precisions=("fp32",), settings=None, save=None,
        forms=(None,), blocks=(None,), double_blocks=None) -> list[dict]:
    """Learn the synthetic scene for each precision, seed and lambda (and on FLUX each
    map form and number of blocks trained on); one row per handle and measured map.
    `save(rows)` is called after each run (a long run keeps what it measured)."""
    from helpers import write_synthetic_scene

    from scenebreak import LearnConfig, learn
    from scenebreak.device import CPU_BF16_ENV
    from scenebreak.families import flux
    from scenebreak.train.attention import AttentionStore

    settings = settings or SETTINGS
    tmp = Path(tempfile.mkdtemp())
    os.environ["SCENEBREAK_HOME"] = str(tmp / "home")
    model = build_model(family, tmp, double_blocks)
    image, red, blue = write_synthetic_scene(tmp / "inputs")
    # Lambda 0 records no map: its form and blocks change nothing, so it is run once.
    variants = [(lam, form, count) for lam in lambdas for form in (forms if lam else forms[:1])
                for count in (blocks if lam else blocks[:1])]
    rows = []
    for precision in precisions:
        os.environ[CPU_BF16_ENV] = "1" if precision == "bf16" else "0"  # as on a CPU with / without bf16 instructions
        for seed in seeds:
            for lam, form, count in variants:
                default_form, default_blocks = AttentionStore.form, flux.ATTENTION_BLOCKS
                if form:
                    AttentionStore.form = form
                if count:
                    flux.ATTENTION_BLOCKS = count
                started, cpu = time.perf_counter(), time.process_time()
                name = f"{precision}-s{seed}-l{lam}" + (f"-{form}" if form else "") + (f"-b{count}" if count else "")
                try:
                    result = learn(image, [red, blue], LearnConfig(lambda_attn=lam, seed=seed, **settings),
                                   base_model=str(model), device="cpu", name=name)
                finally:
                    AttentionStore.form, flux.ATTENTION_BLOCKS = default_form, default_blocks
                seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
                measured = measure(result.path, forms, blocks)
                for h in measured:
                    row = {"precision": precision, "seed": seed, "lambda_attn": lam, "handle": h["handle"], "own": h["own"],
                           "other": h["other"], "distance": h["distance"], "seconds": round(seconds, 1),
                           "cpu_seconds": round(cpu, 1)}
                    if form or count:  # FLUX: what the loss was trained on, and the map measured
                        row.update(form=form if lam else None, blocks=count if lam else None, map_form=h["map_form"],
                                   map_blocks=h["map_blocks"])
                    rows.append(row)
                own = [h for h in measured if h["map_form"] == (form or forms[0]) and h["map_blocks"] == (count or blocks[0])]
                print(f"{name}: " + ", ".join(
                    f"{h['handle']} own {h['own']:.3f} other {h['other']:.3f} distance {h['distance']:.3f}"
                    for h in own) + f" ({seconds:.0f} s)", file=sys.stderr, flush=True)
                if save:
                    save(rows)
    os.environ.pop(CPU_BF16_ENV, None)
    return rows


# On FLUX the rows also say what the loss was trained on (form, blocks) and which map was
# measured (map_form, map_blocks).
FLUX_KEYS = ("form", "blocks", "map_form", "map_blocks")


def summary(rows: list[dict]) -> list[dict]:
    """Per precision and lambda (on FLUX also per trained and measured map): mean IoU
    with the own and the other mask, handles that overlap their own mask more, and the
    mean distance to the own mask."""
    keys = ("precision", "lambda_attn") + tuple(k for k in FLUX_KEYS if rows and k in rows[0])
    groups: dict[tuple, list[dict]] = {}
    order = {p: i for i, p in enumerate(dict.fromkeys(r["precision"] for r in rows))}
    for r in sorted(rows, key=lambda r: (order[r["precision"]], -r["lambda_attn"])):
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for group, sel in groups.items():
        n = len(sel)
        out.append(dict(zip(keys, group), own=sum(r["own"] for r in sel) / n, other=sum(r["other"] for r in sel) / n,
                        wins=sum(r["own"] > r["other"] for r in sel), handles=n,
                        distance=sum(r["distance"] for r in sel) / n))
    return out


def _trained_map(r: dict, first: tuple) -> bool:
    """A FLUX row measured on the map its loss shaped (lambda 0: the first form and blocks)."""
    if r.get("form") is None and r.get("blocks") is None:
        return (r["map_form"], r["map_blocks"]) == first
    return (r["map_form"], r["map_blocks"]) == (r["form"] or first[0], r["blocks"] or first[1])


def _name(form, blocks) -> str:
    return "-" if form is None and blocks is None else " ".join(
        ([form] if form else []) + ([f"last {blocks} block{'s' if blocks > 1 else ''}"] if blocks else []))


def table(rows: list[dict]) -> str:
    if rows and "map_form" in rows[0]:
        return flux_table(rows)
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


def flux_table(rows: list[dict]) -> str:
    """Each run measured on the map its loss shaped, then the means over seeds of every
    trained x measured pair."""
    first = (rows[0]["map_form"], rows[0]["map_blocks"])
    lines = ["Each run, on the map its loss shaped (lambda 0: on the " + _name(*first) + " map):", "",
             "| precision | seed | lambda_attn | trained on | handle | IoU own mask | IoU other mask | own - other "
             "| distance to own mask |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if _trained_map(r, first):
            lines.append(f"| {r['precision']} | {r['seed']} | {r['lambda_attn']} | {_name(r['form'], r['blocks'])} | "
                         f"{r['handle']} | {r['own']:.3f} | {r['other']:.3f} | {r['own'] - r['other']:+.3f} | "
                         f"{r['distance']:.3f} |")
    lines += ["", "Means over seeds and handles, each scene measured on every map:", "",
              "| precision | lambda_attn | trained on | map measured | mean own | mean other | mean own - other "
              "| handles with own > other | mean distance to own mask |",
              "|---|---|---|---|---|---|---|---|---|"]
    for s in summary(rows):
        lines.append(f"| {s['precision']} | {s['lambda_attn']} | {_name(s['form'], s['blocks'])} | "
                     f"{_name(s['map_form'], s['map_blocks'])} | {s['own']:.3f} | {s['other']:.3f} | "
                     f"{s['own'] - s['other']:+.3f} | {s['wins']}/{s['handles']} | {s['distance']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--model", choices=MODELS, default="sd",
                        help="the tiny SD 2.x (default), a smaller one (the fast test's), the tiny SDXL, or the tiny FLUX.1 dev or schnell")
    parser.add_argument("--precision", choices=("fp32", "bf16"), nargs="+",
                        help="fp32 (as without bf16 instructions) and/or bf16 (default: fp32, and bf16 where the CPU has it)")
    parser.add_argument("--threads", type=int, help="torch's CPU thread count (default: torch's own)")
    parser.add_argument("--steps1", type=int, default=SETTINGS["steps1"])
    parser.add_argument("--steps2", type=int, default=SETTINGS["steps2"])
    parser.add_argument("--lr1", type=float, help="phase-1 learning rate (default: LearnConfig's, 5e-4)")
    parser.add_argument("--lr2", type=float, default=SETTINGS["lr2"])
    parser.add_argument("--lambda-attn", type=float, default=0.01, help="the loss weight compared with 0 (default 0.01)")
    parser.add_argument("--form", choices=("text", "joint", "output"), nargs="+",
                        help="FLUX: the map forms trained on and measured (AttentionStore.form; default: its default)")
    parser.add_argument("--blocks", type=int, nargs="+",
                        help="FLUX: train on the last N double-stream blocks, for each N (default: flux.ATTENTION_BLOCKS)")
    parser.add_argument("--double-blocks", type=int, help="FLUX: the tiny transformer's double-stream blocks (default 1)")
    parser.add_argument("--out", type=Path, help="where to save the .md and .json (default benchmarks/results/attention_iou[-small|-sdxl|-flux...])")
    args = parser.parse_args()
    flux = args.model in FLUX_MODELS
    if not flux and (args.form or args.blocks or args.double_blocks):
        parser.error("--form, --blocks and --double-blocks are for --model flux and flux-schnell")
    import torch

    from train_step import cpu_name

    from scenebreak.device import cpu_bf16_instructions

    has_bf16 = cpu_bf16_instructions()
    precisions = args.precision or (["fp32", "bf16"] if has_bf16 else ["fp32"])
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = dict(SETTINGS, steps1=args.steps1, steps2=args.steps2, lr2=args.lr2, **({"lr1": args.lr1} if args.lr1 else {}))
    doubles = args.double_blocks or 1
    flux_shape = (f"tiny FLUX.1 {'schnell' if args.model == 'flux-schnell' else 'dev'} ({doubles} double-stream "
                  f"block{'s' if doubles > 1 else ''}, 1 single), resolution 64 (2x VAE, 2x2 tokens: 16x16 maps), "
                  "LoRA in phase 2 (FLUX's default tuning)")
    shape = {"sd": "resolution 64 (8x8 maps)", "small": "the smaller tiny model (tinymodels.build_small_model), resolution 64 (8x8 maps)",
             "sdxl": "tiny SDXL, resolution 256 (8x VAE: 8x8 maps)", "flux": flux_shape, "flux-schnell": flux_shape}[args.model]
    from scenebreak.families.flux import ATTENTION_BLOCKS
    from scenebreak.train.attention import AttentionStore

    forms = tuple(args.form or [AttentionStore.form]) if flux else (None,)
    blocks = tuple(args.blocks or [min(ATTENTION_BLOCKS, doubles)]) if flux else (None,)  # all of a small model's
    title = {"sdxl": "SDXL", "flux": "FLUX.1 dev", "flux-schnell": "FLUX.1 schnell"}.get(args.model, "model")
    emulation = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k))
    command = (emulation + " " if emulation else "") + "python benchmarks/attention_iou.py " + " ".join(sys.argv[1:])
    machine = {"cpu": cpu_name(), "cpu_bf16": has_bf16, "kernels": torch.backends.cpu.get_cpu_capability(),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
    header = [
        f"# Attention-loss mechanics: handle attention vs. masks (tiny random {title})",
        "",
        f"- settings: {json.dumps(settings)}; lambda_attn {args.lambda_attn} vs 0; synthetic 96x80 photo, two 32x32 squares; {shape}",
        f"- CPU: {machine['cpu']} ({'with' if has_bf16 else 'without'} bf16 instructions; torch kernels: {machine['kernels']}), "
        f"{machine['threads']} torch thread(s); precision: {', '.join(precisions)} (fp32: SCENEBREAK_CPU_BF16=0, as on a CPU "
        f"without bf16 instructions; bf16: SCENEBREAK_CPU_BF16=1, bf16 autocast{'' if has_bf16 else ', emulated by torch'})",
        f"- torch {torch.__version__}; date {time.strftime('%Y-%m-%d')}; command: `{command}`",
    ]
    if flux:
        header.append(f"- maps: the image tokens' attention to each handle's T5 token in the last N double-stream blocks, "
                      f"averaged over heads, blocks and 4 noise levels (diagnostics.handle_attention_maps); forms (AttentionStore.form) "
                      f"trained on with lambda {args.lambda_attn}: {', '.join(forms)}; last N blocks: {', '.join(map(str, blocks))} "
                      f"(lambda 0 run once); every scene measured on each form and N")
    header.append("")
    default = "attention_iou" if args.model == "sd" else f"attention_iou-{args.model}"
    out = args.out or HERE / "results" / (default + (f"-{doubles}double" if doubles > 1 else ""))
    out = out.parent / out.name.removesuffix(".md").removesuffix(".json")  # a stem: "0.3" has no suffix to replace
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows, complete=False):
        text = "\n".join(header) + ("" if complete else "\n(incomplete: still running)\n") + "\n" + table(rows) + "\n"
        record = {"settings": settings, "lambda_attn": args.lambda_attn, "machine": machine, "command": command, "model": args.model,
                  "complete": complete, "rows": rows, "summary": summary(rows)}
        out.parent.joinpath(out.name + ".md").write_text(text)
        out.parent.joinpath(out.name + ".json").write_text(json.dumps(record, indent=2) + "\n")
        return text

    rows = run(args.seeds, lambdas=(args.lambda_attn, 0.0), family=args.model, precisions=precisions, settings=settings, save=save,
               forms=forms, blocks=blocks, double_blocks=args.double_blocks)
    print(save(rows, complete=True))


if __name__ == "__main__":
    main()
