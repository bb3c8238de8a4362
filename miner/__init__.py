"""Models and mining on tensors and arrays: no files, no Prefect (arrives with training)."""
