"""Running at scale: the DeepSpeed engine, checkpoints, ranks/SLURM/preemption, and run logging."""
