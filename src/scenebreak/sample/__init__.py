"""Sampling from a learned scene: a diffusers pipeline over a scene's models
(`pipeline`, `scene_models`), what generate, edit and extract-bg share (`sampling`),
and the jobs themselves: `generate`, `edit` (with extract_background) and Blended
Latent Diffusion (`blending`).
May import: masks (mask operations), scenes, families and the ground modules."""
