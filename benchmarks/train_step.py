"""Seconds per training step, peak memory and generation speed: scenebreak vs. the
original code's way.

Builds the Stable Diffusion 2.1-base architecture with random weights (no download)
and times phase-1 and phase-2 steps at 512x512 with prior preservation (a batch of
instance + class image), side by side with a baseline that does what the original
Break-A-Scene code does each step:
  * every attention layer (self and cross) materialises its attention matrix
    instead of using fused scaled-dot-product attention, and every map up to 32x32
    is stored (with its autograd graph) for the step;
  * the VAE encodes the instance and class images again at every step;
  * phase 1 runs the class image through the UNet too, although its loss has no
    gradient with respect to the handles (scenebreak skips it; same updates).
Everything else (loss, optimizer, data) is the same code. Phase 2 is also measured
with `--memory low` and with `--tune lora`, and `generate` batched and one image per
call. Each measurement runs in a fresh process, one after the other (never in
parallel), so peak memory is its own.

    python benchmarks/train_step.py                  # CPU, 512x512
    python benchmarks/train_step.py --device cuda    # on a GPU (bf16 autocast)

Prints a table and writes it to benchmarks/results/train_step-<device>.md
(plus .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tinymodels (the tiny model builders) lives with the tests


class OriginalStyleProcessor:
    """The original code's P2P-style processor: materialised attention everywhere,
    every map with <= 32*32 queries kept for the step."""

    def __init__(self, store, name, loss_layers):
        self.store, self.name, self.loss_layer = store, name, name in loss_layers

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        batch, seq, _ = hidden_states.shape
        is_cross = encoder_hidden_states is not None
        context = encoder_hidden_states if is_cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        value = attn.head_to_batch_dim(attn.to_v(context))
        probs = attn.get_attention_scores(query, key, None)  # baddbmm + softmax, materialised
        if seq <= 32 ** 2:
            per_example = probs.view(batch, attn.heads, seq, -1)
            if self.loss_layer:
                self.store.record(self.name, per_example)
            else:
                self.store.extra.append(per_example)  # kept alive like the original store
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def make_baseline_trainer(Trainer):
    import contextlib

    class BaselineTrainer(Trainer):
        def _class_example_needed(self, phase):
            return self.config.prior  # the original runs the class image in phase 1 too

        def _instance_latent(self, flip):
            # The original re-encodes the image with the VAE at every step.
            from scenebreak.images import image_to_tensor

            pixels = image_to_tensor(self.inputs.image)
            return self._encode(pixels.flip(-1) if flip else pixels)

        def _class_latent(self, index):
            from PIL import Image

            from scenebreak.images import image_to_tensor

            with Image.open(self.inputs.class_images[index]) as im:
                return self._encode(image_to_tensor(im.convert("RGB").resize(self.inputs.image.size)))

        @contextlib.contextmanager
        def _capture(self):
            unet = self.c.unet
            original = dict(unet.attn_processors)
            self.store.extra = []
            unet.set_attn_processor({n: OriginalStyleProcessor(self.store, n, self.layers) for n in original})
            clear = self.store.clear

            def clear_all():
                clear()
                self.store.extra.clear()

            self.store.clear = clear_all
            try:
                yield
            finally:
                unet.set_attn_processor(original)

    return BaselineTrainer


# What each row runs: scenebreak's settings (precision "auto" is bf16 autocast on CUDA
# and on CPUs with bf16 instructions), or the original code's way (fp32 on the CPU).
VARIANTS = {
    "scenebreak": {"memory": "fast"},
    "scenebreak fp32": {"memory": "fast", "mixed_precision": "no"},
    "scenebreak low-memory": {"memory": "low"},
    "scenebreak low-memory fp32": {"memory": "low", "mixed_precision": "no"},
    "scenebreak LoRA": {"tune": "lora"},
    "scenebreak LoRA low-memory": {"tune": "lora", "memory": "low"},
    "original-style": {"memory": "fast", "mixed_precision": "no"},
}
ROWS = [(1, "scenebreak"), (1, "scenebreak fp32"), (1, "original-style"),
        (2, "scenebreak fp32"), (2, "scenebreak low-memory"), (2, "scenebreak low-memory fp32"), (2, "scenebreak LoRA"),
        (2, "scenebreak LoRA low-memory"), (2, "original-style"), ("generate", "scenebreak"), ("generate", "one image per call")]


def random_sd21(device_name: str):
    """The SD2.1-base architecture with random weights, a CLIP-sized tokenizer, and a
    scratch folder."""
    from transformers import CLIPTokenizer

    from scenebreak.models import BaseModel, Components
    from tinymodels import build_components, sd21_base_configs, write_tiny_tokenizer

    tmp = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tmp / "tok", vocab_size=49408)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok")
    configs = sd21_base_configs()
    parts = build_components(configs, tokenizer)
    components = Components(parts["unet"], parts["vae"], parts["text_encoder"], tokenizer, configs["scheduler"],
                            BaseModel("random-sd21-base", None, None, "random"))
    for model in (components.unet, components.vae, components.text_encoder):
        model.requires_grad_(False)
    return components, tmp


def peak(device) -> dict:
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated() / 2**30, "peak_what": "torch.cuda.max_memory_allocated"}
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_what": "peak RSS of the process"}


def measure_generation(kind: str, steps: int, device_name: str, resolution: int) -> dict:
    """Seconds per image of `generate` (DDIM, guidance 7.5), from `steps` timed
    denoising steps scaled to 50: batched (4 images per pass on CUDA, 2 on the CPU)
    or one image per call."""
    from scenebreak.device import choose_device
    from scenebreak.pipeline import make_pipeline, sample

    device = choose_device(device_name)
    components, _ = random_sd21(device_name)
    dtype = device.infer_dtype()
    c = components
    for model in (c.unet, c.vae, c.text_encoder):
        model.to(device.torch, dtype)
    pipe = make_pipeline(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config)
    batch = 1 if kind == "one image per call" else (4 if device.type == "cuda" else 2)
    seeds = list(range(batch))
    sample(pipe, "a photo", seeds, steps=1, guidance=7.5, resolution=resolution)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    device.synchronize()
    started = time.perf_counter()
    sample(pipe, "a photo", seeds, steps=steps, guidance=7.5, resolution=resolution)
    device.synchronize()
    per_step = (time.perf_counter() - started) / steps
    per_image = per_step * 50 / batch
    return {"kind": kind, "phase": "generate", "batch": batch, "dtype": str(dtype).replace("torch.", ""),
            "s_per_image": per_image, "images_per_s": 1 / per_image, **peak(device)}


def measure(kind: str, phase: int, steps: int, device_name: str, resolution: int) -> dict:
    """One measurement, in this process: build, warm up one step, time `steps`."""
    import numpy as np
    from PIL import Image

    from scenebreak.config import LearnConfig
    from scenebreak.device import choose_device, precision_name
    from scenebreak.memory import choose as choose_memory
    from scenebreak.tokens import add_handles
    from scenebreak.train import Trainer, TrainInputs

    device = choose_device(device_name)
    components, tmp = random_sd21(device_name)
    tokenizer = components.tokenizer
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8))
    class_paths = []
    for i in range(2):
        path = tmp / f"class{i}.png"
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(path)
        class_paths.append(path)
    masks = torch.zeros(2, resolution, resolution)
    masks[0, : resolution // 2, : resolution // 2] = 1
    masks[1, resolution // 2 :, resolution // 3 :] = 1
    tokens = ["<asset1>", "<asset2>"]
    ids = add_handles(tokenizer, components.text_encoder, tokens)
    steps1, steps2 = (steps + 1, 0) if phase == 1 else (0, steps + 1)
    config = LearnConfig(steps1=steps1, steps2=steps2, num_class_images=2, resolution=resolution, **VARIANTS[kind])
    amp_dtype = device.train_dtype(config.mixed_precision)
    plan = choose_memory(config, components, device, resolution, amp_dtype)  # the switches --memory low turns on
    cls = make_baseline_trainer(Trainer) if kind == "original-style" else Trainer
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = cls(components, TrainInputs(image, masks, ids, class_paths), config, device, tokens, plan=plan, amp_dtype=amp_dtype)
    times = []
    started = time.perf_counter()
    for _record in trainer.run():
        device.synchronize()
        now = time.perf_counter()
        times.append(now - started)
        started = now
    timed = times[1:]  # the first step warms up (allocator, kernels, lazy caches)
    return {"kind": kind, "phase": phase, "precision": precision_name(amp_dtype), "memory": plan.policy, "steps_timed": len(timed),
            "s_per_step": sum(timed) / len(timed), "first_step_s": times[0], **peak(device)}


def machine(device_name: str) -> str:
    if device_name.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--baseline-memory-limit-gib", type=float, default=None,
                        help="address-space cap for the baseline's processes (CPU), so an out-of-memory baseline fails fast instead of swapping")
    parser.add_argument("--gen-steps", type=int, default=3, help="timed denoising steps per generation row")
    parser.add_argument("--only", nargs="+", help="only the rows whose 'PHASE KIND' contains one of these words, e.g. LoRA generate")
    parser.add_argument("--with-fast-bf16", action="store_true",
                        help="also phase 2 fast with bf16 autocast (on CUDA it is the default row; on a 24 GiB CPU machine it does not fit)")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one:
        if args.baseline_memory_limit_gib:
            limit = int(args.baseline_memory_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        kind, phase = args.one
        if phase == "generate":
            print(json.dumps(measure_generation(kind, args.gen_steps, args.device, args.resolution)))
        else:
            print(json.dumps(measure(kind, int(phase), args.steps, args.device, args.resolution)))
        return

    rows = []
    plan = list(ROWS)
    if args.device.startswith("cuda") or args.with_fast_bf16:
        plan.insert(plan.index((2, "scenebreak fp32")), (2, "scenebreak"))
    for phase, kind in plan:
        if args.only and not any(word in f"{phase} {kind}" for word in args.only):
            continue
        baseline = kind == "original-style"
        cmd = [sys.executable, __file__, "--one", kind, str(phase), "--device", args.device,
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--gen-steps", str(args.gen_steps)]
        if args.baseline_memory_limit_gib and baseline:
            cmd += ["--baseline-memory-limit-gib", str(args.baseline_memory_limit_gib)]
        print(f"measuring {kind}, phase {phase} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
            oom = "memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
            limit = f" (> {args.baseline_memory_limit_gib} GiB cap)" if args.baseline_memory_limit_gib and baseline else ""
            rows.append({"kind": kind, "phase": phase, "error": f"out of memory{limit}" if oom else tail[:200]})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    command = f"python benchmarks/train_step.py --device {args.device}" + (
        f" --baseline-memory-limit-gib {args.baseline_memory_limit_gib}" if args.baseline_memory_limit_gib else "")
    out = HERE / "results"
    stem = f"train_step-{args.device.split(':')[0]}"
    if args.only and (out / f"{stem}.json").exists():
        # Some rows measured again: they replace their old selves in the saved table.
        saved = json.loads((out / f"{stem}.json").read_text())
        fresh = {(str(r["phase"]), r["kind"]) for r in rows}
        order = {(str(phase), kind): i for i, (phase, kind) in enumerate(ROWS)}
        kept = [r for r in saved["rows"] if (str(r["phase"]), r["kind"]) not in fresh]
        rows = sorted(kept + rows, key=lambda r: order.get((str(r["phase"]), r["kind"]), len(order)))
        command = saved.get("command", command) + f"; rows re-measured with --only {' '.join(args.only)}"
    table = render(rows, args, command)
    print(table)
    out.mkdir(exist_ok=True)
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"machine": machine(args.device), "command": command, "rows": rows}, indent=2) + "\n")


def render(rows: list[dict], args, command: str) -> str:
    lines = [
        "# Training step and generation: scenebreak vs. the original code's way",
        "",
        f"- machine: {machine(args.device)}; device: {args.device}; torch {torch.__version__}",
        f"- model: SD2.1-base architecture, random weights; {args.resolution}x{args.resolution}; training batch 2 "
        "(instance + class image); AdamW with fp32 master weights",
        f"- training: {args.steps} timed steps after 1 warm-up step; generation: {args.gen_steps} timed DDIM steps "
        "(guidance 7.5) scaled to 50; each row is a fresh process, one at a time",
        "- scenebreak's phase 1 runs the instance example only: there the class image's loss has no gradient with "
        "respect to the handles, so skipping it gives the same updates (docs/method.md); the baseline runs both",
        "- scenebreak rows use the default precision (bf16 autocast on CUDA and on CPUs with bf16 instructions) "
        "unless marked fp32; low-memory: `--memory low` (gradient checkpointing, optimizer step inside the backward "
        "pass, 8-bit AdamW on CUDA when bitsandbytes is installed); LoRA: `--tune lora --rank 32`",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `{command}`",
        "",
        "| phase | code | precision | s/step | peak GiB | time vs baseline | memory vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase in (1, 2):
        base = next((r for r in rows if r["phase"] == phase and r["kind"] == "original-style"), None)
        for row in (r for r in rows if r["phase"] == phase):
            if "error" in row:
                lines.append(f"| {phase} | {row['kind']} | | {row['error']} | | | |")
                continue
            ratio_t = ratio_m = ""
            if row is not base and base and "error" not in base:
                ratio_t = f"{row['s_per_step'] / base['s_per_step']:.2f}x"
                ratio_m = f"{row['peak_gib'] / base['peak_gib']:.2f}x"
            lines.append(f"| {phase} | {row['kind']} | {row.get('precision', '')} | {row['s_per_step']:.2f} | {row['peak_gib']:.1f} | "
                         f"{ratio_t} | {ratio_m} |")
    generation = [r for r in rows if r["phase"] == "generate"]
    if generation:
        lines += ["", "| generate | images per pass | dtype | s/image | images/s | peak GiB |", "|---|---|---|---|---|---|"]
        for row in generation:
            if "error" in row:
                lines.append(f"| {row['kind']} | {row['error']} | | | | |")
            else:
                lines.append(f"| {row['kind']} | {row['batch']} | {row['dtype']} | {row['s_per_image']:.2f} | "
                             f"{row['images_per_s']:.3f} | {row['peak_gib']:.1f} |")
    lines += ["", f"Peak memory is the {rows[0].get('peak_what', 'peak') if rows else 'peak'}, which includes the model "
              "weights and optimizer state."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
