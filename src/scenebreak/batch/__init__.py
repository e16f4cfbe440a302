"""`batch`: many jobs (photo, masks or words, settings, prompts) from a JSON Lines file,
run on this machine's devices (`runner`), on a Ray cluster (`ray_runner`) or as Slurm
array shards: checked up front (`jobs`), each job run start to finish by `work` (masks,
learn, generate), resumable and idempotent, one runner per job across machines.
May import: train, sample, masks, scenes, families and the ground modules."""
