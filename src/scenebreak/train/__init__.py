"""`learn` and the trainer's parts: the learn job (`learn`), the two-phase training loop
(`trainer`), the attention maps the loss needs (`attention`), the losses, the handle
tokens' trainable rows (`tokens`), the optimizers, the memory plan, checkpoints, the
class images and the locks between processes.
May import: sample (the pipeline that makes class images), masks, scenes, families and
the ground modules."""
