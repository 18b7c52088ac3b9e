"""One training step: the executor, its static plan, stage runners and stage outputs, the updater, optimizers and
learning rates, per-partition random streams, CUDA graphs, regional compile, devices, MAN's EMA update."""
