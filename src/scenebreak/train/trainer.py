"""The two-phase Break-A-Scene trainer: one readable loop, run once per phase.

Phase 1 trains only the handle embeddings (lr 5e-4); phase 2 trains the handles,
the UNet and the text encoder(s) (lr 2e-6) with a fresh AdamW. Each step: flip,
union-sample handles, masked diffusion loss on the instance image, plain
diffusion loss on one class image, cross-attention loss on the instance only.
On SDXL every handle has a row in both text encoders' tables, both trained, and the
UNet also gets the pooled text and the size/crop ids, as its pipeline gives them.
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..config import LearnConfig
from ..device import Device, allow_tf32, hold_in_fp32, is_bitsandbytes_weight, precision_name
from ..errors import InvalidInput
from ..families import vae_normalisation
from ..families.versions import with_model_key_names
from ..handles import prompt_for
from ..images import image_to_tensor
from .attention import AttentionStore, capture_cross_attention
from .losses import attention_loss, diffusion_loss, downsample_masks, masked_diffusion_loss
from .memory import MemoryPlan
from .optim import OptimizerInBackward, adamw_factory
from .tokens import handle_positions, install_handle_embedding


LOSS_NAMES = ("loss", "rec", "prior", "attn")


@dataclass
class StepRecord:
    phase: int
    step: int  # steps done in this phase
    total: int
    losses: torch.Tensor  # LOSS_NAMES, still on the device: reading it waits for the GPU

    def value(self, name: str) -> float:
        """One of LOSS_NAMES as a number (waits for the device)."""
        return float(self.losses[LOSS_NAMES.index(name)])

    @property
    def loss(self) -> float:
        return self.value("loss")


@dataclass
class StepBatch:
    """One training step's inputs, drawn on the host (Trainer.draw): the clean latents
    of [instance, class image], their noise and timesteps, the prompts' ids per
    tokenizer, the family's extra conditions, and the union of the chosen handles'
    masks at the latent size. For the attention loss, one slot per handle of the scene
    whatever the step chose, so that every step has the same shapes (a compiled step
    is traced once per phase): the text positions it reads (`columns`, None when the
    loss is off), each one's mask at the attention size and its weight (1 for a chosen
    handle, 0 for a padding slot); and the keys of a joint-attention map: the longest
    prompt's `text_length`, with `key_bias` -inf past this prompt's end."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    ids: list[torch.Tensor]
    conditions: torch.Tensor | None
    mask: torch.Tensor
    attn_masks: torch.Tensor
    weights: torch.Tensor
    columns: torch.Tensor | None
    text_length: int
    key_bias: torch.Tensor


@dataclass
class TrainInputs:
    image: "PIL.Image.Image"  # noqa: F821 - the R x R training crop
    masks: torch.Tensor  # (N, R, R) in {0, 1}
    handle_ids: list[int]  # in the tokenizer the attention loss reads (family.attention_text)
    class_images: list[Path] = field(default_factory=list)
    crop_size: tuple[int, int] | None = None  # (h, w) of the crop in the photo: SDXL's "original size"


def sample_handles(rng: random.Random, n: int) -> list[int]:
    """Union sampling: k uniform in 1..n, then a random k-subset (in random order)."""
    k = rng.randint(1, n)
    return rng.sample(range(n), k)


def check_finite(losses: torch.Tensor, phase: int, step: int) -> None:
    """Raise Diverged when a step's losses are NaN or infinite."""
    from ..errors import Diverged

    if not bool(torch.isfinite(losses).all()):
        raise Diverged(f"training diverged: the loss is {float(losses[0])} at phase {phase}, step {step}. Start again "
                       "with a lower learning rate (--lr1 for phase 1, --lr2 or --lr-lora for phase 2); any earlier "
                       "checkpoint was kept as it was")


class Trainer:
    """Both phases over one photo. `plan` says how to fit in memory (memory.choose) and
    `amp_dtype` is the autocast precision (None: fp32), both decided once by `learn`."""

    def __init__(self, components, inputs: TrainInputs, config: LearnConfig, device: Device, handle_tokens: list[str],
                 *, plan: MemoryPlan, amp_dtype):
        self.c = components
        if config.lambda_attn is None:  # (learn settles it first; benchmarks may not)
            config = replace(config, lambda_attn=components.family.lambda_attn)
        self.config = config
        self.plan = plan
        self.device = device
        self.inputs = inputs
        self.handle_tokens = handle_tokens
        self.num_handles = len(inputs.handle_ids)
        self.amp_dtype = amp_dtype
        # The layers transformers keeps in fp32 in half precision (FLUX.1's T5 `wo`) are
        # fp32 and run in fp32 under fp16 autocast too, as when sampling: in fp16 they
        # overflow (learn has done it already, before the class images).
        self._fp32_layers = hold_in_fp32(components.text_encoders, amp_dtype, device.type)
        self.schedule = components.family.training_schedule(components.scheduler_config)
        dev = device.torch

        self.lora_params: list[torch.nn.Parameter] = []
        if plan.quantize != "none":  # before the adapters wrap the layers and the move quantises them
            self._quantize_base(plan.quantize)
        if config.tune == "lora":  # before the move, so the adapters follow the weights
            from ..families.lora import add_lora, lora_settings

            with torch.random.fork_rng(devices=[]):  # the A matrices start random: the same for a seed
                torch.default_generator.manual_seed(config.seed)  # (made on the CPU; the GPUs' RNGs left alone)
                self.lora_params = add_lora(components.denoiser,
                                            dict(zip(components.family.text_encoders, components.text_encoders)),
                                            lora_settings(config.rank, components.family))
        # One HandleEmbedding per text encoder: SDXL's handles have a 768- and a 1280-wide row.
        self.embeddings = [install_handle_embedding(te, self.num_handles) for te in components.text_encoders]
        self._fp32_master: dict[str, torch.Tensor] | None = None  # fp32 values of the weights kept in half, on the CPU
        if config.tune == "lora":
            # Frozen for the whole run: into half precision before the move, so the GPU never
            # holds them in fp32 (SDXL: 13 GB of fp32 weights was the peak of a LoRA run).
            self._cast_frozen_to_half()
        for model in components.models():
            model.to(dev)
        if device.type == "cuda":
            allow_tf32()  # fp32 matmuls outside autocast (learn puts the caller's settings back)
            components.denoiser.to(memory_format=torch.channels_last)
        # No dropout in the text encoders: CLIP has none, but T5 (FLUX.1) drops 10%, drawn
        # from torch's global generator, so a run could not be repeated or resumed exactly
        # (dropout layers, and the attention's own rate that T5 applies functionally).
        for te in components.text_encoders:
            for module in te.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
                elif isinstance(getattr(module, "dropout", None), float):
                    module.dropout = 0.0
        if plan.gradient_checkpointing:
            components.denoiser.enable_gradient_checkpointing()
            for te in components.text_encoders:
                if hasattr(te, "activation_checkpointing_enable"):  # transformers >= 5
                    te.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        self.rng = random.Random(config.seed)  # flips, handle subsets
        self.gen = torch.Generator("cpu").manual_seed(config.seed)  # noise, timesteps, latent samples

        resolution = inputs.image.size[0]
        self.latent_size = resolution // components.vae_scale_factor
        self.store = AttentionStore(example=0)  # the instance is always batch row 0
        self.layers = components.family.attention_layers(components.denoiser) if config.lambda_attn > 0 else []

        # The photo never changes: encode it once per flip state and sample from the
        # cached distribution each step instead of re-running the VAE encoder.
        pixels = image_to_tensor(inputs.image)
        self.instance_latents = {False: self._encode(pixels), True: self._encode(pixels.flip(-1))}
        masks = inputs.masks.float()
        self.latent_masks, self.attn_masks = {}, {}
        for flip in (False, True):
            m = masks.flip(-1) if flip else masks
            self.latent_masks[flip] = downsample_masks(m, self.latent_size).to(dev)
            self.attn_masks[flip] = downsample_masks(m, components.family.attention_size(self.latent_size)).to(dev)
        self.class_latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.class_ids = self._tokenize(config.class_prompt)
        # Per set of handles: the prompt's ids per tokenizer, the handles' positions, the prompt's length.
        self._prompt_cache: dict[tuple[int, ...], tuple[list[torch.Tensor], list[int], int]] = {}
        self._slot_cache: dict[tuple[int, ...], tuple[torch.Tensor, ...]] = {}
        self._union_cache: dict[tuple[bool, tuple[int, ...]], torch.Tensor] = {}
        # The family's extra conditioning of [instance, class image] (SDXL's size/crop ids).
        self.conditions = components.family.training_conditions(inputs.crop_size, resolution)
        if self.conditions is not None:
            self.conditions = self.conditions.to(dev)
        if plan.offload_vae:
            # Every latent cached now, the VAE can leave the GPU for the whole run.
            for index in range(len(inputs.class_images) if config.prior else 0):
                self._class_latent(index)
            components.vae.to("cpu")

        # The forward pass and losses of a step: compiled whole with --compile (compiling.py).
        self.losses_fn, self.compile_key, self.cuda_graphs = self.step_losses, None, False
        self.update_mode = None  # a compile mode: the update after the backward pass is compiled too
        if config.compile:
            from .compiling import (CUDA_GRAPH_MODES, compile_blocks, compile_key, compile_mode, compile_scope,
                                    compile_step, load_artifacts)

            mode, scope = compile_mode(), compile_scope()
            self.compile_key = compile_key(device, {**self.step_shapes(), "mode": mode, "scope": scope})
            load_artifacts(self.compile_key)
            if scope == "blocks":
                if plan.gradient_checkpointing:  # the recompute would not match what the compiled block saved
                    raise InvalidInput("SCENEBREAK_COMPILE_SCOPE=blocks does not work with gradient checkpointing "
                                       "(--memory low): use --memory fast, or leave the variable unset")
                compile_blocks(components.denoiser, mode)
            else:
                if scope == "whole":
                    self._check_update_compiles()
                    self.update_mode = mode
                self.losses_fn = compile_step(self.step_losses, mode=mode)
            self.cuda_graphs = mode in CUDA_GRAPH_MODES and device.type == "cuda"

        self.phase, self.step = 1, 0
        self.history: dict[int, list[torch.Tensor]] = {1: [], 2: []}  # LOSS_NAMES per step
        self.seconds: dict[int, float] = {1: 0.0, 2: 0.0}
        self._pending_optimizer_state = None
        self.params: list[torch.nn.Parameter] = []  # what the current phase trains
        self.optimizer = None
        self.class_states = None  # a frozen text encoder's states of the class example, per phase
        self.update_fn = self.update
        self.scaler = None

    def _check_update_compiles(self) -> None:
        """The update is compiled only where it is one plain AdamW step after the backward
        pass: not per tensor inside it (--memory low), not bitsandbytes' 8-bit AdamW (its
        step is not traceable), not behind fp16's loss scaler (which reads the gradients
        back to skip a step)."""
        why = ("--memory low steps the optimizer inside the backward pass" if self.plan.optimizer_in_backward
               else "8-bit AdamW cannot be compiled" if self.plan.adam_8bit
               else "fp16's loss scaler reads the gradients back" if self.amp_dtype == torch.float16 else None)
        if why:
            raise InvalidInput(f"SCENEBREAK_COMPILE_SCOPE=whole does not work here ({why}): use --memory fast and "
                               "bf16 or fp32, or leave the variable unset")

    def step_shapes(self) -> dict:
        """What a compiled step depends on besides torch and the device: the models, the
        shapes of a step's tensors and the settings that change its graph."""
        c, cfg = self.c, self.config
        return {"family": c.family.name, "denoiser": c.denoiser.config.get("_class_name", type(c.denoiser).__name__),
                "parameters": sum(p.numel() for m in c.models() for p in m.parameters()),
                "latent": [c.denoiser.config.get("in_channels"), self.latent_size], "prior": cfg.prior,
                "handles": self.num_handles, "tune": cfg.tune, "rank": cfg.rank if cfg.tune == "lora" else None,
                "attention": bool(self.layers), "precision": str(self.amp_dtype),
                "checkpointing": self.plan.gradient_checkpointing, "half_frozen": self.plan.half_frozen}

    # -- helpers -----------------------------------------------------------
    @property
    def embedding(self):
        """The first text encoder's handle rows (the only ones before SDXL)."""
        return self.embeddings[0]

    @property
    def handle_params(self) -> list[torch.nn.Parameter]:
        return [e.handles for e in self.embeddings]

    def _frozen_params(self):
        """(name, parameter) of every denoiser and text-encoder weight that is not a handle
        row or a LoRA adapter."""
        handles = {id(p) for p in self.handle_params}
        for prefix, model in ((self.c.family.denoiser, self.c.denoiser), *zip(self.c.family.text_encoders, self.c.text_encoders)):
            for name, param in model.named_parameters():
                if ".lora_" not in name and id(param) not in handles:
                    yield f"{prefix}.{name}", param

    def _quantize_base(self, kind: str) -> None:
        """The frozen base of LoRA in `kind`, computed in the training precision
        (families/quantized.py; learn has done it already, before the class images)."""
        from ..families.quantized import quantize_frozen_base

        quantize_frozen_base(self.c, kind, self.amp_dtype or torch.float32)

    def _cast_frozen_to_half(self) -> None:
        """Weights that do not train live in the autocast precision where the plan says
        so (on GPUs): the base model under LoRA, and everything but the handles in phase
        1. The handle rows and the adapters stay fp32 parameters, so their updates are
        exact; but this is not only a memory saving: the handle rows enter the text
        encoder rounded to the half-precision token table's dtype, like the ordinary
        words' rows, and the residual streams that add to half-precision weights (the
        position embeddings, the layers' outputs) stay in half precision where autocast
        would have kept them in fp32. Autocast's matrix products are half precision
        either way. The frozen weights' fp32 values wait on the CPU
        and come back bit for bit where they are needed again: for phase 2 of full
        tuning, and at the end (the scene stores the vocabulary, and a standalone LoRA
        scene the base weights, at full precision). A LoRA scene of adapters alone never
        stores the base weights: only its vocabulary is kept."""
        if not (self.plan.half_frozen and self.amp_dtype is not None) or self._fp32_master is not None:
            return
        keep = self.config.tune == "full" or self.config.standalone
        self._fp32_master = {}
        fp32 = {id(p) for layer in self._fp32_layers for p in layer.parameters()}
        for name, param in self._frozen_params():
            # Held quantised (--quantize), or kept fp32. A quantised layer's weight still
            # float waits for the move to pack it, as it is: cast here first, it was packed
            # from other values than in a run whose class-image sampling had packed it.
            if is_bitsandbytes_weight(param) or not param.is_floating_point() or id(param) in fp32:
                continue
            if keep:  # (on the CPU, before the move under LoRA: the fp32 tensor itself, never changed)
                self._fp32_master[name] = param.data if param.device.type == "cpu" else param.data.to("cpu")
            param.data = param.data.to(self.amp_dtype)
        for i, embedding in enumerate(self.embeddings):
            self._fp32_master[f"vocabulary.{i}"] = embedding.base if embedding.base.device.type == "cpu" else \
                embedding.base.to("cpu")
            embedding.base = embedding.base.to(self.amp_dtype)

    def _restore_fp32_master(self) -> None:
        """The fp32 weights kept on the CPU, back in place (see _cast_frozen_to_half)."""
        if self._fp32_master is None:
            return
        for name, param in self._frozen_params():
            if name in self._fp32_master:
                param.data = self._fp32_master[name].to(param.device)
        for i, embedding in enumerate(self.embeddings):
            embedding.base = self._fp32_master[f"vocabulary.{i}"].to(embedding.base.device)
        self._fp32_master = None

    def _token_lists(self, prompt: str) -> list[list[int]]:
        """The prompt's token ids in each tokenizer, padded to its length."""
        return [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                for tok in self.c.tokenizers]

    def _tokenize(self, prompt: str) -> list[torch.Tensor]:
        """The prompt's (1, L) token ids in each tokenizer, on the training's device."""
        return [torch.tensor([ids], device=self.device.torch) for ids in self._token_lists(prompt)]

    @torch.no_grad()
    def _encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled posterior mean and std of an image, encoded in fp32 (never under
        autocast; callers run it before a step's autocast begins): done once per image,
        it costs next to nothing, and bf16 would blur the latents every step learns from."""
        vae = self.c.vae
        dist = vae.encode(pixels.to(self.device.torch, torch.float32)).latent_dist
        shift, scale = vae_normalisation(vae)
        return (dist.mean.float() - shift) * scale, dist.std.float() * scale

    def _sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        eps = self.device.from_host(torch.randn(mean.shape, generator=self.gen))
        return mean + std * eps

    def _instance_latent(self, flip: bool):
        return self.instance_latents[flip]

    def _capture(self):
        """Record the attention-loss layers for this phase (nothing when it is off)."""
        if not self.layers:
            return contextlib.nullcontext()
        return capture_cross_attention(self.c.denoiser, self.store, self.layers, self.c.family.attention_kind)

    @contextlib.contextmanager
    def _adapters_for(self, phase: int):
        """LoRA's adapters as a phase needs them (families/lora.py), then as peft has them.
        Phase 1 switches them off: their B matrices are still zero, so they add exactly
        nothing to any layer and pass no gradient to the handles, and the step is the
        same without their work. Under autocast, they take their input as autocast gives
        it, without peft's round trip through fp32 (the same numbers, less work)."""
        if not self.lora_params:
            yield
            return
        from ..families.lora import adapters_add_nothing, cast_adapter_inputs, switch_adapters

        models = self.c.models()
        off = phase == 1 and adapters_add_nothing(models)  # (read once per phase, never inside a step)
        if off:
            switch_adapters(models, False)
        cast_adapter_inputs(models, self.amp_dtype is None)
        try:
            yield
        finally:
            cast_adapter_inputs(models, True)
            if off:
                switch_adapters(models, True)
                self._trainable(phase)  # (peft made the adapters trainable again)

    def _class_latent(self, index: int):
        if index not in self.class_latents:  # encoded on first use, then cached
            from PIL import Image

            with Image.open(self.inputs.class_images[index]) as im:
                pixels = image_to_tensor(im.convert("RGB").resize(self.inputs.image.size))
            self.class_latents[index] = self._encode(pixels)
        return self.class_latents[index]

    def _prompt_ids(self, chosen: tuple[int, ...]) -> tuple[list[torch.Tensor], list[int], int]:
        if chosen not in self._prompt_cache:
            # Read from the tokenizers' lists, before any tensor: nothing here waits for a GPU.
            lists = self._token_lists(prompt_for([self.handle_tokens[i] for i in chosen]))
            read = self.c.family.attention_text
            row, eos = lists[read], self.c.tokenizers[read].eos_token_id
            length = row.index(eos) + 1 if eos in row else len(row)  # the prompt's own tokens
            positions = handle_positions(row, [self.inputs.handle_ids[i] for i in chosen])
            ids = [torch.tensor([ids], device=self.device.torch) for ids in lists]
            self._prompt_cache[chosen] = (ids, positions, length)
        return self._prompt_cache[chosen]

    def _loss_slots(self, chosen: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The attention loss's slots for a set of chosen handles, one per handle of the
        scene (StepBatch), on the device, made once per set: which handle's mask fills
        each slot (the chosen ones in order, then the first again), the text position it
        reads, its weight, and the key bias of this prompt within the longest one's."""
        if chosen not in self._slot_cache:
            _, positions, length = self._prompt_ids(chosen)
            pad = self.num_handles - len(chosen)
            dev = self.device.torch
            which = torch.tensor(list(chosen) + [chosen[0]] * pad, device=dev)
            columns = torch.tensor(positions + [positions[0]] * pad, device=dev)
            weights = torch.tensor([1.0] * len(chosen) + [0.0] * pad, device=dev)
            bias = torch.tensor([0.0] * length + [float("-inf")] * (self.text_span - length), device=dev)
            self._slot_cache[chosen] = (which, columns, weights, bias)
        return self._slot_cache[chosen]

    @property
    def text_span(self) -> int:
        """The longest training prompt's own tokens (the one that names every handle)."""
        return self._prompt_ids(tuple(range(self.num_handles)))[2]

    def _trainable(self, phase: int) -> list[dict]:
        """The optimizer's parameter groups of a phase (and only they require grad)."""
        c, cfg = self.c, self.config
        full = phase == 2 and cfg.tune == "full"
        c.denoiser.requires_grad_(full)
        for te in c.text_encoders:
            te.requires_grad_(full)  # the base vocabulary is a buffer: never trained
        handles = self.handle_params
        for p in handles:
            p.requires_grad_(True)
        if phase == 1:
            return [{"params": handles, "lr": cfg.lr1}]
        if cfg.tune == "lora":
            for p in self.lora_params:
                p.requires_grad_(True)
            return [{"params": handles, "lr": cfg.lr2}, {"params": self.lora_params, "lr": cfg.lr_lora}]
        ids = {id(p) for p in handles}
        te = [p for encoder in c.text_encoders for p in encoder.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": handles + te + list(c.denoiser.parameters()), "lr": cfg.lr2}]

    def _optimizer(self, phase: int, groups: list[dict]):
        # 8-bit moments save memory on the weights of phase 2; phase 1 trains the handle
        # rows alone (kilobytes), at the paper's AdamW, not on quantised moments.
        make = adamw_factory(self.config, self.device, self.plan.adam_8bit and phase == 2)
        if phase == 2 and self.plan.optimizer_in_backward:
            return OptimizerInBackward(groups, make, self.config.max_grad_norm)
        return make(groups)

    @torch.no_grad()
    def _frozen_class_states(self, phase: int) -> dict[int, torch.Tensor] | None:
        """The class example's states from each text encoder that the family can take them
        ready-made from and that trains nothing in this phase (its handle rows aside: the
        class prompt has none), computed once per phase instead of every step. They are
        what the step would compute (dropout is off; the same autocast), up to the
        rounding of a batch of one row instead of two."""
        if not self._class_example_needed(phase):
            return None
        handles = {id(p) for p in self.handle_params}
        states = {}
        for index in self.c.family.class_state_encoders:
            encoder = self.c.text_encoders[index]
            if any(p.requires_grad and id(p) not in handles for p in encoder.parameters()):
                continue  # it trains: its output changes every step
            with self.device.autocast(self.amp_dtype):
                states[index] = encoder(self.class_ids[index], output_hidden_states=False)[0].detach()
        return states or None

    def _class_example_needed(self, phase: int) -> bool:
        """In phase 1 only the handles learn, and the class example cannot reach them:
        its prompt has no handle and the UNet and text encoder are frozen, so its loss
        has zero gradient. Phase 1 skips its forward and backward (same updates, half
        the work)."""
        return self.config.prior and phase == 2

    # -- the loop ----------------------------------------------------------
    def run(self):
        """Yield a StepRecord after every step of both phases (resuming where it stopped)."""
        cfg = self.config
        for phase, steps in ((1, cfg.steps1), (2, cfg.steps2)):
            if phase < self.phase:
                continue
            if self.step >= steps:  # this phase was already finished
                self.phase, self.step = phase + 1, 0
                continue
            self.phase = phase
            if self.config.tune == "full":  # phase 1 keeps the weights it does not train in half precision
                self._cast_frozen_to_half() if phase == 1 else self._restore_fp32_master()
            groups = self._trainable(phase)
            self.params = [p for g in groups for p in g["params"]]
            self.class_states = self._frozen_class_states(phase)
            self.optimizer = self._optimizer(phase, groups)
            self.update_fn = self.update
            if self.update_mode is not None:  # traced once per phase: each has its own optimizer
                from .compiling import compile_update

                self.update_fn = compile_update(self.update, mode=self.update_mode)
            self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
            pending, self._pending_optimizer_state = self._pending_optimizer_state, None
            # Only into the phase it came from: the end-of-phase-1 checkpoint holds phase
            # 1's optimizer, and phase 2 starts from a fresh one.
            if pending is not None and pending["phase"] == phase:
                self.optimizer.load_state_dict(pending["optimizer"])
                if self.scaler is not None and pending.get("scaler"):
                    self.scaler.load_state_dict(pending["scaler"])
            self.c.denoiser.train()
            for te in self.c.text_encoders:
                # Training mode only changes what matters here: transformers checkpoints a
                # layer only in it (dropout is off, above), and the gradient reaches the
                # handle rows through every layer in phase 1 too (T5-XXL: some 2 GB kept).
                te.train(phase == 2 or self.plan.gradient_checkpointing)
            with self._capture(), self._adapters_for(phase):
                while self.step < steps:
                    started = time.perf_counter()
                    record = self.train_step(phase, steps)
                    self.seconds[phase] += time.perf_counter() - started
                    yield record
            if self.compile_key:  # what this phase compiled, for the next run with the same key
                from .compiling import save_artifacts

                save_artifacts(self.compile_key)
            if isinstance(self.optimizer, OptimizerInBackward):
                self.optimizer.close()
            self.optimizer = None  # phase 2 starts from a fresh AdamW
            if phase == 1:
                self.phase, self.step = 2, 0
        self._restore_fp32_master()  # the scene is made from fp32 weights

    def train_step(self, phase: int, steps: int) -> StepRecord:
        """One step: the random choices on the host (`draw`), the forward pass and the
        losses as one tensor function (`step_losses`, compiled whole with --compile),
        then the backward pass and the optimizer."""
        batch = self.draw(phase)
        if self.cuda_graphs:  # a new step: the graphs may reuse the last step's output buffers
            torch.compiler.cudagraph_mark_step_begin()
        losses = self.losses_fn(batch)
        loss = losses[0]
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()  # with the optimizer in the backward pass, this also steps
        if not isinstance(self.optimizer, OptimizerInBackward):
            if self.scaler is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.update_fn()
            self.optimizer.zero_grad(set_to_none=True)
        self.store.clear()  # drop the maps (and their graph) before the next step
        self.device.release_memory()

        self.step += 1
        # Kept on the device: reading a loss makes the CPU wait for the GPU, so it is
        # read only when the progress bar or a checkpoint needs it.
        losses = losses.detach().float()
        if self.cuda_graphs:  # kept past this step: out of the graph's reused buffer
            losses = losses.clone()
        self.history[phase].append(losses)
        return StepRecord(phase, self.step, steps, losses)

    def update(self) -> None:
        """After the backward pass: the gradients clipped to max_grad_norm, then the
        optimizer's step (compiled, as `update_fn`, under SCENEBREAK_COMPILE_SCOPE=whole)."""
        torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()

    def draw(self, phase: int) -> StepBatch:
        """The step's random choices (flip, handles, class image, noise, timesteps), made
        on the host from the run's generators in a fixed order, and the tensors they
        select, on the device. Nothing here reads a tensor back or waits for the device."""
        cfg = self.config
        flip = self.rng.random() < cfg.flip_p
        chosen = sample_handles(self.rng, self.num_handles)
        ids = self._prompt_ids(tuple(chosen))[0]
        which, columns, weights, key_bias = self._loss_slots(tuple(chosen))
        # A skipped class example (see _class_example_needed) still draws its random
        # numbers, so the run matches one that computes it.
        with_class = self._class_example_needed(phase)
        latents = [self._sample_latents(*self._instance_latent(flip))]
        if cfg.prior:
            index = self._class_index(phase)
            if with_class:
                latents.append(self._sample_latents(*self._class_latent(index)))
            else:
                torch.randn(latents[0].shape, generator=self.gen)  # the class sample's draw
        latents = torch.cat(latents)
        batch = 2 if cfg.prior else 1
        noise = self.device.from_host(torch.randn((batch, *latents.shape[1:]), generator=self.gen)[: len(latents)])
        timesteps = self.device.from_host(self.schedule.timesteps(batch, self.gen)[: len(latents)])
        return StepBatch(
            latents=latents, noise=noise, timesteps=timesteps,
            ids=[torch.cat([a, b]) for a, b in zip(ids, self.class_ids)] if with_class else ids,
            conditions=None if self.conditions is None else self.conditions[: len(latents)],
            mask=self._union_mask(flip, tuple(chosen)),
            attn_masks=self.attn_masks[flip][which] * weights[:, None, None], weights=weights,
            # Only the handles' columns of the maps are recorded (attention.py).
            columns=columns if self.layers else None, text_length=self.text_span, key_bias=key_bias)

    def _union_mask(self, flip: bool, chosen: tuple[int, ...]) -> torch.Tensor:
        """The union of the chosen handles' latent masks, (1, 1, h, w), made once per set
        (indexing a device tensor by a list copies the list to the device every step)."""
        key = (flip, chosen)
        if key not in self._union_cache:
            self._union_cache[key] = self.latent_masks[flip][list(chosen)].amax(0)[None, None]
        return self._union_cache[key]

    def _class_index(self, phase: int) -> int:
        """The class image of this step: as the paper's data loader deals them, every
        image once in each round of K steps, in a fresh order each round (counted over
        both phases, as its one loop runs them), not drawn with replacement, which
        leaves some of them out of a short phase. A function of the seed and the step
        alone, so a resumed run deals the same."""
        count = len(self.inputs.class_images)
        round_, position = divmod(self.step + (self.config.steps1 if phase == 2 else 0), count)
        order = list(range(count))  # (shuffling K numbers a step costs microseconds)
        random.Random(f"{self.config.seed}:class-images:{round_}").shuffle(order)
        return order[position]

    def step_losses(self, b: StepBatch) -> torch.Tensor:
        """The forward pass and LOSS_NAMES (total first) of one drawn step: tensors in,
        a tensor out, with no host synchronisation and no data-dependent branch, so that
        torch.compile traces it whole (fullgraph; tests/train/test_step_graph.py)."""
        cfg, c = self.config, self.c
        noisy = self.schedule.add_noise(b.latents, b.noise, b.timesteps)
        target = self.schedule.target(b.latents, b.noise, b.timesteps)
        self.store.clear()
        self.store.columns, self.store.text_length, self.store.key_bias = b.columns, b.text_length, b.key_bias
        # With checkpointing every block is recomputed anyway: keeping a half-precision
        # copy of all weights for the whole step would cost more than re-casting them.
        with self.device.autocast(self.amp_dtype, cache=not self.plan.gradient_checkpointing):
            class_states = self.class_states if len(b.latents) > 1 else None  # (the class example is the last)
            hidden, added = c.family.encode_prompts(c.text_encoders, b.ids, b.conditions, class_states)
            pred = c.family.denoise(c.denoiser, noisy, b.timesteps, hidden, added)

        loss_rec = masked_diffusion_loss(pred[:1], target[:1], b.mask)
        with_class = len(b.latents) > 1
        zero = torch.zeros((), device=pred.device)
        loss_prior = diffusion_loss(pred[1:], target[1:]) if with_class else zero
        loss_attn = attention_loss(self.store.recorded_maps(), b.attn_masks, b.weights) if self.layers else zero
        loss = loss_rec + cfg.prior_weight * loss_prior + cfg.lambda_attn * loss_attn
        return torch.stack([x.float() for x in (loss, loss_rec, loss_prior, loss_attn)])

    # -- checkpoints -------------------------------------------------------
    def state_dict(self) -> dict:
        state = {
            "tuning": self.config.tune,  # what --tune auto chose: a resume keeps it
            "quantize": self.plan.quantize,  # and what --quantize auto chose (another base is another run)
            "device": self.device.type, "precision": precision_name(self.amp_dtype),  # (a resume elsewhere is told)
            "half_frozen": self.plan.half_frozen,  # (so is one whose frozen weights wait in another precision)
            "phase": self.phase,
            "step": self.step,
            "handles": self.embedding.handles.detach().cpu().clone(),
            **{f"handles_{i + 1}": e.handles.detach().cpu().clone() for i, e in enumerate(self.embeddings) if i},
            "rng_python": self.rng.getstate(),
            "rng_torch": self.gen.get_state(),
            "history": {phase: self.history_rows(phase) for phase in self.history},
            "seconds": self.seconds,
        }
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
            state["optimizer_phase"] = self.phase
            state["optimizer_kind"] = self.optimizer_kind
            state["scaler"] = self.scaler.state_dict() if self.scaler is not None else None
        if self.phase == 2 and self.step > 0:
            for name, model in ((self.c.family.denoiser, self.c.denoiser), *zip(self.c.family.text_encoders, self.c.text_encoders)):
                weights = model.state_dict()
                if self.config.tune == "lora":  # only the adapters moved
                    weights = {k: v for k, v in weights.items() if ".lora_" in k}
                state[name] = {k: v.detach().cpu() for k, v in weights.items()}
        return state

    @property
    def optimizer_kind(self) -> str:
        return "adamw8bit" if self.plan.adam_8bit else "adamw"

    def load_state_dict(self, state: dict) -> list[str]:
        """Continue from a checkpoint; returns notes for the user (what could not be kept)."""
        with torch.no_grad():
            for i, embedding in enumerate(self.embeddings):
                embedding.handles.copy_(state["handles" if i == 0 else f"handles_{i + 1}"])
        if self.c.family.denoiser in state:
            models = ((self.c.family.denoiser, self.c.denoiser), *zip(self.c.family.text_encoders, self.c.text_encoders))
            for name, model in models:
                if self.config.tune == "lora":
                    from ..families.lora import load_lora_state_dict

                    load_lora_state_dict(model, state[name])
                else:
                    model.load_state_dict(with_model_key_names(state[name], model.state_dict()))
        self.rng.setstate(state["rng_python"])
        self.gen.set_state(state["rng_torch"])
        self.phase, self.step = state["phase"], state["step"]
        self.history = {int(k): [torch.tensor([row[n] for n in LOSS_NAMES]) for row in rows] for k, rows in state["history"].items()}
        self.seconds = {int(k): v for k, v in state["seconds"].items()}
        notes = []
        # The checkpoint's optimizer goes on only within its phase: one written at the end
        # of phase 1 holds phase 1's, which phase 2 replaces by a fresh one anyway.
        phase_steps = self.config.steps1 if self.phase == 1 else self.config.steps2
        continues = state.get("optimizer_phase", self.phase) == self.phase and self.step < phase_steps
        if "optimizer" in state and continues and state.get("optimizer_kind", "adamw") != self.optimizer_kind:
            # Its moments are kept in another layout (e.g. out of memory, then --memory low
            # with 8-bit AdamW): they start again; the rest of the run is the same.
            notes.append(f"the optimizer changed ({state.get('optimizer_kind', 'adamw')} -> {self.optimizer_kind}): "
                         "its running averages start fresh, so the result differs slightly from an uninterrupted run")
        elif "optimizer" in state:
            self._pending_optimizer_state = {"optimizer": state["optimizer"], "scaler": state.get("scaler"),
                                             "phase": state.get("optimizer_phase", state["phase"])}
        return notes

    def check_finite(self) -> None:
        """Raise Diverged if the last step trained (in this run or before a resume) had
        a NaN or infinite loss: a diverged model is never checkpointed or saved."""
        phase = 2 if self.history[2] else 1
        check_finite(self.history[phase][-1], phase, len(self.history[phase]))

    def history_rows(self, phase: int) -> list[dict]:
        """The losses of every step of a phase, as plain numbers."""
        if not self.history[phase]:
            return []
        table = torch.stack([row.cpu() for row in self.history[phase]]).tolist()
        return [dict(zip(LOSS_NAMES, row)) for row in table]

    def loss_summary(self) -> dict:
        summary = {}
        for phase in self.history:
            rows = self.history_rows(phase)
            if not rows:
                continue
            window = max(1, min(20, len(rows) // 5))
            first, last = rows[:window], rows[-window:]
            summary[f"phase{phase}"] = {
                "steps": len(rows),
                "seconds": round(self.seconds[phase], 2),
                **{f"{k}_first": sum(r[k] for r in first) / len(first) for k in ("loss", "attn")},
                **{f"{k}_last": sum(r[k] for r in last) / len(last) for k in ("loss", "attn")},
            }
        return summary

