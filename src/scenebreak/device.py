"""Choosing the device and the precision, in one place.

`SCENEBREAK_CPU_BF16` overrides whether the CPU counts as having bf16 instructions
(AVX512-BF16 or AMX): `0` acts as if it had none (fp32 training and sampling on the
CPU, `bf16` refused), `1` as if it had them (bf16 autocast; where they are missing,
torch emulates them, slowly). The test suite runs its precision-sensitive tests both
ways with it, so that every CPU tests both."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
from dataclasses import dataclass

from .errors import DeviceNotAvailable, InvalidInput

DEVICES = ("auto", "cuda", "mps", "cpu")


def autocast_off(device_type: str):
    """Autocast turned off for a block (what runs there is in its tensors' own dtypes).
    torch before 2.5 has no autocast for MPS and refuses even to turn it off there: on
    such a device there is nothing to turn off. (No try here: compiled steps trace this.)"""
    import torch

    if device_type == "mps" and not _mps_autocast():
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def fp32_layers(model, dtype) -> list:
    """The layers of a transformers `model` that transformers keeps in fp32 when it loads
    the model in the half precision `dtype` (T5's `wo` projections in fp16, which
    overflow there: FLUX.1's T5 then gives clamped or NaN prompt states)."""
    import torch

    names = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return [module for name, module in model.named_modules() if names.intersection(name.split("."))] if names else []


def is_bitsandbytes_weight(param) -> bool:
    """A weight of bitsandbytes' layers: packed, or float until the move to a device
    packs it; it moves, but is never cast."""
    return type(param).__module__.startswith("bitsandbytes")


def hold_in_fp32(models, dtype, device_type: str | None = None) -> list:
    """The layers of `models` that transformers keeps in fp32 for `dtype` (fp32_layers),
    made fp32 (a cast of the whole model to `dtype` undid it; a model loaded in its
    files' bf16 has them in bf16) and, given `device_type`, run in fp32 under any
    autocast (run_in_fp32); returns them. Packed (bitsandbytes) weights stay as they
    are. Calling it again changes nothing."""
    layers = [layer for model in models for layer in fp32_layers(model, dtype)]
    for layer in layers:
        for param in layer.parameters():
            if param.is_floating_point() and not is_bitsandbytes_weight(param):
                param.data = param.data.float()
        if device_type is not None:
            run_in_fp32(layer, device_type)
    return layers


def run_in_fp32(module, device_type: str) -> None:
    """`module` runs in fp32 (its input widened) with autocast off, whatever autocast is
    around it: under fp16 autocast a layer kept in fp32 would still multiply in fp16."""
    if getattr(module, "_scenebreak_fp32", False):
        return
    forward = module.forward

    def fp32_forward(hidden, *args, **kwargs):
        with autocast_off(device_type):
            return forward(hidden.float(), *args, **kwargs)

    module.forward, module._scenebreak_fp32 = fp32_forward, True


def _tf32_switches() -> list | None:
    """The objects whose `fp32_precision` torch (2.9 on) sets TF32 by, or None before it."""
    import torch

    backends = torch.backends
    if not hasattr(backends.cuda.matmul, "fp32_precision"):
        return None
    return [backends, backends.cuda.matmul, backends.cudnn, backends.cudnn.conv, backends.cudnn.rnn]


def allow_tf32() -> None:
    """fp32 matrix products and convolutions in TF32 on CUDA (the others' precision is
    left). Through torch's newer settings where it has them: after a caller set those,
    the older flags fail even to be read ("mix of the legacy and new APIs")."""
    import torch

    if _tf32_switches() is not None:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def tf32_settings_kept():
    """torch's TF32 settings as they were before the block, after it (a Python caller's
    own work after `learn`), read and written through the same settings the block uses."""
    import torch

    switches = _tf32_switches()
    if switches is not None:
        kept = [(switch, switch.fp32_precision) for switch in switches]
    else:
        kept = [(torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32),
                (torch.backends.cudnn, torch.backends.cudnn.allow_tf32)]
    try:
        yield
    finally:
        for switch, value in kept:
            setattr(switch, "fp32_precision" if switches is not None else "allow_tf32", value)


@functools.cache
def _mps_autocast() -> bool:
    import torch

    try:
        torch.autocast("mps", enabled=False)
    except RuntimeError:  # "unsupported autocast device_type 'mps'"
        return False
    return True


@dataclass(frozen=True)
class Device:
    type: str  # cuda | mps | cpu
    name: str  # e.g. "cuda:0"

    @property
    def torch(self):
        import torch

        return torch.device(self.name)

    def train_dtype(self, mixed_precision: str = "auto"):
        """The autocast dtype for training (None: full fp32)."""
        import torch

        if mixed_precision in ("no", "fp32"):
            return None
        if self.type == "cuda":
            if mixed_precision == "fp16":
                return torch.float16
            # bf16 where this card runs it natively (Ampere and newer); older cards
            # (T4, V100) emulate it slowly, so they get fp16 with loss scaling.
            if mixed_precision == "bf16" or self.native_bf16():
                return torch.bfloat16
            return torch.float16
        if self.type == "cpu" and mixed_precision == "bf16":
            if not cpu_has_bf16():
                raise InvalidInput("--mixed-precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX): use auto")
            return torch.bfloat16
        if mixed_precision in ("fp16", "bf16"):
            raise InvalidInput(f"--mixed-precision {mixed_precision} needs a CUDA device" + (" (bf16: or a CPU with bf16 instructions)" if mixed_precision == "bf16" else ""))
        if self.type == "cpu" and cpu_has_bf16():
            return torch.bfloat16  # about 1.5x faster steps where the CPU has bf16 instructions
        return None  # MPS, and CPUs without bf16: fp32

    def infer_dtype(self):
        """The dtype of the weights for generation: half precision on GPUs, fp32 on CPU."""
        import torch

        return torch.float32 if self.type == "cpu" else torch.float16

    def sampling_precision(self, precision: str = "auto", prefer_bf16: bool = False):
        """(weights dtype, autocast dtype or None) for sampling at `precision`
        (config.SAMPLING_PRECISIONS). GPUs hold the weights in half precision (fp16; bf16
        with `prefer_bf16`, for a family trained and published in it, FLUX.1, on a CUDA
        card that runs it natively); a CPU keeps fp32 weights and latents and runs the
        UNet and text encoders under bf16 autocast where it has bf16 instructions (1.74x
        faster steps: benchmarks/train_step.py's generation rows). The VAE is never under
        autocast: it runs in its weights' dtype (fp32 on the CPU)."""
        import torch

        if precision == "fp32":
            return torch.float32, None
        if self.type == "cpu":
            if precision == "fp16":
                raise InvalidInput("--precision fp16 needs a GPU: use bf16 (on CPUs with bf16 instructions) or fp32")
            if precision == "bf16" and not cpu_has_bf16():
                raise InvalidInput("--precision bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX): use auto")
            return torch.float32, (torch.bfloat16 if cpu_has_bf16() else None)
        if precision == "bf16":
            if self.type == "mps" and not mps_has_bf16():
                raise InvalidInput("--precision bf16 on MPS needs macOS 14 or newer: use auto (fp16) or fp32")
            return torch.bfloat16, None
        if precision == "auto" and prefer_bf16 and (self.native_bf16() or (self.type == "mps" and mps_has_bf16())):
            # (fp16 would have FLUX.1 and T5 clip their activations; on a Mac since macOS 14
            # bf16 is there, emulated on M1/M2: slower, but FLUX's own precision.)
            return torch.bfloat16, None
        return torch.float16, None

    def native_bf16(self) -> bool:
        """A CUDA card that runs bf16 natively (Ampere and newer)."""
        import torch

        return self.type == "cuda" and torch.cuda.get_device_capability(self.torch) >= (8, 0)

    def autocast(self, dtype, cache: bool = True):
        """Mixed precision for `dtype` (None: none). `cache=False` re-casts weights at each
        use instead of keeping a half-precision copy of every weight for the step."""
        import torch

        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.type, dtype=dtype, cache_enabled=cache)

    def release_memory(self) -> None:
        """Give memory freed during a step back to the system. On Linux the C allocator
        keeps it otherwise, and the process creeps up by a GiB over a few steps."""
        if self.type != "cpu" or not sys.platform.startswith("linux"):
            return
        trim = _malloc_trim()
        if trim is not None:
            trim(0)

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on this device since the last reset (0 where unknown)."""
        import torch

        if self.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.torch))
        if self.type == "mps":
            return int(torch.mps.driver_allocated_memory())
        return 0

    def from_host(self, tensor):
        """`tensor`, made on the host, on this device without stopping the host: a copy
        from ordinary (pageable) memory to a CUDA GPU waits for all work queued before it,
        so each training step began by waiting for the last one's optimizer. From pinned
        memory it is queued like a kernel (torch's caching host allocator keeps the
        buffer until the copy is done)."""
        if self.type != "cuda":
            return tensor.to(self.torch)
        return tensor.pin_memory().to(self.torch, non_blocking=True)

    def synchronize(self) -> None:
        import torch

        if self.type == "cuda":
            torch.cuda.synchronize(self.torch)
        elif self.type == "mps":
            torch.mps.synchronize()


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim (None elsewhere, e.g. musl), looked up once, not per step."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def precision_name(dtype) -> str:
    """"bf16", "fp16" or "fp32" (None: no autocast) for messages and metadata."""
    return {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(dtype), "fp32")


CPU_BF16_ENV = "SCENEBREAK_CPU_BF16"


def cpu_has_bf16() -> bool:
    """Whether scenebreak uses bf16 on the CPU: where it has the instructions
    (cpu_bf16_instructions), unless `$SCENEBREAK_CPU_BF16` (0 or 1) says otherwise."""
    setting = os.environ.get(CPU_BF16_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise InvalidInput(f"{CPU_BF16_ENV}={setting!r}: use 0 (act as if this CPU had no bf16 instructions) "
                           "or 1 (as if it had them), or leave it unset")
    return setting == "1" if setting else cpu_bf16_instructions()


def cpu_bf16_instructions() -> bool:
    """Whether this CPU runs bf16 matrix products natively: AVX512-BF16 or AMX on x86,
    the BF16 extension on Arm. (oneDNN's own "bf16 supported" is true on any AVX-512
    CPU, where it emulates bf16 through fp32, slower than fp32 itself: Skylake to Ice
    Lake servers, which clouds still rent.)"""
    import platform

    import torch

    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mps_has_bf16() -> bool:
    """Whether MPS takes bf16 tensors here: macOS 14 and newer."""
    import torch

    try:
        return bool(torch.backends.mps.is_macos_or_newer(14, 0))
    except (AttributeError, RuntimeError):
        return False


def torch_without_cuda() -> bool:
    """This torch was built for the CPU alone (PyPI's wheel on Windows and macOS; a
    `+cpu` one), so a CUDA card here is never seen."""
    import torch

    return torch.version.cuda is None and getattr(torch.version, "hip", None) is None


def no_cuda_message() -> str:
    import torch

    if torch_without_cuda():
        return (f"this torch ({torch.__version__}) was built without CUDA: to use an NVIDIA GPU, install a CUDA build "
                "(pipx runpip scenebreak install torch --index-url https://download.pytorch.org/whl/cu128), or use "
                "--device cpu")
    return "CUDA is not available on this machine (no NVIDIA GPU or driver found): use --device cpu (or auto)"


def choose_device(requested: str | None = None) -> Device:
    """`requested` or `$SCENEBREAK_DEVICE`, else CUDA, then MPS, then CPU."""
    import torch

    if requested is not None and not isinstance(requested, str):
        requested = str(requested)  # a torch.device
    choice = (requested or os.environ.get("SCENEBREAK_DEVICE") or "auto").lower()
    kind = choice.split(":")[0]
    if kind not in DEVICES:
        raise DeviceNotAvailable(f"unknown device {choice!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    cuda_ok = torch.cuda.is_available()
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if kind == "auto":
        kind = "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
        choice = kind
    if kind == "cuda" and not cuda_ok:
        raise DeviceNotAvailable(no_cuda_message())
    if kind == "mps" and not mps_ok:
        raise DeviceNotAvailable("MPS (Apple GPU) is not available on this machine: use --device cpu (or auto)")
    if kind != "cuda" and ":" in choice:
        raise DeviceNotAvailable(f"unknown device {choice!r}: only CUDA devices take an index (cuda:N)")
    if kind == "cuda":
        index = choice.split(":", 1)[1] if ":" in choice else str(torch.cuda.current_device())
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise DeviceNotAvailable(f"no CUDA device {choice!r} ({torch.cuda.device_count()} present)")
        # Current too, so that libraries which ask for "the" GPU (and their default
        # streams) use this one, not GPU 0.
        torch.cuda.set_device(int(index))
        return Device(type="cuda", name=f"cuda:{index}")
    return Device(type=kind, name=kind)
