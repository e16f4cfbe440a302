"""CUDA smoke test: every training path of `learn` (and a `generate` from its scene)
on the tiny random model, the GPU code paths the CPU test suite cannot reach.

Variants (each guarded on its own: one that fails logs its traceback and the next runs):
  fast-bf16, fast-fp16 (GradScaler), fast-fp32      memory fast, each precision
  checkpointing                                     gradient checkpointing only
  low                                               --memory low: checkpointing, optimizer step inside the
                                                    backward pass, 8-bit AdamW when bitsandbytes imports
  low-no-8bit                                       the same with bitsandbytes hidden: fused AdamW in the backward pass
  low-fp16                                          --memory low with fp16 loss scaling
  8bit-out                                          memory fast + --adam-8bit (step after the backward pass)
  8bit-in                                           memory low + --adam-8bit (step inside the backward pass)
  lora                                              --tune lora
  cuda0                                             device="cuda:0" named explicitly
  compile                                           torch.compile of the training step (slow to compile: run it last)
  compile-whole                                     the whole step under CUDA graphs: the update after the backward
                                                    pass compiled too (SCENEBREAK_COMPILE_SCOPE=whole, reduce-overhead)
  sync-free, sync-free-low                          every training step under torch.cuda.set_sync_debug_mode("error"):
                                                    a call that makes the CPU wait for the GPU raises
  resume-fast, resume-low                           killed in phase 2 after a periodic checkpoint, resumed:
                                                    the same handles and weights as an uninterrupted run
  resume-8bit                                       killed in a fast run, resumed with --adam-8bit: warns
                                                    that the optimizer changed, and finishes
  sdxl, sdxl-fp16, sdxl-lora-low                    the tiny SDXL
  sampling                                          every sampler at every precision, edit, evaluate
  flux-lora, flux-lora-low, flux-fp16               the tiny FLUX.1 dev: LoRA (its usual tuning) as auto
                                                    picks it, with --memory low, with fp16 loss scaling
  flux-full-low                                     full tuning with --memory low (8-bit AdamW inside the
                                                    backward pass on CUDA)
  flux-lora-nf4                                     LoRA with --memory low and the frozen base in NF4
                                                    (--quantize nf4, bitsandbytes)
  flux-resume                                       killed in phase 2, resumed: the same handles (CLIP and
                                                    T5 rows) and adapters as an uninterrupted run
  flux-sampling                                     generate with the flow sampler at every precision,
                                                    edit and extract-bg; on CUDA with bitsandbytes, generate
                                                    again with the base in NF4 (as a 24 GB card samples FLUX)

Each variant prints one JSON line (ok / skipped / error, seconds, peak memory of the
device, the memory plan `learn` chose) and appends it to --jsonl as soon as it ends.

    python benchmarks/cuda_smoke.py                         # every variant but compile, on CUDA
    python benchmarks/cuda_smoke.py --only compile compile-whole
    python benchmarks/cuda_smoke.py --device cpu            # the dry run: what a CPU can do of it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

# Short runs: every code path, no quality. Resume runs train at a visible learning rate
# without class images, like tests/train/test_recovery.py.
SHORT = dict(steps1=5, steps2=5, num_class_images=2)
RESUME = dict(steps1=2, steps2=4, prior=False, lr2=1e-3, save_dtype="fp32", checkpoint_every=2)

# name: (what it runs, LearnConfig settings, what it needs)
VARIANTS = {
    "fast-bf16": ("learn", dict(memory="fast", mixed_precision="bf16"), {"bf16"}),
    "fast-fp16": ("learn", dict(memory="fast", mixed_precision="fp16"), {"cuda"}),
    "fast-fp32": ("learn", dict(memory="fast", mixed_precision="no"), set()),
    "checkpointing": ("learn", dict(memory="fast", gradient_checkpointing=True), set()),
    "low": ("learn", dict(memory="low"), set()),
    "low-no-8bit": ("learn-no-bnb", dict(memory="low"), set()),
    "low-fp16": ("learn", dict(memory="low", mixed_precision="fp16"), {"cuda"}),
    "8bit-out": ("learn", dict(memory="fast", adam_8bit=True), {"cuda", "bnb"}),
    "8bit-in": ("learn", dict(memory="low", adam_8bit=True), {"cuda", "bnb"}),
    "lora": ("learn", dict(tune="lora"), set()),
    "cuda0": ("learn-cuda0", dict(memory="fast"), {"cuda"}),
    "resume-fast": ("resume", dict(memory="fast"), set()),
    "resume-low": ("resume", dict(memory="low"), set()),
    "resume-8bit": ("resume-8bit", dict(memory="fast"), {"cuda", "bnb"}),
    "compile": ("learn", dict(compile=True), {"cuda"}),  # learn refuses --compile off CUDA
    "compile-whole": ("learn-compile-whole", dict(compile=True, memory="fast"), {"cuda"}),
    # No step waits for the GPU: every training step runs under
    # torch.cuda.set_sync_debug_mode("error"), where a synchronising call raises.
    "sync-free": ("learn-sync-free", dict(memory="fast"), {"cuda"}),
    "sync-free-low": ("learn-sync-free", dict(memory="low"), {"cuda"}),
    # SDXL (the tiny SDXL): its conditioning, both handle tables, the fp32 VAE under
    # fp16, and LoRA with half-precision frozen weights (what auto picks on small cards).
    "sdxl": ("learn-sdxl", dict(memory="fast"), set()),
    "sdxl-fp16": ("learn-sdxl", dict(memory="fast", mixed_precision="fp16"), {"cuda"}),
    "sdxl-lora-low": ("learn-sdxl", dict(tune="lora", memory="low"), set()),
    # Every sampler at every sampling precision, blended editing with a multistep and a
    # sigma-space sampler, and `evaluate` (tiny CLIP, DINO, Grounding DINO and SAM).
    "sampling": ("sampling", dict(memory="fast", class_scheduler="euler"), set()),
    # FLUX.1 (the tiny FLUX dev): the transformer over packed latents, T5's handle rows,
    # the joint-attention loss, LoRA by default, and the flow sampler.
    "flux-lora": ("learn-flux", dict(), set()),
    "flux-lora-low": ("learn-flux", dict(memory="low"), set()),
    "flux-fp16": ("learn-flux", dict(mixed_precision="fp16"), {"cuda"}),
    "flux-full-low": ("learn-flux", dict(tune="full", memory="low"), set()),
    "flux-lora-nf4": ("learn-flux", dict(memory="low", quantize="nf4"), {"bnb"}),  # the frozen base in 4 bits
    "flux-resume": ("resume-flux", dict(memory="fast"), set()),
    "flux-sampling": ("sampling-flux", dict(memory="fast", background=True), set()),  # extract-bg needs <background>
}
DEFAULT_SKIP = ("compile", "compile-whole")  # their own process in gpu_check.sh, under its own time limit


class Smoke:
    def __init__(self, device: str, jsonl: Path | None):
        import torch

        from helpers import write_synthetic_scene
        from tinymodels import build_tiny_model

        self.torch = torch
        self.device = device
        self.cuda = device.startswith("cuda")
        self.jsonl = jsonl
        self.tmp = Path(tempfile.mkdtemp(prefix="cuda-smoke-"))
        os.environ["SCENEBREAK_HOME"] = str(self.tmp / "home")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = str(build_tiny_model(self.tmp / "tiny-sd"))
        self.image, red, blue = write_synthetic_scene(self.tmp / "inputs")
        self.masks = [red, blue]
        self.stopped = False
        self.has = set()
        if self.cuda:
            self.has.add("cuda")
        try:
            import bitsandbytes  # noqa: F401

            self.has.add("bnb")
        except Exception as error:  # ImportError, or a broken native library
            self.bnb_error = f"{type(error).__name__}: {error}"
        from scenebreak.device import cpu_has_bf16

        if self.cuda or cpu_has_bf16():
            self.has.add("bf16")

    # -- helpers -----------------------------------------------------------
    def emit(self, row: dict) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(line + "\n")

    def skip_reason(self, needs: set) -> str | None:
        if "cuda" in needs and "cuda" not in self.has:
            return "needs CUDA"
        if "bnb" in needs and "bnb" not in self.has:
            return f"bitsandbytes not carried ({getattr(self, 'bnb_error', 'not importable')})"
        if "bf16" in needs and "bf16" not in self.has:
            return "needs bf16 (CUDA, or a CPU with bf16 instructions)"
        return None

    def learn(self, name: str, settings: dict, device: str | None = None, **kwargs):
        from scenebreak import LearnConfig, learn
        from scenebreak.events import Message

        messages = kwargs.pop("messages", [])
        report = kwargs.pop("report", None)

        def collect(event):
            if isinstance(event, Message):
                messages.append(event)
            if report:
                report(event)

        base_model = kwargs.pop("base_model", None) or self.model
        return learn(self.image, self.masks, LearnConfig(**settings), base_model=base_model, device=device or self.device,
                     name=name, report=collect, **kwargs)

    def sdxl_model(self) -> str:
        """The tiny SDXL, built on first use."""
        if not getattr(self, "_sdxl", None):
            from tinymodels import build_tiny_sdxl

            self._sdxl = str(build_tiny_sdxl(self.tmp / "tiny-sdxl"))
        return self._sdxl

    def flux_model(self) -> str:
        """The tiny FLUX.1 dev, built on first use."""
        if not getattr(self, "_flux", None):
            from tinymodels import build_tiny_flux

            self._flux = str(build_tiny_flux(self.tmp / "tiny-flux"))
        return self._flux

    def generate(self, scene, name: str, device: str | None = None) -> dict:
        import numpy as np
        from PIL import Image

        from scenebreak import GenerateConfig, generate

        result = generate(scene, "<asset1> on the moon", GenerateConfig(num_images=2, steps=5, seed=0),
                          out_dir=self.tmp / "out" / name, device=device or self.device)
        with Image.open(result.images[0].path) as im:
            std = float(np.asarray(im, dtype=np.float32).std())
        # A NaN in half precision decodes to a black (constant) image.
        return {"images": len(result.images), "image_std": round(std, 2)}

    @staticmethod
    def plan_of(messages) -> str | None:
        return next((m.text for m in messages if m.text.lower().startswith("memory")), None) or (
            messages[0].text if messages else None)

    @staticmethod
    def resumed_at(messages) -> str | None:
        """"phase 2, step 2" from the "resuming NAME at phase 2, step 2" message."""
        return next((m.text.split(" at ", 1)[1] for m in messages if m.text.startswith("resuming") and " at " in m.text), None)

    def same_scene(self, a, b, components: tuple[str, ...]) -> dict:
        """How far scene `b` is from `a`: the handles' rows in every text encoder, and the
        weights of `components` (e.g. "unet", or "transformer_lora")."""
        from scenebreak import load_scene

        torch = self.torch
        sa, sb = load_scene(a, weights=True), load_scene(b, weights=True)
        pairs = list(zip(sa.handle_embeddings, sb.handle_embeddings))
        pairs_w = [(v, sb.weights[c][k]) for c in components for k, v in sa.weights[c].items()]
        handles = max((x - y).abs().max().item() for x, y in pairs)
        weights = max((x - y).abs().max().item() for x, y in pairs_w)
        close = all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in pairs + pairs_w)
        return {"max_diff_handles": handles, "max_diff_weights": weights, "same_as_uninterrupted": bool(close)}

    def run_sampling(self, name: str, settings: dict, how: str) -> dict:
        """Every sampler of the scene's family at every sampling precision, and blended
        editing with a multistep and a sigma-space sampler where the family has them
        (FLUX: its flow sampler, and extract-bg too); `evaluate` on SD."""
        import numpy as np
        from PIL import Image

        from helpers import write_synthetic_scene
        from scenebreak import BackgroundConfig, EditConfig, GenerateConfig, edit, extract_background, generate, load_scene
        from scenebreak.evaluation.evaluate import evaluate
        from scenebreak.config import EvaluateConfig
        from scenebreak.families import family_named
        from tinymodels import build_tiny_clip, build_tiny_dino, build_tiny_segmentation_models

        flux = how == "sampling-flux"
        scene = self.learn(name, {**SHORT, **settings}, base_model=self.flux_model() if flux else None).path
        samplers = family_named(load_scene(scene).meta["base_model"]["family"]).samplers
        stds = {}

        def std(path) -> float:
            with Image.open(path) as im:
                return round(float(np.asarray(im, dtype=np.float32).std()), 2)

        for scheduler in samplers:
            # (bf16 where this device has it: a CPU without bf16 instructions refuses it)
            for precision in ("auto", "bf16", "fp32") if "bf16" in self.has else ("auto", "fp32"):
                result = generate(scene, "<asset1> on the moon", GenerateConfig(
                    num_images=2, steps=4, seed=0, scheduler=scheduler, precision=precision),
                    out_dir=self.tmp / "out" / name / f"{scheduler}-{precision}", device=self.device)
                stds[f"{scheduler}-{precision}"] = std(result.images[0].path)
        image, red, _ = write_synthetic_scene(self.tmp / "edit-inputs")
        for scheduler in [s for s in ("dpm", "euler") if s in samplers] or samplers[:1]:
            result = edit(image, [(red, "a photo of <asset1>")], scene, EditConfig(steps=4, seed=0, scheduler=scheduler),
                          out_dir=self.tmp / "out" / name / f"edit-{scheduler}", device=self.device)
            stds[f"edit-{scheduler}"] = std(result.images[0].path)
        if flux:
            result = extract_background(scene, BackgroundConfig(steps=4, seed=0), variations=1,
                                        out_dir=self.tmp / "out" / name / "bg", device=self.device)
            for made in result.images:
                stds[f"extract-bg-{made.kind}"] = std(made.path)
            if self.cuda and "bnb" in self.has:
                # The base in NF4 with the adapters beside it, as a 24 GB card samples a
                # FLUX.1 LoRA scene (here forced: the tiny model fits anywhere).
                import scenebreak.sample.scene_models as scene_models

                real = scene_models.sampling_quantization
                scene_models.sampling_quantization = lambda *args, **kwargs: ("nf4", "forced by the smoke test")
                try:
                    result = generate(scene, "<asset1> on the moon", GenerateConfig(num_images=2, steps=4, seed=0),
                                      out_dir=self.tmp / "out" / name / "flow-nf4", device=self.device)
                finally:
                    scene_models.sampling_quantization = real
                stds["flow-nf4"] = std(result.images[0].path)
            row = {"image_std": stds}
            row["ok"] = bool(all(v > 0 for v in stds.values()))
            if not row["ok"]:
                row["error"] = "a constant (black) image"
            return row
        root = self.tmp / "metric-models"
        detector, segmenter = build_tiny_segmentation_models(root / "segmentation")
        config = EvaluateConfig(steps=2, clip_model=str(build_tiny_clip(root / "clip")), dino_model=str(build_tiny_dino(root / "dino")),
                                detector=str(detector), segmenter=str(segmenter))
        scored = evaluate(scene, ["a photo of <asset1>", "<asset1> and <asset2>"], config, out_dir=self.tmp / "out" / name / "eval",
                          device=self.device)
        overall = scored.to_dict()["overall"]
        row = {"image_std": stds, "evaluate_overall": overall}
        row["ok"] = bool(all(v > 0 for v in stds.values()) and overall.get("prompt_similarity") is not None)
        if not row["ok"]:
            row["error"] = "a constant (black) image, or evaluate scored nothing"
        return row

    # -- variants ----------------------------------------------------------
    def run_learn(self, name: str, settings: dict, how: str) -> dict:
        messages: list = []
        device = "cuda:0" if how == "learn-cuda0" else None
        base_model = self.sdxl_model() if how == "learn-sdxl" else self.flux_model() if how == "learn-flux" else None
        if how == "learn-sync-free":
            import scenebreak.train.trainer as trainer

            torch, real_step = self.torch, trainer.Trainer.train_step

            def step(trainer_self, phase, steps):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return real_step(trainer_self, phase, steps)
                finally:
                    torch.cuda.set_sync_debug_mode("default")

            trainer.Trainer.train_step = step
            try:
                result = self.learn(name, {**SHORT, **settings}, messages=messages)
            finally:
                trainer.Trainer.train_step = real_step
        elif how == "learn-compile-whole":
            whole = {"SCENEBREAK_COMPILE_MODE": "reduce-overhead", "SCENEBREAK_COMPILE_SCOPE": "whole"}
            before = {key: os.environ.get(key) for key in whole}
            os.environ.update(whole)
            try:
                result = self.learn(name, {**SHORT, **settings}, messages=messages)
            finally:
                for key, value in before.items():
                    os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        elif how == "learn-no-bnb":
            import scenebreak.train.optim

            real = scenebreak.train.optim.bitsandbytes_available
            scenebreak.train.optim.bitsandbytes_available = lambda: False  # memory.choose asks this at run time
            try:
                result = self.learn(name, {**SHORT, **settings}, messages=messages)
            finally:
                scenebreak.train.optim.bitsandbytes_available = real
        else:
            result = self.learn(name, {**SHORT, **settings}, device, messages=messages, base_model=base_model)
        loss = result.losses["phase2"]["loss_last"]
        row = {"loss_last": loss, "plan": self.plan_of(messages), **self.generate(result.path, name, device)}
        row["ok"] = bool(loss == loss and abs(loss) != float("inf") and row["image_std"] > 0)
        if not row["ok"]:
            row["error"] = "non-finite loss or a constant (black) image"
        return row

    def run_resume(self, name: str, settings: dict, how: str) -> dict:
        from helpers import Killed, kill_at  # stands for kill -9, as in tests/train/test_recovery.py

        torch = self.torch
        config = {**RESUME, **settings}
        flux = how == "resume-flux"
        base = self.flux_model() if flux else None
        # What phase 2 tuned: FLUX's usual LoRA (transformer and CLIP), or SD's UNet.
        components = ("transformer_lora", "text_encoder_lora") if flux else ("unet",)
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)  # so that two runs can be compared at all
        try:
            killed_messages: list = []
            try:
                self.learn(f"{name}-killed", config, report=kill_at(2, 3), base_model=base)
                return {"ok": False, "error": "the run was not killed"}
            except Killed:
                pass
            if how == "resume-8bit":
                resumed = self.learn(f"{name}-killed", {**config, "adam_8bit": True}, resume=True, messages=killed_messages)
                warned = any("optimizer changed" in m.text for m in killed_messages)
                row = {"resumed": resumed.resumed, "resumed_at": self.resumed_at(killed_messages), "warned_optimizer_changed": warned,
                       "loss_last": resumed.losses["phase2"]["loss_last"]}
                row["ok"] = bool((row["resumed_at"] or "").startswith("phase 2") and warned)
                if not row["ok"]:
                    row["error"] = "no 'optimizer changed' warning" if not warned else f"resumed at {row['resumed_at']}"
                return row
            resumed = self.learn(f"{name}-killed", config, resume=True, messages=killed_messages, base_model=base)
            straight = self.learn(f"{name}-straight", {**config, "checkpoint_every": 0}, base_model=base)
            row = {"resumed": resumed.resumed, "resumed_at": self.resumed_at(killed_messages),
                   **self.same_scene(straight.path, resumed.path, components)}
            in_phase_2 = (row["resumed_at"] or "").startswith("phase 2")
            row["ok"] = bool(in_phase_2 and row["same_as_uninterrupted"])
            if not row["ok"]:
                row["error"] = ("the resumed scene differs from the uninterrupted one" if in_phase_2
                                else f"not resumed in phase 2 (resumed at {row['resumed_at']})")
            return row
        finally:
            torch.use_deterministic_algorithms(deterministic)

    def run(self, name: str) -> dict:
        torch = self.torch
        how, settings, needs = VARIANTS[name]
        row = {"part": "smoke", "variant": name, "device": self.device}
        reason = self.skip_reason(needs)
        if reason:
            return {**row, "ok": None, "skipped": reason}
        dev = torch.device("cuda:0" if how == "learn-cuda0" else self.device)
        if self.cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        started = time.perf_counter()
        try:
            if how.startswith("resume"):
                row.update(self.run_resume(name, settings, how))
            elif how.startswith("sampling"):
                row.update(self.run_sampling(name, settings, how))
            else:
                row.update(self.run_learn(name, settings, how))
        except Exception as error:
            from scenebreak.errors import Interrupted

            traceback.print_exc()
            row.update(ok=False, error=f"{type(error).__name__}: {error}"[:400])
            if isinstance(error, Interrupted):  # SIGTERM: gpu_check.sh's time limit for this part
                row["error"] = "stopped by SIGTERM (the part's time limit) during this variant"
                self.stopped = True
        row["seconds"] = round(time.perf_counter() - started, 1)
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 3)
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
        return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="just these variants")
    parser.add_argument("--skip", nargs="+", default=list(DEFAULT_SKIP), help=f"default: {' '.join(DEFAULT_SKIP)}")
    parser.add_argument("--jsonl", type=Path, help="append each result line here as soon as it is known")
    args = parser.parse_args()
    # Deterministic cuBLAS for the resume comparisons (read when CUDA starts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu for the dry run)")
    smoke = Smoke(args.device, args.jsonl)
    names = args.only or [n for n in VARIANTS if n not in args.skip]
    failed = 0
    for name in names:
        print(f"--- smoke {name}", file=sys.stderr, flush=True)
        row = smoke.run(name)
        smoke.emit(row)
        failed += row["ok"] is False
        if smoke.stopped:
            break
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
