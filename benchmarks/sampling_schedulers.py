"""How close each sampler at each step count gets to the converged result.

All three samplers (deterministic DDIM, DPM-Solver++ 2M, Euler) solve the same
probability-flow ODE from the same starting noise, so each run's final latents can be
compared with a reference that has converged: DPM-Solver++ (second order, so far more
accurate than DDIM for the same steps) with `--reference-steps` (500) steps; the table
also has DDIM at 500 steps, whose distance to it shows how close to converged both are. The error is the RMS of the difference over the RMS of the reference, averaged
over `--seeds` seeds, with classifier-free guidance at the family's scale (7.5),
exactly as `generate` samples (scenebreak.sample.pipeline.sample's pipeline call).

This says how many steps each sampler needs for the same accuracy; with random weights
(there are no pretrained weights here) it is a statement about the solvers, not about
how good the pictures look. Read it as: the default (DPM-Solver++ at 25 steps) should be
at least as close to the converged result as the paper's DDIM at 50.

    python benchmarks/sampling_schedulers.py                     # the tiny model, seconds
    python benchmarks/sampling_schedulers.py --model sd21 --resolution 128 --reference-steps 500

Prints a table and writes it to benchmarks/results/sampling_schedulers-<model>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

RUNS = [("ddim", 25), ("ddim", 50), ("ddim", 100), ("ddim", 500), ("dpm", 15), ("dpm", 20), ("dpm", 25), ("dpm", 50),
        ("euler", 30), ("euler", 50), ("euler", 100)]


def final_latents(pipe, scheduler: str, steps: int, seeds: list[int], resolution: int, guidance: float):
    from scenebreak.families import family_named

    pipe.scheduler = family_named("SD 2.x").sampler(scheduler, pipe.scheduler.config)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    with torch.inference_mode():
        return pipe(prompt=["a photo of a dog on the beach"] * len(seeds), num_inference_steps=steps, guidance_scale=guidance,
                    height=resolution, width=resolution, generator=generators, output_type="latent").images.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd21"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (tiny), 128 (sd21)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--reference-steps", type=int, default=500)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    resolution = args.resolution or (64 if args.model == "tiny" else 128)

    from train_step import random_model

    from scenebreak.sample.pipeline import make_pipeline

    c, _ = random_model(tiny=args.model == "tiny")
    pipe = make_pipeline(c.family, c.denoiser, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, "dpm")
    seeds = list(range(args.seeds))
    guidance = c.family.guidance
    started = time.perf_counter()
    reference = final_latents(pipe, "dpm", args.reference_steps, seeds, resolution, guidance)
    print(f"reference: DPM-Solver++ {args.reference_steps} steps in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    scale = reference.pow(2).mean(dim=(1, 2, 3)).sqrt()
    rows = []
    for scheduler, steps in RUNS:
        latents = final_latents(pipe, scheduler, steps, seeds, resolution, guidance)
        error = ((latents - reference).pow(2).mean(dim=(1, 2, 3)).sqrt() / scale)
        rows.append({"scheduler": scheduler, "steps": steps, "relative_error": float(error.mean()),
                     "worst_seed": float(error.max())})
        print(json.dumps(rows[-1]), file=sys.stderr)

    lines = [
        f"# Samplers against the converged result ({args.model}, random weights)",
        "",
        f"- model: {'the tests’ tiny model' if args.model == 'tiny' else 'SD2.1-base architecture'}, random weights; "
        f"{resolution}x{resolution}; guidance {guidance}; {len(seeds)} seeds",
        f"- reference: DPM-Solver++ 2M with {args.reference_steps} steps from the same noise; error: RMS(latents - reference) / "
        "RMS(reference), mean over seeds (worst seed in brackets)",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `python benchmarks/sampling_schedulers.py --model {args.model} "
        f"--resolution {resolution} --seeds {args.seeds} --reference-steps {args.reference_steps}`",
        "",
        "| sampler | steps | relative error |",
        "|---|---|---|",
    ]
    lines += [f"| {r['scheduler']} | {r['steps']} | {r['relative_error']:.4f} ({r['worst_seed']:.4f}) |" for r in rows]
    table = "\n".join(lines) + "\n"
    args.results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sampling_schedulers-{args.model}"
    (args.results_dir / f"{stem}.md").write_text(table)
    (args.results_dir / f"{stem}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                               "rows": rows}, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
