"""Checkpoints: the format (atomic, verified, never unpickled), the state codec, RNG state, checkpoint directories, one
file per rank, and re-placing partitions on another world size."""
