"""Models kept loaded between calls in one process: a notebook's loop of `generate`
calls, or the web page's Generate clicks, load a scene's models once, not per call.

One thing is kept (the last scene's pipeline), and it is lent to one caller at a time:
`take` hands it over and empties the keeper, `keep` puts it back when the caller's work
ended well. A call that fails or is interrupted never puts back what it half used, and a
second caller meanwhile (another thread) loads its own. Anything else kept is dropped
before a new load, and its memory handed back, so that one scene's models never wait
beside another's; `learn` drops it too, for the room its memory plan counts on."""

from __future__ import annotations

import functools
import threading

_lock = threading.Lock()
_held: tuple | None = None  # (key, thing)

# Building models is not thread-safe: diffusers' loading (accelerate's empty weights) and
# peft's patch torch.nn.Module for the whole process while they run, so that a module
# another thread builds meanwhile gets its weights on the meta device ("Cannot copy out
# of meta tensor": two threads' first generate, or the page's detector loading during a
# learn). One thread builds models at a time; the others wait.
_building = threading.RLock()


def one_builder_at_a_time(build):
    """`build` (a function that loads or makes models) run by one thread at a time."""
    @functools.wraps(build)
    def built(*args, **kwargs):
        with _building:
            return build(*args, **kwargs)

    return built


def take(key):
    """What is kept under `key`, now the caller's alone, or None. Anything kept under
    another key is dropped, its memory given back, before the caller loads its own."""
    global _held
    with _lock:
        held, _held = _held, None
    if held is None:
        return None
    if held[0] == key:
        return held[1]
    del held
    free_memory()
    return None


def keep(key, thing) -> None:
    """Keep `thing` under `key` for the next `take`; what was kept before is dropped."""
    global _held
    with _lock:
        before, _held = _held, (key, thing)
    if before is not None and before[1] is not thing:
        del before
        free_memory()


def unload() -> None:
    """Drop what is kept (the last scene's models) and give its memory back: for a
    Python caller's own work on the GPU between scenebreak's calls."""
    drop()
    free_memory()


def drop() -> None:
    """Drop what is kept; its memory goes as soon as nothing else holds it."""
    global _held
    with _lock:
        _held = None


def holding() -> bool:
    """Whether anything is kept."""
    return _held is not None


def free_memory() -> None:
    """Collect what only reference cycles still hold (a finished training, a failed
    call's frames) and hand the GPU allocator's cache back, so that the next models load
    into the room it frees and memory plans see it free."""
    import gc

    gc.collect()
    empty_gpu_cache()


def empty_gpu_cache() -> None:
    """Hand the memory cached by the GPU's allocator back (CUDA's or Apple's), so that a
    smaller retry or the next models fit."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        torch.mps.empty_cache()
