"""Measuring a scene: the paper's two metrics over fixed prompts (`evaluate`), the
scoring models (`metrics`), the scatter plot (`plots`), and where each handle's
attention looks (`diagnostics`, the mechanics check).
May import: train, sample, masks, scenes, families and the ground modules."""
