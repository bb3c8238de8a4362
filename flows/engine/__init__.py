"""Where torch meets files: checkpoint files, shard data loaders, the epoch loop and the
mining of whole shards. No Prefect and no Dask here: the flows call these functions."""
