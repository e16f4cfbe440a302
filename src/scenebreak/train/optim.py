"""Optimizers of the trainer: AdamW (fused, or 8-bit with bitsandbytes), either stepped
after the backward pass as usual, or inside it, one tensor at a time."""

from __future__ import annotations

import torch

from ..errors import InvalidInput, SceneBreakError

BNB_HINT = "pipx inject scenebreak bitsandbytes (or pip install 'scenebreak[cuda]')"


def bitsandbytes_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def check_adam_8bit(device) -> None:
    """8-bit AdamW runs only on CUDA, with bitsandbytes installed: say which is missing."""
    if device.type != "cuda":
        raise InvalidInput("--adam-8bit needs a CUDA device")
    if not bitsandbytes_available():
        raise SceneBreakError(f"--adam-8bit needs bitsandbytes: {BNB_HINT}")


def adamw_factory(config, device, eight_bit: bool = False):
    """A function from parameter groups to an AdamW with the run's settings (8-bit
    with bitsandbytes when `eight_bit`)."""
    kwargs = dict(betas=tuple(config.adam_betas), weight_decay=config.adam_weight_decay, eps=config.adam_eps)
    if eight_bit:
        check_adam_8bit(device)
        import bitsandbytes as bnb

        return lambda groups: bnb.optim.AdamW8bit(groups, **kwargs)
    # The fused kernel is faster and needs no foreach scratch copies of every tensor.
    fused = device.type in fused_adamw_devices()
    return lambda groups: torch.optim.AdamW(groups, fused=fused, **kwargs)


def fused_adamw_devices() -> set[str]:
    """The device types this torch has a fused AdamW for (MPS's came after CUDA's and
    the CPU's), from torch's own list where it has one."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # (a private name: an older or newer torch may lack it)
        return {"cuda", "cpu"}
    return set(_get_fused_kernels_supported_devices()) & {"cuda", "cpu", "mps", "xpu"}


# bitsandbytes' step() runs its update kernel for each tensor and then synchronises
# the whole GPU, every tensor: stepped inside the backward pass, that is ~880 full
# syncs per SD2.1 step. The update itself is an ordinary kernel on the current stream,
# ordered after the gradient that produced it, so it needs no sync; these are the
# methods its step() calls around it.
_BNB_STEP_PARTS = ("init_state", "prefetch_state", "update_step", "check_overrides", "to_gpu")


def can_update_without_sync(optimizer) -> bool:
    """A bitsandbytes optimizer whose per-tensor update can be driven directly."""
    return type(optimizer).__module__.startswith("bitsandbytes") and all(hasattr(optimizer, n) for n in _BNB_STEP_PARTS)


@torch.no_grad()
def update_without_sync(optimizer, param: torch.Tensor) -> None:
    """What bitsandbytes' step() does for one tensor of a one-tensor optimizer, less the
    device-wide synchronize after it."""
    if not getattr(optimizer, "initialized", True):
        optimizer.check_overrides()
        optimizer.to_gpu()
        optimizer.initialized = True
    group = optimizer.param_groups[0]
    if param.grad is None:
        return
    if len(optimizer.state[param]) == 0:
        optimizer.init_state(group, param, 0, 0)
    optimizer.prefetch_state(param)
    optimizer.update_step(group, param, 0, 0)


class OptimizerInBackward:
    """One optimizer per tensor, stepped by a hook as soon as that tensor's gradient is
    complete, which then frees the gradient: the gradients of the whole model never
    live at once (for SD2.1's 1.2 B trained parameters, 4.5 GiB saved).

    The one difference from stepping after the backward pass: gradient clipping is
    per tensor (each tensor's gradient norm to `max_norm`), since the global norm is
    known only when every gradient exists. Adam's update is nearly invariant to the
    scale of the gradient, so this changes little (docs/method.md)."""

    def __init__(self, groups: list[dict], make, max_norm: float | None):
        self.groups = groups
        self.params = [p for g in groups for p in g["params"]]
        self.max_norm = max_norm
        self.optimizers = {}
        for group in groups:
            settings = {k: v for k, v in group.items() if k != "params"}
            for p in group["params"]:
                self.optimizers[p] = make([{"params": [p], **settings}])
        self._hooks = [p.register_post_accumulate_grad_hook(self._step) for p in self.params]

    def _step(self, param: torch.Tensor) -> None:
        if self.max_norm:
            torch.nn.utils.clip_grad_norm_([param], self.max_norm)
        optimizer = self.optimizers[param]
        if can_update_without_sync(optimizer):
            update_without_sync(optimizer, param)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Nothing left to do: every tensor was stepped during the backward pass."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: the hooks free each gradient after its step."""

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # The same layout as one optimizer over all the tensors, so a checkpoint made
    # either way resumes either way.
    def state_dict(self) -> dict:
        state, param_groups, index = {}, [], 0
        for group in self.groups:
            indices = []
            for p in group["params"]:
                inner = self.optimizers[p].state_dict()
                if inner["state"]:
                    state[index] = inner["state"][0]
                indices.append(index)
                index += 1
            settings = self.optimizers[group["params"][0]].state_dict()["param_groups"][0] if group["params"] else {}
            param_groups.append({**{k: v for k, v in settings.items() if k != "params"}, "params": indices})
        return {"state": state, "param_groups": param_groups}

    def load_state_dict(self, saved: dict) -> None:
        sizes = [len(g["params"]) for g in self.groups]
        saved_sizes = [len(g["params"]) for g in saved["param_groups"]]
        if sizes != saved_sizes:
            # Another phase's or another tuning's state: loading it would give every tensor
            # the wrong settings (e.g. phase 1's learning rate for the whole UNet).
            raise ValueError(f"optimizer state of parameter groups {saved_sizes} does not fit groups {sizes}")
        index = 0
        for group, saved_group in zip(self.groups, saved["param_groups"]):
            settings = {k: v for k, v in saved_group.items() if k != "params"}
            for p in group["params"]:
                inner = {"state": {0: saved["state"][index]} if index in saved["state"] else {},
                         "param_groups": [{**settings, "params": [0]}]}
                self.optimizers[p].load_state_dict(inner)
                index += 1
