"""Stage formats: what one stage writes and the next reads (index, shards, batches, run
folders and checkpoints, harvest parts), all written atomically."""
