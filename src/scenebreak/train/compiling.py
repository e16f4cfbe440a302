"""`learn --compile`: the training step compiled whole, and what the compiler made kept.

torch.compile traces `Trainer.step_losses` (the text encoders, the denoiser with the
attention capture, and the three losses) as one graph with static shapes; its backward
is compiled with it. A graph break there would split the step and send the CPU back to
Python mid-step: tests/train/test_step_graph.py traces it with `fullgraph=True` on the
tiny models, so none can creep in.

The first run pays the compile (a minute or two on a GPU). What it makes is kept in
scenebreak's cache folder: inductor's own cache under `compile/inductor/` (unless
`TORCHINDUCTOR_CACHE_DIR` says otherwise), and torch.compiler's portable artifacts in
`compile/KEY.bin`, loaded before the next run with the same key compiles, so that run
pays seconds. The key is a hash of what the artifacts depend on: the torch version, the
device (the GPU's name and compute capability, or the CPU's kernels) and the step's
shapes and settings (`step_shapes`). A different key is a different file: nothing
compiled for another GPU, torch or shape is ever loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from ..paths import home, write_atomically

MAX_ARTIFACTS = 2 * 2**30  # bytes: a file larger than this in the cache is not ours to load


def compile_dir() -> Path:
    return home() / "compile"


def device_identity(device) -> dict:
    """What compiled kernels depend on in the device: the GPU's name and compute
    capability, or the kernels torch picks on this CPU."""
    import torch

    if device.type == "cuda":
        index = device.torch.index if device.torch.index is not None else torch.cuda.current_device()
        return {"type": "cuda", "name": torch.cuda.get_device_name(index),
                "capability": list(torch.cuda.get_device_capability(index)), "cuda": torch.version.cuda}
    if device.type == "cpu":
        return {"type": "cpu", "kernels": torch.backends.cpu.get_cpu_capability()}
    return {"type": device.type}


def compile_key(device, shapes: dict) -> str:
    """A short hash of the torch version, the device and the step's shapes and settings."""
    import torch

    record = {"torch": torch.__version__, "device": device_identity(device), "shapes": shapes}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:20]


def artifacts_file(key: str) -> Path:
    return compile_dir() / f"{key}.bin"


def use_compile_cache() -> None:
    """Point inductor's own cache into scenebreak's cache folder, unless the user chose
    one. Importing torch._dynamo (which diffusers may do long before) writes torch's
    default into TORCHINDUCTOR_CACHE_DIR, so that value counts as no choice."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(_torch_default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_dir() / "inductor")


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # moved in another torch: then only an unset variable is ours to set
        return ""
    return default_cache_dir()


def load_artifacts(key: str) -> bool:
    """Hand the artifacts saved under `key` to torch.compile before it compiles; False
    when there are none (or they cannot be read: then it simply compiles)."""
    import torch

    path = artifacts_file(key)
    try:
        if not path.is_file() or path.stat().st_size > MAX_ARTIFACTS:
            return False
        return torch.compiler.load_cache_artifacts(path.read_bytes()) is not None
    except Exception:  # a half-written or foreign file: compiling again is the fix
        return False


def save_artifacts(key: str) -> Path | None:
    """Save what torch.compile made in this process under `key`, atomically; None when
    it made nothing."""
    import torch

    save = getattr(torch.compiler, "save_cache_artifacts", None)  # (torch 2.7 and later: before, nothing is kept)
    if save is None:
        return None
    saved = save()
    if saved is None or not saved[0]:
        return None
    data = saved[0]
    return write_atomically(artifacts_file(key), lambda tmp: tmp.write_bytes(data))


def prepare_dynamo() -> None:
    """The one dynamo setting the attention capture needs under gradient checkpointing:
    recording a map is a side effect inside the checkpointed block, which otherwise
    breaks the graph at every block (15 breaks on the tiny UNet, 0 with it)."""
    import torch._dynamo

    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


@contextlib.contextmanager
def compile_settings_kept(compiling: bool):
    """The process-wide settings compiling changes (inductor's cache folder in the
    environment, the dynamo settings above and its recompile limit) as they were before
    the block, after it: a Python caller's own torch.compile after `learn --compile` neither
    caches into scenebreak's folder nor traces by its settings. Dynamo reads them while
    it traces, so the block is the whole training run. (Not compiling, dynamo's settings
    are kept only where something imported it already: importing it for nothing costs.)"""
    kept = {}
    if compiling or "torch._dynamo" in sys.modules:
        import torch._dynamo

        config = torch._dynamo.config
        kept = {name: getattr(config, name) for name in ("skip_fwd_side_effects_in_bwd_under_checkpoint",
                                                         "recompile_limit") if hasattr(config, name)}
    cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(torch._dynamo.config, name, value)
        if cache_dir is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir


# torch.compile's modes. "reduce-overhead" (and "max-autotune") also capture the compiled
# forward and backward as CUDA graphs, replayed with one launch each: the step is bound
# by kernel launches at batch 2 (issue 22). Which wins is measured on a GPU
# (benchmarks/train_step.py --compiled); until then `--compile` keeps torch's default.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def compile_mode() -> str:
    """The mode `--compile` uses: SCENEBREAK_COMPILE_MODE (a knob for the GPU
    benchmarks), else torch's default."""
    return _choice_from_env("SCENEBREAK_COMPILE_MODE", MODES)


def _choice_from_env(name: str, choices: tuple[str, ...]) -> str:
    """The environment variable `name`, one of `choices` (unset: the first), or a
    one-line refusal."""
    from ..errors import InvalidInput

    value = os.environ.get(name) or choices[0]
    if value not in choices:
        raise InvalidInput(f"{name}={value[:40]!r} is not one of {', '.join(choices)}")
    return value


def _mode_options(backend: str, mode: str) -> dict:
    """torch.compile's `mode`, where it means something: inductor's, other than its default."""
    return {"mode": mode} if backend == "inductor" and mode != "default" else {}


# What `--compile` compiles: the step (the default: one graph, forward and losses, its
# backward with it); only the denoiser's repeated blocks (diffusers' regional
# compilation: each block's code compiled once and reused by its siblings, a fraction of
# the compile time, the rest of the step eager); or the whole step, the update after the
# backward pass too (gradient clipping and AdamW: compile_update). Measured on a GPU
# before any wins.
SCOPES = ("step", "blocks", "whole")


def compile_scope() -> str:
    """SCENEBREAK_COMPILE_SCOPE (a knob for the GPU benchmarks), else "step"."""
    return _choice_from_env("SCENEBREAK_COMPILE_SCOPE", SCOPES)


def compile_blocks(denoiser, mode: str = "default", backend: str = "inductor") -> None:
    """The denoiser's repeated blocks (its `_repeated_blocks`: UNet's transformer blocks,
    FLUX's double- and single-stream blocks) compiled in place, static shapes."""
    import torch._dynamo

    prepare_dynamo()
    use_compile_cache()
    # One compiled block's code serves its siblings of the same shapes; blocks of other
    # widths, and each block whose attention map is recorded (its name is a constant in
    # the graph), compile once more: SD2.1 needs more than dynamo's default 8, after
    # which the rest would run uncompiled.
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, 64)
    denoiser.compile_repeated_blocks(dynamic=False, backend=backend, **_mode_options(backend, mode))


def compile_step(step_losses, backend: str = "inductor", mode: str = "default"):
    """`step_losses` compiled with static shapes: every step has the same (StepBatch),
    so only the change of phase (which weights need gradients) compiles once more.
    Where CUDA graphs cannot be captured (a CPU tensor, a mutated input), inductor runs
    the compiled code without them and logs why in one line."""
    import torch

    prepare_dynamo()
    use_compile_cache()
    return torch.compile(step_losses, dynamic=False, backend=backend, **_mode_options(backend, mode))


def compile_update(update, backend: str = "inductor", mode: str = "default"):
    """`update` (the trainer's gradient clipping and optimizer step) compiled: the
    gradients' norm and AdamW's update of every tensor run as a few fused kernels, and
    under a CUDA-graph mode they replay as graphs after the forward's and the
    backward's, so that no part of the step launches kernel by kernel. Dynamo makes a
    fresh CUDA AdamW capturable (its step counts stay on the GPU); a constant learning
    rate is a constant in the graph, so no tensor learning rate is needed. AdamW's
    step() breaks the graph once by design (it sets the grad mode): clipping and the
    update are two graphs."""
    import torch

    use_compile_cache()
    return torch.compile(update, dynamic=False, backend=backend, **_mode_options(backend, mode))
