"""scenebreak: learn one text handle per object from a single photo (Break-A-Scene).

    >>> import scenebreak
    >>> result = scenebreak.learn("photo.jpg", ["m1.png", "m2.png"])
    >>> scenebreak.generate(result.path, "<asset1> on the moon")
    >>> scenebreak.edit("street.jpg", [("spot.png", "a photo of <asset1>")], result.path)

Heavy modules (torch, diffusers) load on first use, so `import scenebreak` is quick.
"""

__version__ = "0.1.0"

_LAZY = {
    "learn": "train.learn", "LearnResult": "train.learn",
    "generate": "sample.generate", "GenerateResult": "sample.sampling",
    "edit": "sample.edit", "extract_background": "sample.edit",
    "load_scene": "scenes.bundle", "save_scene": "scenes.bundle", "list_scenes": "scenes.bundle", "Scene": "scenes.bundle",
    "remove_scenes": "train.interrupted", "interrupted_runs": "train.interrupted", "InterruptedRun": "train.interrupted",
    "LearnConfig": "config", "GenerateConfig": "config", "EditConfig": "config", "BackgroundConfig": "config",
    "MaskConfig": "config",
    "SceneBreakError": "errors", "UsageError": "errors", "InvalidInput": "errors", "InvalidMask": "errors",
    "UnknownHandle": "errors", "BundleError": "errors", "DeviceNotAvailable": "errors",
    "ModelNotAvailable": "errors", "OutOfMemory": "errors", "Interrupted": "errors", "NoSpace": "errors",
    "Diverged": "errors", "Terminated": "errors", "HungUp": "errors", "CheckpointMismatch": "errors",
    "choose_device": "device",
    "export_scene": "exports.export", "export": "exports.export",
    "make_masks": "masks.masking", "MaskRun": "masks.masking", "MaskResult": "masks.files",
    "evaluate": "evaluation.evaluate", "EvaluateResult": "evaluation.evaluate", "EvaluateConfig": "config",
    "run_batch": "batch.runner", "BatchResult": "batch.runner",
    "unload": "kept",
}

__all__ = ["__version__", *_LAZY]


def __dir__():  # the lazy names too, for tab completion in a notebook
    return sorted({*globals(), *_LAZY})


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'scenebreak' has no attribute {name!r}")
