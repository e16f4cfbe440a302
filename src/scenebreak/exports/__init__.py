"""A scene in formats other tools load: a diffusers folder, textual-inversion files, or
the AUTOMATIC1111/Forge/ComfyUI folder (`export`, `a1111`), with the phase-2 weights
as a kohya LoRA (`kohya`).
May import: sample, scenes, families and the ground modules."""
