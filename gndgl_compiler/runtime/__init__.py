"""The runtime: run configuration, data, the executor and its seams, the Trainer, checkpoints, metrics,
distributed ranks."""
