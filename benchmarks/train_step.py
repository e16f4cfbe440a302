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
parallel), so peak memory is its own. `--in-process` (the GPU check's mode) runs every
row in this one process instead: the model is built once on the CPU and each row
trains a fresh copy of it, moved to the GPU and freed after the row; the GPU's peak
memory is reset before each row, so it is still each row's own (the CPU's peak RSS is
not: that mode is for CUDA). `--tiny` swaps in the tiny test model, for dry runs.
`--sdxl` measures the SDXL base architecture instead (default 1024x1024; with
`--tiny`, the tests' tiny SDXL): phase 1, LoRA phase 2 (fast and low-memory) and
generation; the original code has no SDXL, so there is no baseline row.
`--flux` measures FLUX.1-dev's architecture (default 1024x1024; with `--tiny`, the
tests' tiny FLUX) the same way: phase 1 as auto picks it, LoRA phase 2 (fast and
low-memory), and one image per call at dev's 28 steps. Its 17 billion weights are made
on the meta device and given memory per row where the row runs (see `materialise`);
`--flux-depth 1 2` measures FLUX's real width at 1 and 2 of its 19 double-stream
blocks (twice as many single-stream ones, T5-XXL whole) and extrapolates to 19, for
machines that cannot hold the whole.

    python benchmarks/train_step.py                  # CPU, 512x512
    python benchmarks/train_step.py --device cuda    # on a GPU (bf16 autocast)
    python benchmarks/train_step.py --device cuda --in-process --steps 10   # the GPU check
    python benchmarks/train_step.py --sdxl --resolution 1024   # SDXL rows
    python benchmarks/train_step.py --flux --device cuda --in-process --steps 3 --gen-steps 3   # FLUX rows
    python benchmarks/train_step.py --flux --flux-depth 1 2 --resolution 512 --only defaults low   # CPU

Prints a table and writes it to benchmarks/results/train_step-<device>[-sdxl|-flux].md
(plus .json).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import itertools
import json
import os
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
sys.path.insert(0, str(HERE))  # step_profile, when imported from elsewhere

from figures import save_results  # noqa: E402


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
            if self.loss_layer:  # the loss reads the instance's handle columns of the full maps
                kept = per_example[self.store.example]
                columns = self.store.columns
                self.store.record(self.name, kept if columns is None else kept[:, :, columns])
            else:
                self.store.extra.append(per_example)  # kept alive like the original store
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def make_bf16_master_trainer(Trainer):
    """Issue 22's first idea, measured before learn does it: in phase 2 the UNet's weights
    are cast once to bf16 (autocast then has nothing to cast per step) and AdamW steps
    fp32 master copies, whose values are copied back into the bf16 weights after each
    step. The handle rows and the text encoder stay as they are (small). Phase 1 is
    unchanged (it trains only the handles)."""

    class MasterAdamW:
        """An optimizer over fp32 masters of some bf16 parameters: their gradients go to
        the masters (one at a time, freed as they go), the step updates the masters, the
        bf16 weights get the new values."""

        def __init__(self, inner, pairs):
            self.inner, self.pairs = inner, pairs
            self.param_groups = inner.param_groups

        @torch.no_grad()
        def step(self):
            for param, master in self.pairs:
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None
            self.inner.step()
            for param, master in self.pairs:
                param.copy_(master)

        def zero_grad(self, set_to_none: bool = True):
            self.inner.zero_grad(set_to_none=set_to_none)
            for param, master in self.pairs:
                param.grad = master.grad = None

        def state_dict(self):
            return self.inner.state_dict()

    class Bf16MasterTrainer(Trainer):
        def _optimizer(self, phase, groups):
            if phase != 2 or self.amp_dtype != torch.bfloat16:
                return super()._optimizer(phase, groups)
            unet = {id(p) for p in self.c.denoiser.parameters()}
            pairs, new_groups = [], []
            for group in groups:
                params = []
                for p in group["params"]:
                    if id(p) in unet and p.dtype == torch.float32:
                        master = p.detach().clone()
                        p.data = p.data.to(torch.bfloat16)
                        pairs.append((p, master))
                        params.append(master)
                    else:
                        params.append(p)
                new_groups.append({**group, "params": params})
            return MasterAdamW(super()._optimizer(phase, new_groups), pairs)

    return Bf16MasterTrainer


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
            unet = self.c.denoiser
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
    "scenebreak": {"memory": "fast", "tune": "full"},
    # The trainer puts the UNet in channels_last on CUDA (convolutions run NHWC); this row
    # keeps it contiguous, to see whether that measures faster (issue 22).
    "scenebreak fp32 contiguous": {"memory": "fast", "mixed_precision": "no", "tune": "full"},
    # The UNet in bf16 with fp32 master weights in the optimizer instead of fp32 weights
    # under bf16 autocast (make_bf16_master_trainer).
    "scenebreak bf16 weights": {"memory": "fast", "mixed_precision": "bf16", "tune": "full"},
    "scenebreak fp32": {"memory": "fast", "mixed_precision": "no", "tune": "full"},
    "scenebreak low-memory": {"memory": "low", "tune": "full"},
    "scenebreak low-memory fp32": {"memory": "low", "mixed_precision": "no", "tune": "full"},
    "scenebreak LoRA": {"tune": "lora"},
    "scenebreak LoRA low-memory": {"tune": "lora", "memory": "low"},
    "scenebreak LoRA fast": {"tune": "lora", "memory": "fast"},  # auto picks low for FLUX even on 141 GB
    "scenebreak LoRA low-memory nf4": {"tune": "lora", "memory": "low", "quantize": "nf4"},  # the 24 GB plan
    "scenebreak defaults": {},  # --memory auto --tune auto: what a user gets
    # --compile: the whole step compiled (train/compiling.py); the first, warm-up step pays
    # the compile, the timed ones do not.
    "scenebreak compiled": {"memory": "fast", "tune": "full", "compile": True},
    "scenebreak LoRA compiled": {"tune": "lora", "memory": "fast", "compile": True},
    # The same with CUDA graphs over the compiled forward and backward (torch.compile's
    # reduce-overhead mode, SCENEBREAK_COMPILE_MODE): the step is launch-bound at batch 2.
    "scenebreak compiled cudagraphs": {"memory": "fast", "tune": "full", "compile": True},
    # Only the UNet's repeated blocks compiled (regional compilation, SCENEBREAK_COMPILE_SCOPE):
    # a shorter compile (first_step_s) against the whole step's.
    "scenebreak compiled blocks": {"memory": "fast", "tune": "full", "compile": True},
    # The whole step under CUDA graphs: the update after the backward pass (clipping and a
    # capturable fused AdamW) compiled and captured too (SCENEBREAK_COMPILE_SCOPE=whole).
    "scenebreak compiled whole cudagraphs": {"memory": "fast", "tune": "full", "compile": True},
    "scenebreak LoRA compiled whole cudagraphs": {"tune": "lora", "memory": "fast", "compile": True},
    "original-style": {"memory": "fast", "mixed_precision": "no", "tune": "full"},
}
# Generation rows: (sampler, precision, images per pass: None = the device's) per kind.
# "DDIM 50 fp32" on the CPU is what `generate` did before samplers were a choice.
GENERATION = {
    "scenebreak": ("dpm", "auto", None),
    "scenebreak fp32": ("dpm", "fp32", None),
    "euler": ("euler", "auto", None),
    "DDIM 50": ("ddim", "auto", None),
    "DDIM 50 fp32": ("ddim", "fp32", None),
    "one image per call": ("dpm", "auto", 1),
    "batch 8": ("dpm", "auto", 8),  # issue 22's target: >= 8 images/s on an H200
    "batch 8 fused": ("dpm", "auto", 8),
    "batch 8 fused compiled": ("dpm", "auto", 8),
    "one image fused compiled": ("dpm", "auto", 1),  # issue 22's other target: <= 0.4 s for one image
}
# What generate could do on CUDA, measured before it does (issue 22): q, k and v (and the
# cross-attention's k and v) as one projection each; the denoiser compiled with CUDA
# graphs (torch.compile's reduce-overhead mode). (The UNet is channels_last on CUDA
# already, as generate has it; on the CPU the tweak puts it so.)
GENERATION_TWEAKS = {"batch 8 fused": ("fused qkv", "channels_last"),
                     "batch 8 fused compiled": ("fused qkv", "channels_last", "compiled"),
                     "one image fused compiled": ("fused qkv", "channels_last", "compiled")}


ROWS = [(1, "scenebreak"), (1, "scenebreak fp32"), (1, "original-style"),
        (2, "scenebreak fp32"), (2, "scenebreak fp32 contiguous"), (2, "scenebreak bf16 weights"), (2, "scenebreak low-memory"), (2, "scenebreak low-memory fp32"), (2, "scenebreak LoRA"),
        (2, "scenebreak LoRA low-memory"), (2, "original-style"),
        *(("generate", kind) for kind in GENERATION if "compiled" not in kind)]


# Phase 1 as a user gets it (on 24 GiB or a 16 GB card auto picks LoRA, and with it
# checkpointing and half-precision frozen weights); the original code has no SDXL.
SDXL_ROWS = [(1, "scenebreak defaults"), (2, "scenebreak LoRA"), (2, "scenebreak LoRA low-memory"), ("generate", "scenebreak")]

# FLUX.1 as a user gets it: LoRA, its usual tuning (full tuning of 12 billion weights only
# when asked for), fast, low-memory, and low-memory with the base in NF4 (what --quantize
# auto picks on a 24 GB card); and generation one image per call at dev's 28 steps.
FLUX_ROWS = [(1, "scenebreak defaults"), (2, "scenebreak LoRA fast"), (2, "scenebreak LoRA low-memory"),
             (2, "scenebreak LoRA low-memory nf4"), ("generate", "one image per call")]
# --compiled: the compiled step beside the plain rows (the GPU check's compile part).
COMPILED_ROWS = [
    # First what is likeliest to meet issue 22's targets (a GPU call often has time for a
    # few cold compiles only): the whole step under CUDA graphs.
    (2, "scenebreak compiled whole cudagraphs"), (1, "scenebreak compiled whole cudagraphs"),
    (2, "scenebreak LoRA compiled whole cudagraphs"),
    (2, "scenebreak compiled"), (1, "scenebreak compiled"), (2, "scenebreak LoRA compiled"),
    (1, "scenebreak compiled cudagraphs"), (2, "scenebreak compiled cudagraphs"),
    (1, "scenebreak compiled blocks"), (2, "scenebreak compiled blocks"),
    ("generate", "one image fused compiled"), ("generate", "batch 8 fused compiled")]
# The compile settings a kind runs with (read when the trainer compiles its step).
COMPILE_ENV = {"scenebreak compiled cudagraphs": {"SCENEBREAK_COMPILE_MODE": "reduce-overhead"},
               "scenebreak compiled blocks": {"SCENEBREAK_COMPILE_SCOPE": "blocks"},
               **{kind: {"SCENEBREAK_COMPILE_MODE": "reduce-overhead", "SCENEBREAK_COMPILE_SCOPE": "whole"}
                  for kind in ("scenebreak compiled whole cudagraphs", "scenebreak LoRA compiled whole cudagraphs")}}
CUDA_GRAPH_KINDS = ("scenebreak compiled cudagraphs", "scenebreak compiled whole cudagraphs",
                    "scenebreak LoRA compiled whole cudagraphs")
FLUX_DEPTH = 19  # FLUX.1's double-stream blocks (and twice as many single-stream ones)
GiB = 2**30


def random_model(tiny: bool = False, sdxl: bool = False):
    """The SD2.1-base architecture (or, `tiny`, the tests' tiny model; `sdxl`, SDXL
    base's) with random weights, CLIP-sized tokenizers, and a scratch folder."""
    from transformers import CLIPTokenizer

    from scenebreak.families import family_named
    from scenebreak.families.base_model import BaseModel, Components
    from tinymodels import (build_components, build_sdxl_components, sd21_base_configs, sdxl_configs, tiny_configs,
                            tiny_sdxl_configs, write_tiny_tokenizer)

    tmp = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tmp / "tok", vocab_size=None if tiny else 49408)
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok")
    name = ("random-tiny" if tiny else "random-sd21-base") if not sdxl else ("random-tiny-sdxl" if tiny else "random-sdxl-base")
    if sdxl:
        configs = tiny_sdxl_configs() if tiny else sdxl_configs()
        tokenizers = [tokenizer, CLIPTokenizer.from_pretrained(tmp / "tok", pad_token="!")]
        parts = build_sdxl_components(configs, tokenizers, calibrate=tiny)
        encoders = [parts["text_encoder"], parts["text_encoder_2"]]
        components = Components(parts["unet"], parts["vae"], encoders, tokenizers, configs["scheduler"],
                                BaseModel(name, None, None, "random", family="SDXL"), family_named("SDXL"))
    else:
        configs = tiny_configs() if tiny else sd21_base_configs()
        parts = build_components(configs, tokenizer)
        components = Components(parts["unet"], parts["vae"], [parts["text_encoder"]], [tokenizer], configs["scheduler"],
                                BaseModel(name, None, None, "random", family="SD 2.x"))
    for model in components.models():
        model.requires_grad_(False)
    return components, tmp


def random_flux(tiny: bool = False, depth: int | None = None):
    """FLUX.1-dev's architecture (or, `tiny`, the tests' tiny FLUX) with random weights, its
    tokenizers laid out as the real ones (CLIP's 49408 tokens, T5's 32128 rows, prompts
    padded to 512 T5 tokens), and a scratch folder. `depth`: that many double-stream
    blocks and twice as many single-stream ones (FLUX.1: 19 and 38), everything else
    whole. The transformer and T5 are made on the meta device (17 billion weights built
    in fp32 on the CPU would take 63 GiB and minutes) and get memory from `materialise`
    where and in the precision a row needs them; CLIP and the VAE are small and built as
    usual, in fp32 on the CPU. The tiny FLUX is built the same way, so the dry run goes
    through the GPU's code."""
    from scenebreak.families import family_named
    from scenebreak.families.base_model import BaseModel, Components
    from tinymodels import (FLUX_T5_TOKENS, build_flux_components, flux_dev_configs, tiny_flux_configs,
                            write_tiny_t5_tokenizer, write_tiny_tokenizer)

    family = family_named("FLUX.1 dev")
    tmp = Path(tempfile.mkdtemp())
    write_tiny_tokenizer(tmp / "tok", vocab_size=None if tiny else 49408)
    write_tiny_t5_tokenizer(tmp / "tok2", FLUX_T5_TOKENS["dev"])
    tokenizers = []
    for name, folder in zip(family.tokenizers, (tmp / "tok", tmp / "tok2")):
        cls, length = family.tokenizer_class(name)
        tokenizers.append(cls.from_pretrained(folder, model_max_length=length))  # as load_components
    configs = tiny_flux_configs("dev") if tiny else flux_dev_configs()
    if depth:
        configs["transformer"].update(num_layers=depth, num_single_layers=2 * depth)
    with torch.device("meta"):
        parts = build_flux_components(configs, tokenizers, calibrate=False)
    torch.manual_seed(0)  # from the configs tinymodels finished (CLIP's special ids)
    parts["text_encoder"] = type(parts["text_encoder"])(parts["text_encoder"].config)
    torch.manual_seed(0)
    parts["vae"] = type(parts["vae"]).from_config(parts["vae"].config)
    name = ("random-tiny-flux" if tiny else "random-flux-dev") + (f"-depth{depth}" if depth else "")
    components = Components(parts["transformer"], parts["vae"], [parts["text_encoder"], parts["text_encoder_2"]],
                            tokenizers, configs["scheduler"], BaseModel(name, None, None, "random", family=family.name),
                            family)
    for model in components.models():
        model.requires_grad_(False)
    return components, tmp


class DoesNotFit(Exception):
    """A row whose weights cannot be held where it runs: the row says so instead of running."""


def is_lazy(model) -> bool:
    return any(p.is_meta for p in model.parameters())


def lazy_bytes(components, element_size: int) -> int:
    return element_size * sum(p.numel() for m in components.models() if is_lazy(m) for p in m.parameters())


def random_init_(model, seed: int = 0) -> None:
    """PyTorch's default initialisation, as the models get when built normally, done on
    the weights' own device: Linear weights and biases U(+-1/sqrt(fan_in)), embeddings
    N(0, 1), norms' weights 1 and biases 0. A module of another kind is an error, not
    garbage memory left in place."""
    generator = torch.Generator(next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, torch.nn.Linear):
                bound = module.in_features ** -0.5
                for param in own.values():
                    param.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, torch.nn.Embedding):
                module.weight.normal_(generator=generator)
            elif "Norm" in type(module).__name__:
                for key, param in own.items():
                    param.fill_(1.0 if key == "weight" else 0.0)
            else:
                raise TypeError(f"random_init_: no initialisation for {type(module).__name__} ({name})")


def materialise(components, device, dtype, what: str) -> None:
    """Give the lazy models (random_flux) memory on `device` in `dtype`, with random
    weights; DoesNotFit when they would take more than 90% of the memory free there.
    Tied weights (T5's token table) stay tied."""
    from scenebreak.train.memory import available_bytes

    lazy = [m for m in components.models() if is_lazy(m)]
    if not lazy:
        return
    need = lazy_bytes(components, torch.empty(0, dtype=dtype).element_size())
    free = available_bytes(device)
    if need > 0.9 * free:
        raise DoesNotFit(f"{what}: {need / GiB:.1f} GiB of weights in {str(dtype).replace('torch.', '')}, "
                         f"{free / GiB:.1f} GiB free on the {device.type}")
    for seed, model in enumerate(lazy):
        ties = {}
        for key, param in model.named_parameters(remove_duplicate=False):
            ties.setdefault(id(param), []).append(key)
        torch.nn.Module.to(model, dtype=dtype).to_empty(device=device.torch)  # (diffusers' own .to warns on a cast)
        for first, *others in ties.values():
            for key in others:
                owner, _, attr = key.rpartition(".")
                setattr(model.get_submodule(owner), attr, model.get_parameter(first))
        random_init_(model, seed)


def materialise_for_training(components, device, plan, amp_dtype) -> str | None:
    """The lazy models for a training row, and how they were built: in fp32 as `learn`
    loads every base model (the trainer then moves them and casts the frozen weights to
    half precision where the plan says so), where that fits; else directly in the
    precision the trainer keeps frozen weights in, the state it would reach before its
    first step (and the row says fp32 would not fit)."""
    from scenebreak.device import precision_name
    from scenebreak.train.memory import available_bytes

    if not any(is_lazy(m) for m in components.models()):
        return None
    fp32, free = lazy_bytes(components, 4), available_bytes(device)
    if fp32 <= 0.9 * free or not (plan.half_frozen and amp_dtype is not None):
        materialise(components, device, torch.float32, "the weights in fp32, as learn loads them")
        return "fp32, as learn loads them"
    materialise(components, device, amp_dtype, "the frozen weights as the trainer keeps them")
    return (f"{precision_name(amp_dtype)}, as the trainer keeps frozen weights (fp32, as learn loads them, "
            f"would need {fp32 / GiB:.1f} GiB: {free / GiB:.1f} GiB free)")


class ModelSource:
    """Where each row's model comes from: a fresh build (one row per process), or with
    `reuse` a copy of one build kept on the CPU (every row in one process). Training
    changes the model in place (new token rows, adapters, tuned weights, the move to
    the GPU), so every row gets its own copy; building SD2.1 takes far longer."""

    def __init__(self, tiny: bool = False, reuse: bool = False, sdxl: bool = False, flux: bool = False,
                 depth: int | None = None):
        self.tiny, self.reuse, self.sdxl, self.template = tiny, reuse, sdxl, None
        self.flux, self.depth = flux, depth

    def build(self):
        if self.flux:  # lazy: copying it copies no weights (they get memory per row)
            return random_flux(self.tiny, self.depth)
        return random_model(self.tiny, self.sdxl)

    def get(self):
        if not self.reuse:
            return self.build()
        if self.template is None:
            started = time.perf_counter()
            self.template = self.build()
            print(f"model built in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        components, tmp = self.template
        return copy.deepcopy(components), tmp


def start_row(device) -> dict:
    """Before a row: free what the last one left, reset the peak, and say what is still
    allocated (a fresh process starts at 0)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device.torch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device.torch)
        return {"resident_at_start_gib": torch.cuda.memory_allocated(device.torch) / 2**30}
    return {}


def peak(device, in_process: bool = False) -> dict:
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated(device.torch) / 2**30,
                "peak_what": "torch.cuda.max_memory_allocated (reset before each row)"}
    what = "peak RSS of the process" + (" (one process for every row: not each row's own)" if in_process else "")
    return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak_what": what}


def apply_generation_tweaks(pipe, tweaks) -> None:
    denoiser_name = "unet" if hasattr(pipe, "unet") else "transformer"
    denoiser = getattr(pipe, denoiser_name)
    if "fused qkv" in tweaks:
        denoiser.fuse_qkv_projections()
    if "channels_last" in tweaks and denoiser_name == "unet":
        denoiser.to(memory_format=torch.channels_last)
    if "compiled" in tweaks:
        setattr(pipe, denoiser_name, torch.compile(denoiser, mode="reduce-overhead", fullgraph=True))


def measure_generation(kind: str, steps: int, device_name: str, resolution: int, source: ModelSource | None = None) -> dict:
    """Seconds per image of `generate` with the row's sampler and precision (the
    family's guidance): `steps` timed denoising steps, scaled to the sampler's step
    count, plus one timed VAE decode per image; batched as the device's default, or
    one image per call."""
    from scenebreak.device import choose_device, precision_name
    from scenebreak.sample.pipeline import decode_latents, make_pipeline, sample

    scheduler, precision, batch = GENERATION[kind]
    device = choose_device(device_name)
    source = source or ModelSource()
    components, _ = source.get()
    dtype, autocast_dtype = device.sampling_precision(precision)
    c = components
    if scheduler not in c.family.samplers:  # FLUX samples with its own flow sampler only
        scheduler = c.family.samplers[0]
    # Lazy weights (FLUX) are made where generate holds them: on the device, in its dtype.
    materialise(c, device, dtype, "generate's weights")
    for model in c.models():
        model.to(device.torch, dtype)
    c.vae.to(c.family.sampling_vae_dtype(c.vae, dtype))  # as scene_models does (SDXL's VAE overflows in fp16)
    if device.type == "cuda":  # as open_pipeline does
        c.denoiser.to(memory_format=torch.channels_last)
    pipe = make_pipeline(c.family, c.denoiser, c.vae, c.text_encoders, c.tokenizers, c.scheduler_config, scheduler)
    tweaks = GENERATION_TWEAKS.get(kind, ())
    apply_generation_tweaks(pipe, tweaks)
    batch = batch or (4 if device.type == "cuda" else 2)
    seeds = list(range(batch))
    guidance = c.family.guidance
    autocast = lambda: device.autocast(autocast_dtype)  # noqa: E731
    # Warm-up (CUDA graphs: a plain call, then recording, then replays).
    sample(pipe, c.family, "a photo", seeds, steps=3 if "compiled" in tweaks else 1, guidance=guidance,
           resolution=resolution, autocast=autocast())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device.torch)
    # Denoising steps alone (latents out), then one decode: the decode happens once per image.
    latents_shape = (batch, pipe.vae.config.latent_channels, resolution // pipe.vae_scale_factor,
                     resolution // pipe.vae_scale_factor)
    device.synchronize()
    started = time.perf_counter()
    with torch.inference_mode(), autocast():
        latents = pipe(prompt=["a photo"] * batch, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                       width=resolution, generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                       output_type="latent", **c.family.pipeline_kwargs()).images
    device.synchronize()
    per_step = (time.perf_counter() - started) / steps
    started = time.perf_counter()
    decode_latents(pipe.vae, torch.randn(latents_shape).to(latents.device, latents.dtype))
    device.synchronize()
    decode = (time.perf_counter() - started) / batch
    total_steps = c.family.sampler_steps(scheduler)
    per_image = per_step * total_steps / batch + decode
    return {"kind": kind, "phase": "generate", "scheduler": scheduler, "steps": total_steps, "batch": batch,
            "dtype": str(dtype).replace("torch.", ""), "precision": precision_name(autocast_dtype or dtype),
            "s_per_step": per_step, "decode_s_per_image": decode, "s_per_image": per_image,
            "images_per_s": 1 / per_image, "tweaks": list(tweaks), **peak(device, source.reuse)}


def measure(kind: str, phase: int, steps: int, device_name: str, resolution: int, source: ModelSource | None = None,
            profile_steps: int = 0) -> dict:
    """One measurement, in this process: build (or copy), warm up one step, time `steps`;
    then, with `profile_steps`, that many more under torch.profiler (step_profile.py:
    the row's "profile")."""
    import numpy as np
    from PIL import Image

    from scenebreak.config import LearnConfig
    from scenebreak.device import choose_device, precision_name
    from scenebreak.train.memory import choose as choose_memory
    from scenebreak.train.tokens import add_handles
    from scenebreak.train.trainer import Trainer, TrainInputs

    device = choose_device(device_name)
    source = source or ModelSource()
    components, tmp = source.get()
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
    # CUDA graph trees run a step plain, then record, then replay: two more warm-up steps.
    warm = 3 if kind in CUDA_GRAPH_KINDS else 1
    steps1, steps2 = (steps + warm + profile_steps, 0) if phase == 1 else (0, steps + warm + profile_steps)
    config = LearnConfig(steps1=steps1, steps2=steps2, num_class_images=2, resolution=resolution, **VARIANTS[kind])
    amp_dtype = device.train_dtype(config.mixed_precision)
    plan = choose_memory(config, components, device, resolution, amp_dtype)  # the switches --memory low turns on
    config = dataclasses.replace(config, tune=plan.tune)
    built = materialise_for_training(components, device, plan, amp_dtype)  # FLUX's lazy weights
    # As learn: every text encoder gets the handles, and the trainer is given their ids in
    # the tokenizer the attention loss reads (FLUX: T5's).
    ids = [add_handles(tok, te, tokens) for tok, te in zip(components.tokenizers, components.text_encoders)]
    ids = ids[components.family.attention_text]
    cls = (make_baseline_trainer(Trainer) if kind == "original-style"
           else make_bf16_master_trainer(Trainer) if kind == "scenebreak bf16 weights" else Trainer)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device.torch)
    settings = COMPILE_ENV.get(kind, {})
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        trainer = cls(components, TrainInputs(image, masks, ids, class_paths), config, device, tokens, plan=plan,
                      amp_dtype=amp_dtype)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if kind.endswith("contiguous"):
        components.denoiser.to(memory_format=torch.contiguous_format)
    setup_peak = None
    if device.type == "cuda":  # the set-up's peak (the move, the casts, the cached latents), then the steps' own
        torch.cuda.synchronize(device.torch)
        setup_peak = torch.cuda.max_memory_allocated(device.torch) / GiB
        torch.cuda.reset_peak_memory_stats(device.torch)
    times = []
    run = trainer.run()
    started = time.perf_counter()
    for _record in itertools.islice(run, warm + steps):
        device.synchronize()
        now = time.perf_counter()
        times.append(now - started)
        started = now
    profile = None
    if profile_steps:  # after the timed steps, which the profiler would slow
        from step_profile import profile_steps as profiled

        profile = profiled(run, profile_steps, device)
    for _record in run:  # the end of the phase (nothing left to time)
        pass
    timed = times[warm:]  # the first step warms up (allocator, kernels, lazy caches)
    row = {"kind": kind, "phase": phase, "precision": precision_name(amp_dtype), "memory": plan.policy, "tune": plan.tune,
           "half_frozen": plan.half_frozen, "quantize": plan.quantize, "steps_timed": len(timed),
           "s_per_step": sum(timed) / len(timed), "first_step_s": times[0], **peak(device, source.reuse)}
    if setup_peak is not None:
        row.update(setup_peak_gib=setup_peak, steps_peak_gib=row["peak_gib"], peak_gib=max(setup_peak, row["peak_gib"]),
                   peak_what="torch.cuda.max_memory_allocated (reset before each row): set-up and steps")
    if built:
        row["built"] = built
    if profile is not None:
        row["profile"] = profile
    return row


def cpu_name() -> str:
    """The CPU's model name (as lscpu reports it, from /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device_name: str) -> str:
    if device_name.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (--tiny: 64; SDXL and FLUX: 1024)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--baseline-memory-limit-gib", type=float, default=None,
                        help="address-space cap for the baseline's processes (CPU), so an out-of-memory baseline fails fast instead of swapping")
    parser.add_argument("--gen-steps", type=int, default=3, help="timed denoising steps per generation row")
    parser.add_argument("--compiled", action="store_true",
                        help="also the rows with the whole step compiled (learn --compile; CUDA: a minute or two each)")
    parser.add_argument("--only", nargs="+", help="only the rows whose 'PHASE KIND' contains one of these words, e.g. LoRA generate")
    parser.add_argument("--with-fast-bf16", action="store_true",
                        help="also phase 2 fast with bf16 autocast (on CUDA it is the default row; on a 24 GiB CPU machine it does not fit)")
    parser.add_argument("--in-process", action="store_true",
                        help="every row in this process, from one model build (copied per row): no model build and "
                        "start-up per row; peak GPU memory is still each row's own")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny model instead of SD2.1-base (dry runs)")
    parser.add_argument("--sdxl", action="store_true", help="the SDXL base architecture (with --tiny: the tiny SDXL)")
    parser.add_argument("--flux", action="store_true", help="the FLUX.1-dev architecture (with --tiny: the tiny FLUX)")
    parser.add_argument("--flux-depth", type=int, nargs="+", metavar="N",
                        help=f"--flux at N of its {FLUX_DEPTH} double-stream blocks (2N single-stream), real width; "
                        f"two depths: also the rows at {FLUX_DEPTH}, extrapolated")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results",
                        help="where the table goes (default benchmarks/results)")
    parser.add_argument("--jsonl", type=Path, help="also append each row here as soon as it is measured")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "PHASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flux_depth and (not args.flux or len(args.flux_depth) > 2 or min(args.flux_depth) < 1
                            or len(set(args.flux_depth)) != len(args.flux_depth)):
        parser.error("--flux-depth takes one or two different depths of at least 1, with --flux")
    large = args.sdxl or args.flux
    default_resolution = (256 if args.sdxl else 64) if args.tiny else (1024 if large else 512)
    if args.resolution is None:
        args.resolution = default_resolution
    depths = sorted(args.flux_depth) if args.flux_depth else [None]

    if args.one:
        if args.baseline_memory_limit_gib:
            limit = int(args.baseline_memory_limit_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        kind, phase = args.one
        source = ModelSource(args.tiny, sdxl=args.sdxl, flux=args.flux, depth=depths[0])
        try:
            if phase == "generate":
                row = measure_generation(kind, args.gen_steps, args.device, args.resolution, source)
            else:
                row = measure(kind, int(phase), args.steps, args.device, args.resolution, source)
        except DoesNotFit as error:
            row = {"kind": kind, "phase": phase if phase == "generate" else int(phase), "error": f"does not fit: {error}"}
        print(json.dumps(row))
        return

    if args.flux:
        args.flux_arch = flux_sizes(args.tiny)
        refuse_flux_that_cannot_fit(args, depths[-1])

    command = f"python benchmarks/train_step.py --device {args.device}"
    for flag, value, default in (("--steps", args.steps, 2), ("--gen-steps", args.gen_steps, 3),
                                 ("--resolution", args.resolution, default_resolution),
                                 ("--baseline-memory-limit-gib", args.baseline_memory_limit_gib, None)):
        if value != default:
            command += f" {flag} {value}"
    command += "".join(f" --{flag}" for flag in ("in-process", "tiny", "sdxl", "flux", "compiled") if getattr(args, flag.replace("-", "_")))
    if args.flux_depth:
        command += " --flux-depth " + " ".join(map(str, depths))
    out = args.results_dir
    stem = (f"train_step-{args.device.split(':')[0]}" + ("-sdxl" if args.sdxl else "") + ("-flux" if args.flux else "")
            + ("-tiny" if args.tiny else ""))
    table_rows = FLUX_ROWS if args.flux else SDXL_ROWS if args.sdxl else ROWS
    if args.compiled:
        table_rows = table_rows + COMPILED_ROWS
    saved_rows = []
    if args.only and (out / f"{stem}.json").exists():
        # Some rows measured again: they replace their old selves in the saved table.
        saved = json.loads((out / f"{stem}.json").read_text())
        saved_rows = saved["rows"]
        command = saved.get("command", command) + f"; rows re-measured with --only {' '.join(args.only)}"

    def table() -> list[dict]:
        merged = merge(saved_rows, rows, table_rows)
        return with_extrapolation(merged, depths) if args.flux else merged

    rows = []
    plan = list(table_rows)
    if not large and (args.device.startswith("cuda") or args.with_fast_bf16):
        plan.insert(plan.index((2, "scenebreak fp32")), (2, "scenebreak"))
    plan = [(phase, kind, depth) for depth in depths for phase, kind in plan
            if not args.only or any(word in f"{phase} {kind}" for word in args.only)]
    sources = None
    if args.in_process:
        from scenebreak.device import choose_device

        device = choose_device(args.device)
        sources = {depth: ModelSource(args.tiny, reuse=True, sdxl=args.sdxl, flux=args.flux, depth=depth) for depth in depths}
    for phase, kind, depth in plan:
        print(f"measuring {kind}, phase {phase}{f', depth {depth}' if depth else ''} ...", file=sys.stderr, flush=True)
        if sources:
            from scenebreak.device import tf32_settings_kept

            # A fresh process starts with the default matmul settings; the trainer changes them
            # (kept and put back through the settings it uses: mixing torch's two APIs fails).
            with tf32_settings_kept():
                row = measure_here(kind, phase, args, sources[depth], device)
        else:
            row = measure_in_subprocess(kind, phase, args, depth)
        rows.append({**row, "depth": depth} if depth else row)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"part": "train_step", "table": stem, **rows[-1]}) + "\n")
        # The table so far, after every row: a run stopped part-way keeps what it measured.
        write_table(out, stem, table(), args, command, final=False)
    print(write_table(out, stem, table(), args, command, final=True))


def flux_sizes(tiny: bool) -> dict:
    """Weights per part of the FLUX architecture measured (the whole, from a build on the
    meta device: no memory), in billions."""
    components, _ = random_flux(tiny)
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    return {"transformer": count(components.denoiser), "t5": count(components.text_encoders[1]),
            "clip": count(components.text_encoders[0]), "vae": count(components.vae),
            "double_blocks": len(components.denoiser.transformer_blocks),
            "single_blocks": len(components.denoiser.single_transformer_blocks)}


def refuse_flux_that_cannot_fit(args, depth: int | None) -> None:
    """One line and exit 1 where even the least any FLUX row holds (the transformer and
    T5 in bf16, CLIP and the VAE in fp32) does not fit in the free memory: a CPU machine
    of 24 GB cannot hold FLUX.1-dev (about 63 GiB in fp32, as learn loads it)."""
    from scenebreak.device import choose_device
    from scenebreak.train.memory import available_bytes

    if args.tiny:
        return
    sizes = dict(args.flux_arch)
    fp32 = flux_bytes(sizes)[0]
    if depth:  # the transformer's blocks are nearly all of it: scaled by the depth kept
        sizes["transformer"] = sizes["transformer"] * depth / sizes["double_blocks"]
    least = flux_bytes(sizes)[1]
    free = available_bytes(choose_device(args.device))
    if least > 0.9 * free:
        what = "FLUX.1-dev's architecture" + (f" at depth {depth}" if depth else "")
        sys.exit(f"{what} does not fit this machine: its weights take {least / GiB:.1f} GiB even with the transformer "
                 f"and T5 in bf16 ({fp32 / GiB:.1f} GiB for the whole in fp32, as learn loads it), and "
                 f"{free / GiB:.1f} GiB is free: FLUX needs a GPU (or measure its real width at a reduced depth: "
                 f"--flux-depth 1 2)")


def extrapolate(rows: list[dict], depths: list, to: int = FLUX_DEPTH) -> list[dict]:
    """The rows at FLUX's whole depth from the same rows measured at two depths d1 < d2:
    each figure is taken as affine in the depth (one double-stream block and two
    single-stream ones are one unit of work and memory; T5, CLIP, the VAE, the latents
    and the optimizer's handful of other tensors do not change with it), so
    f(19) = f(d1) + (f(d2) - f(d1)) * (19 - d1) / (d2 - d1)."""
    if len(depths) != 2:
        return []
    d1, d2 = sorted(depths)
    measured = {(str(r["phase"]), r["kind"], r.get("depth")): r for r in rows if "error" not in r and not r.get("extrapolated")}
    out = []
    for (phase, kind, depth), a in measured.items():
        b = measured.get((phase, kind, d2))
        if depth != d1 or b is None:
            continue
        row = {k: v for k, v in b.items() if k not in EXTRAPOLATED and k != "built"}
        for key in EXTRAPOLATED:
            if key in a and key in b:
                row[key] = a[key] + (b[key] - a[key]) * (to - d1) / (d2 - d1)
        if "s_per_image" in row:
            row["images_per_s"] = 1 / row["s_per_image"]
        row.update(depth=to, extrapolated=True, from_depths=[d1, d2])
        out.append(row)
    return out


EXTRAPOLATED = ("s_per_step", "first_step_s", "s_per_image", "decode_s_per_image", "peak_gib", "setup_peak_gib",
                "steps_peak_gib")


def with_extrapolation(rows: list[dict], depths: list) -> list[dict]:
    measured = [r for r in rows if not r.get("extrapolated")]
    return measured + extrapolate(measured, depths)


def measure_here(kind: str, phase, args, source: ModelSource, device) -> dict:
    """One row in this process (--in-process); a failure (out of memory, say) is the row's."""
    row_start = start_row(device)
    try:
        if phase == "generate":
            row = measure_generation(kind, args.gen_steps, args.device, args.resolution, source)
        else:
            row = measure(kind, phase, args.steps, args.device, args.resolution, source)
    except DoesNotFit as error:
        row = {"kind": kind, "phase": phase, "error": f"does not fit: {error}"}
    except Exception as error:
        import traceback

        traceback.print_exc()
        oom = isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()
        row = {"kind": kind, "phase": phase, "error": "out of memory" if oom else f"{type(error).__name__}: {error}"[:200]}
    return {**row, **row_start}


def measure_in_subprocess(kind: str, phase, args, depth: int | None = None) -> dict:
    """One row in a fresh process: its peak memory is its own (CPU too)."""
    baseline = kind == "original-style"
    cmd = [sys.executable, __file__, "--one", kind, str(phase), "--device", args.device,
           "--resolution", str(args.resolution), "--steps", str(args.steps), "--gen-steps", str(args.gen_steps)]
    cmd += [f"--{flag}" for flag in ("tiny", "sdxl", "flux") if getattr(args, flag)]
    if depth:
        cmd += ["--flux-depth", str(depth)]
    if args.baseline_memory_limit_gib and baseline:
        cmd += ["--baseline-memory-limit-gib", str(args.baseline_memory_limit_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    tail = (proc.stderr.strip().splitlines() or ["killed"])[-1]
    oom = "memory" in proc.stderr.lower() or proc.returncode in (-9, 137)
    limit = f" (> {args.baseline_memory_limit_gib} GiB cap)" if args.baseline_memory_limit_gib and baseline else ""
    return {"kind": kind, "phase": phase, "error": f"out of memory{limit}" if oom else tail[:200]}


def merge(saved: list[dict], rows: list[dict], table_rows: list = ROWS) -> list[dict]:
    """Rows measured now replace their saved selves (--only), in the table's order (by
    depth within a row of FLUX's); extrapolated rows are made again from the result."""
    if not saved:
        return rows
    key = lambda r: (str(r["phase"]), r["kind"], r.get("depth"))  # noqa: E731
    fresh = {key(r) for r in rows}
    order = {(str(phase), kind): i for i, (phase, kind) in enumerate(table_rows)}
    kept = [r for r in saved if key(r) not in fresh and not r.get("extrapolated")]
    return sorted(kept + rows, key=lambda r: (order.get((str(r["phase"]), r["kind"]), len(order)), r.get("depth") or 0))


def write_table(out: Path, stem: str, rows: list[dict], args, command: str, final: bool) -> str:
    table = (render_flux if getattr(args, "flux", False) else render)(rows, args, command)
    if not final:
        table += "\n\n(incomplete: the run is still going, or stopped before its last row)"
    extra = {"architecture": args.flux_arch} if getattr(args, "flux_arch", None) else {}
    save_results(out, stem, table, {"machine": machine(args.device), "command": command, **extra, "rows": rows,
                                    "complete": final})
    return table


def sdxl_defaults_note(rows: list[dict], device: str, model: str = "SDXL") -> str:
    """What `--memory auto --tune auto` chose for the 'scenebreak defaults' row, from the row itself."""
    row = next((r for r in rows if r["kind"] == "scenebreak defaults" and "memory" in r), None)
    chose = "not measured"
    if row:
        chose = f"chose `--tune {row['tune']} --memory {row['memory']}`"
        if row.get("half_frozen"):
            chose += f" with frozen weights in {row['precision']}"
    if device.startswith("cuda"):
        generation = "fp16 on CUDA"
    else:  # as Device.sampling_precision has it
        from scenebreak.device import cpu_has_bf16

        generation = ("fp32 weights under bf16 autocast on this CPU" if cpu_has_bf16()
                      else "fp32 on this CPU (it has no bf16 instructions)")
    return (f"- {model}: 'scenebreak defaults' is `--memory auto --tune auto`, which on this machine {chose}; "
            f"generation runs in {generation}")


def label(row: dict, whole: int = FLUX_DEPTH) -> str:
    """A FLUX row's depth in double-stream blocks (`whole`: the model's own)."""
    if row.get("extrapolated"):
        return f"{row['depth']}, extrapolated from {' and '.join(map(str, row['from_depths']))}"
    return str(row.get("depth") or whole)


def gib(row: dict, key: str) -> str:
    return f"{row[key]:.1f}" if key in row else ""


def render_flux(rows: list[dict], args, command: str) -> str:
    """The FLUX table: the rows of SDXL's, with the depth, how the weights were built, and
    on CUDA the set-up's peak beside the steps'."""
    sizes = getattr(args, "flux_arch", None) or {}
    billions = lambda *keys: sum(sizes.get(k, 0) for k in keys) / 1e9  # noqa: E731
    fp32, half = flux_bytes(sizes) if sizes else (0, 0)
    whole = sizes.get("double_blocks", FLUX_DEPTH)
    cpu = not args.device.startswith("cuda")
    depths = sorted({r["depth"] for r in rows if r.get("depth") and not r.get("extrapolated")})
    model = ("the tests' tiny FLUX (a dry run, not a benchmark)" if args.tiny else
             "FLUX.1-dev architecture (19 double-stream and 38 single-stream blocks, 3072 wide; T5-XXL's encoder, CLIP-L, "
             "the 16-channel VAE)")
    lines = [
        "# Training step and generation: FLUX.1-dev",
        "",
        f"- machine: {machine(args.device)}; device: {args.device}; torch {torch.__version__}",
        f"- model: {model}, random weights"
        + (f": {billions('transformer', 't5', 'clip', 'vae'):.2f} billion (transformer {billions('transformer'):.2f}, "
           f"T5 {billions('t5'):.2f}, CLIP {billions('clip'):.2f}, VAE {billions('vae'):.2f}), "
           f"{fp32 / GiB:.1f} GiB in fp32 (as learn loads a base model), {half / GiB:.1f} GiB with the transformer and "
           "T5 in bf16" if sizes and not args.tiny else "")
        + f"; {args.resolution}x{args.resolution}; T5 prompts padded to 512 tokens; training batch 2 (instance + class "
        "image) in phase 2, the instance alone in phase 1",
    ]
    if depths:
        lines.append(
            f"- depth: its real width at {' and '.join(map(str, depths))} of its {FLUX_DEPTH} double-stream blocks (twice as "
            "many single-stream ones; T5, CLIP and the VAE whole)"
            + (f"; the rows at {FLUX_DEPTH} are extrapolated, each figure taken as affine in the depth: "
               f"f({FLUX_DEPTH}) = f(d1) + (f(d2) - f(d1)) x ({FLUX_DEPTH} - d1) / (d2 - d1), since one double-stream block "
               "and two single-stream ones are one unit of work and memory and the rest does not change with the depth"
               if len(depths) == 2 else ""))
    lines += [
        "- weights: the transformer and T5 are made on the meta device and given memory for each row where it runs, "
        "with PyTorch's default random initialisation: for training in fp32 as learn loads them (the trainer then "
        "casts the frozen weights to half precision, as it does for LoRA on a GPU), or, where fp32 does not fit, "
        "directly in the precision the trainer keeps them in (column 'weights'); for generation in the dtype generate "
        "holds them in",
        f"- training: {args.steps} timed steps after 1 warm-up step: scenebreak's Trainer with the memory plan "
        "memory.choose makes for this device, as learn runs it; LoRA: `--tune lora --rank 32` on the transformer's "
        "attention and MLPs and on CLIP, T5 training only its handle rows; low-memory: `--memory low` (gradient "
        "checkpointing, optimizer step inside the backward pass, 8-bit AdamW on CUDA when bitsandbytes is installed)",
        sdxl_defaults_note(rows, args.device, "FLUX"),
        f"- generation: one image per call, FLUX's flow sampler at dev's 28 steps with its embedded guidance 3.5 (one "
        f"transformer pass per step); {args.gen_steps} timed steps scaled to 28, plus one timed VAE decode",
        f"- date: {time.strftime('%Y-%m-%d')}; command: `{command}`",
        "",
        "| phase | code | depth | precision | memory plan | weights | s/step | peak GiB | set-up peak GiB | steps peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase in (1, 2):
        for row in (r for r in rows if r["phase"] == phase):
            if "error" in row:
                lines.append(f"| {phase} | {row['kind']} | {label(row, whole)} | | | | {row['error']} | | | |")
                continue
            plan = f"{row['memory']}, {row['tune']}" + (
                f", base in {row['quantize']}" if row.get("quantize", "none") != "none"
                else ", frozen in half" if row.get("half_frozen") else "")
            lines.append(f"| {phase} | {row['kind']} | {label(row, whole)} | {row.get('precision', '')} | {plan} | "
                         f"{row.get('built', '')} | {row['s_per_step']:.2f} | {row['peak_gib']:.1f} | "
                         f"{gib(row, 'setup_peak_gib')} | {gib(row, 'steps_peak_gib')} |")
    generation = [r for r in rows if r["phase"] == "generate"]
    if generation:
        lines += ["", "| generate | depth | sampler | steps | images per pass | weights | precision | s/step | s/image | "
                  "peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in generation:
            if "error" in row:
                lines.append(f"| {row['kind']} | {label(row, whole)} | {row['error']} | | | | | | | |")
                continue
            lines.append(f"| {row['kind']} | {label(row, whole)} | {row['scheduler']} | {row['steps']} | {row['batch']} | "
                         f"{row['dtype']} | {row.get('precision', '')} | {row['s_per_step']:.2f} | {row['s_per_image']:.2f} | "
                         f"{row['peak_gib']:.1f} |")
    what = next((r["peak_what"] for r in rows if "peak_what" in r), "peak")
    lines += ["", f"Peak memory is the {what}, which includes the model weights and optimizer state."]
    if cpu and not args.tiny and sizes:
        lines += ["", flux_on_cpu(rows, sizes)]
    return "\n".join(lines)


def flux_bytes(sizes: dict) -> tuple[int, int]:
    """FLUX's weights in fp32 (as learn loads a base model), and with the transformer and T5
    in bf16 (as the trainer keeps them under LoRA; CLIP's few trained and the VAE in fp32)."""
    small = sizes["clip"] + sizes["vae"]
    return 4 * (sizes["transformer"] + sizes["t5"] + small), 2 * (sizes["transformer"] + sizes["t5"]) + 4 * small


def flux_on_cpu(rows: list[dict], sizes: dict) -> str:
    """The plain conclusion of a CPU table: what the whole needs, and how long learn's
    default steps would take."""
    whole = {(r["phase"], r["kind"]): r for r in rows
             if "error" not in r and (r.get("extrapolated") or not r.get("depth"))}
    one, two = whole.get((1, "scenebreak defaults")), whole.get((2, "scenebreak LoRA low-memory"))
    fp32, half = flux_bytes(sizes)
    total = sum(sizes[k] for k in ("transformer", "t5", "clip", "vae"))
    text = (f"FLUX needs a GPU. Under LoRA learn loads FLUX.1-dev's transformer and T5 straight in bf16, their "
            f"published precision: its {total / 1e9:.1f} billion weights then take {half / GiB:.0f} GiB "
            f"({fp32 / GiB:.0f} GiB in fp32), more than a 24 GB machine has")
    if one and two:
        hours = 400 * (one["s_per_step"] + two["s_per_step"]) / 3600
        text += (f"; at these speeds learn's default 400+400 steps (phase 1 as auto picks it, then LoRA with --memory "
                 f"low, auto's choice on a CPU) would take about {hours:.0f} hours")
    return text + "."


def render(rows: list[dict], args, command: str) -> str:
    lines = [
        "# Training step and generation: scenebreak vs. the original code's way",
        "",
        f"- machine: {machine(args.device)}; device: {args.device}; torch {torch.__version__}",
        f"- model: {'the tiny test model (a dry run, not a benchmark)' if args.tiny else 'SDXL base architecture' if args.sdxl else 'SD2.1-base architecture'}"
        f"{' (tiny SDXL)' if args.tiny and args.sdxl else ''}, "
        f"random weights; {args.resolution}x{args.resolution}; training batch 2 (instance + class image); AdamW with fp32 master weights",
        f"- training: {args.steps} timed steps after 1 warm-up step; generation: {args.gen_steps} timed denoising steps "
        f"(guidance {5 if args.sdxl else 7.5}) scaled to the sampler's count (dpm 25, euler 30, ddim 50), plus one "
        "timed VAE decode per image; precision auto: fp16 weights on CUDA, fp32 weights under bf16 autocast on CPUs "
        "with bf16 instructions; " + ("every row in one process, each on its own copy of one model build (peak memory "
                                            "reset before each row)" if args.in_process else "each row is a fresh process, one at a time"),
        "- scenebreak's phase 1 runs the instance example only: there the class image's loss has no gradient with "
        "respect to the handles, so skipping it gives the same updates (docs/method.md)"
        + ("; the original code has no SDXL, so there is no baseline" if args.sdxl else "; the baseline runs both"),
        *([sdxl_defaults_note(rows, args.device)] if args.sdxl else []),
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
        # Against what generate did before: DDIM 50 in fp32 on the CPU, in fp16 on GPUs.
        before = next((r for r in generation if r["kind"] == ("DDIM 50" if args.device.startswith("cuda") else "DDIM 50 fp32")
                       and "error" not in r), None)
        lines += ["", "| generate | sampler | steps | images per pass | weights | precision | s/step | s/image | images/s | "
                  "vs DDIM 50 before | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in generation:
            if "error" in row:
                lines.append(f"| {row['kind']} | {row['error']} | | | | | | | | | |")
                continue
            versus = f"{row['s_per_image'] / before['s_per_image']:.2f}x" if before and "steps" in row else ""
            lines.append(f"| {row['kind']} | {row.get('scheduler', 'ddim')} | {row.get('steps', 50)} | {row['batch']} | "
                         f"{row['dtype']} | {row.get('precision', '')} | {row.get('s_per_step', 0):.2f} | "
                         f"{row['s_per_image']:.2f} | {row['images_per_s']:.3f} | {versus} | {row['peak_gib']:.1f} |")
    what = next((r["peak_what"] for r in rows if "peak_what" in r), "peak")
    lines += ["", f"Peak memory is the {what}, which includes the model "
              "weights and optimizer state."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
