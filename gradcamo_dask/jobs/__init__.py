"""Jobs that compose the stages: scoring a plate, training, the demo, clusters (local, CUDA, SLURM, TLS)."""
