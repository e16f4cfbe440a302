"""Fresh or fixed background noise in Blended Latent Diffusion (`edit`, `extract-bg`).

After every step the latents outside the mask are replaced by the source noised to
the level just reached. The reference draws fresh noise for that at every step;
the alternative keeps one noise per sample (the one it started from), so the
background follows one smooth path, as a deterministic sampler's own latents do.
Both are run here through `scenebreak.sample.blending.blended_latents` itself, from the same
start (the source noised with the sample's seed to the first step run), on a
synthetic photo with a centred square mask, with guidance at the family's scale:

- jitter: how much the model's clean-image estimate inside the mask changes from
  one step to the next (RMS of the change over RMS of the final latents, mean over
  the steps). A multistep solver (DPM-Solver++ 2M) extrapolates from the last two
  estimates, so jitter there is what it amplifies;
- A x → B x: RMS(inside at A x the default steps - inside at B x) / RMS(inside at
  B x), the first step run kept at the same level (the step count and the skipped
  fraction are adjusted to land on it). A sampler that converges changes less and
  less as the steps double; fresh noise makes each step count a different draw of
  the background's noise.

Each sampler also runs from the same start with a mask that covers everything (plain
img2img, no blending; measured on the same cells): how much the sampler itself
jitters and changes.

Random weights (there are no pretrained ones here): these are statements about the
samplers and the blending, not about how good the pictures look.

    python benchmarks/blend_noise.py                     # the tiny model, ~2-3 min
    python benchmarks/blend_noise.py --model sd21 --resolution 128 --samplers dpm --seeds 1 --multiples 1 2  # ~4-10 min

Run with OMP_NUM_THREADS=1 beside other work. Prints a table and writes it to
benchmarks/results/blend_noise-<model>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (fixed_noise, the mask covers everything): the last is plain img2img from the same
# start, for how much the sampler itself changes without any blending.
MODES = {"fresh": (False, False), "fixed": (True, False), "no mask": (False, True)}


def synthetic_photo(size: int) -> np.ndarray:
    """The tests' kind of photo: a light ground with a red and a blue square."""
    photo = np.full((size, size, 3), 230, np.uint8)
    a, b = size // 8, size // 2
    photo[a:b, a:b] = (220, 30, 30)
    photo[b:size - a, b:size - a] = (30, 30, 220)
    return photo


def aligned_start(scheduler, steps: int, level: float) -> tuple[int, float, float]:
    """A step count near `steps` whose schedule has the timestep `level` (Euler's N
    points from 999 to 0 have it at N = m(N0 - 1) + 1, DPM-Solver's at N = m N0), the
    blend_start that makes it start there, and the timestep it starts at."""
    best = None
    for n in sorted(range(max(2, steps - 12), steps + 13), key=lambda n: abs(n - steps)):
        scheduler.set_timesteps(n)
        timesteps = scheduler.timesteps.tolist()
        k = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - level))
        if best is None or abs(timesteps[k] - level) < abs(best[2] - level) - 1e-6:
            best = (n, (k + 0.5) / len(timesteps), float(timesteps[k]))
    return best


class Estimates:
    """Records, at every UNet call, the guided clean-image estimate inside the mask."""

    def __init__(self, pipe, guidance: float, inside):
        self.pipe, self.guidance, self.inside, self.seen = pipe, guidance, inside, []

    def __call__(self, module, args, kwargs, output):
        model_input, t = args[0], args[1]
        uncond, cond = output.sample.float().chunk(2)
        eps = uncond + self.guidance * (cond - uncond)
        x_in = model_input.float().chunk(2)[0]
        one, zero = torch.ones(1), torch.zeros(1)
        at = torch.tensor([float(t)]) if self.pipe.scheduler.timesteps.is_floating_point() else torch.tensor([int(t)])
        a = float(self.pipe.scheduler.add_noise(one, zero, at))  # add_noise(x0, n) = a x0 + s n
        s = float(self.pipe.scheduler.add_noise(zero, one, at))
        latents = x_in * (a * a + s * s) ** 0.5  # the sampler's own latents (the UNet sees them at unit scale)
        self.seen.append(((latents - s * eps) / a)[self.inside])


def run(pipe, family, source, mask, inside, seeds, scheduler: str, steps: int, blend_start: float, fixed: bool,
        guidance: float, record: bool = False):
    """Final latents of blended sampling (`inside`: the cells measured), and with
    `record` the clean-image estimates inside at every step."""
    from scenebreak.sample.blending import blended_latents
    from scenebreak.families import family_named

    pipe.scheduler = family_named("SD 2.x").sampler(scheduler, pipe.scheduler.config)
    recorder = Estimates(pipe, guidance, inside) if record else None
    hook = pipe.unet.register_forward_hook(recorder, with_kwargs=True) if record else None
    try:
        latents = blended_latents(pipe, family, source, mask, "a photo of a dog", seeds, steps=steps, guidance=guidance,
                                  blend_start=blend_start, fixed_noise=fixed)
    finally:
        if hook is not None:
            hook.remove()
    return latents.float(), recorder


def rms(x) -> float:
    return float(x.pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "sd21"], default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="default 64 (tiny), 128 (sd21)")
    parser.add_argument("--samplers", nargs="+", default=["dpm", "euler", "ddim"])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4, 8], help="step counts, times the default")
    parser.add_argument("--blend-start", type=float, default=0.25)
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    resolution = args.resolution or (64 if args.model == "tiny" else 128)

    from figures import save_results
    from train_step import cpu_name, random_model

    from scenebreak.sample.blending import encode, latent_mask
    from scenebreak.config import SCHEDULER_STEPS
    from scenebreak.families import family_named
    from scenebreak.sample.pipeline import make_pipeline

    started = time.perf_counter()
    c, _ = random_model(tiny=args.model == "tiny")
    pipe = make_pipeline(c.family, c.denoiser, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, "dpm")
    guidance = c.family.guidance
    photo = synthetic_photo(resolution)
    source = encode(pipe.vae, [photo])
    pixel_mask = np.zeros((resolution, resolution), bool)
    pixel_mask[resolution // 4:3 * resolution // 4, resolution // 4:3 * resolution // 4] = True
    mask = latent_mask(pixel_mask, tuple(source.shape[-2:]))
    seeds = list(range(args.seeds))
    inside = (mask > 0).expand(len(seeds), *source.shape[1:])
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    rows = []
    for scheduler in args.samplers:
        steps = SCHEDULER_STEPS[scheduler]
        probe = family_named("SD 2.x").sampler(scheduler, pipe.scheduler.config)
        probe.set_timesteps(steps)
        level = float(probe.timesteps[int(steps * args.blend_start)])
        for mode, (fixed, everywhere) in MODES.items():
            t0 = time.perf_counter()
            results, row = [], {"sampler": scheduler, "steps": steps, "noise": mode, "start_level": level}
            for multiple in args.multiples:
                n, start, landed = (aligned_start(probe, steps * multiple, level) if multiple > 1
                                    else (steps, args.blend_start, level))
                latents, recorder = run(pipe, c.family, source, torch.ones_like(mask) if everywhere else mask, inside, seeds,
                                        scheduler, n, start, fixed, guidance, record=multiple == 1)
                results.append(latents[inside])
                row.setdefault("step_counts", []).append(n)
                row.setdefault("start_levels", []).append(landed)
                if recorder is not None:
                    scale = rms(latents[inside])
                    jumps = [rms(b - a) / scale for a, b in zip(recorder.seen, recorder.seen[1:])]
                    row["jitter"] = float(np.mean(jumps))
            for (m0, a), (m1, b) in zip(zip(args.multiples, results), zip(args.multiples[1:], results[1:])):
                row[f"change_{m0}x_to_{m1}x"] = rms(a - b) / rms(b)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)

    pairs = [f"change_{a}x_to_{b}x" for a, b in zip(args.multiples, args.multiples[1:])]
    command = (f"python benchmarks/blend_noise.py --model {args.model} --resolution {resolution} --samplers "
               f"{' '.join(args.samplers)} --seeds {args.seeds} --multiples {' '.join(map(str, args.multiples))}")
    lines = [
        f"# Blended sampling: fresh or fixed background noise ({args.model}, random weights)",
        "",
        f"- model: {'the tests’ tiny model' if args.model == 'tiny' else 'SD2.1-base architecture'}, random weights; "
        f"{resolution}x{resolution}, a centred square mask (a quarter of the image); guidance {guidance}; "
        f"--blend-start {args.blend_start}; {len(seeds)} seeds (all samples together)",
        "- jitter: mean over the steps of RMS(change of the clean-image estimate inside the mask) / RMS(final inside); "
        "A x → B x: RMS(inside at A x the default steps - at B x) / RMS(at B x), from the same first level; "
        "no mask: the same start, the mask covering everything (plain img2img, no blending), measured on the same cells",
        f"- machine: {cpu_name()}, {torch.get_num_threads()} thread(s), torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; {time.perf_counter() - started:.0f} s in all",
        f"- command: `{command}`",
        "",
        "| sampler | steps | noise | jitter | " + " | ".join(p.removeprefix("change_").replace("_to_", " → ") for p in pairs) + " |",
        "|---|---|---|---|" + "---|" * len(pairs),
    ]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['noise']} | {r['jitter']:.4f} | "
                     + " | ".join(f"{r[p]:.4f}" for p in pairs) + " |")
    table = "\n".join(lines) + "\n"
    save_results(args.results_dir, f"blend_noise-{args.model}", table,
                 {"args": {k: str(v) for k, v in vars(args).items()}, "cpu": cpu_name(), "rows": rows})
    print(table)


if __name__ == "__main__":
    main()
