"""Data: named data sets decoded into memory, the decode-once cache, image folders and downsampled ImageNet,
deterministic batches, and the streamed path (index, shards, transforms, feeds, which ranks read images)."""
