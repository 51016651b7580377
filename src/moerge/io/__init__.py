"""Reading checkpoints lazily and writing merged models atomically."""
