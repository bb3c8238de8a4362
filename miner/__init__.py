"""Models and mining on tensors and arrays: CAM, attention mining, boxes, metrics, and the
registry of localisation methods (``methods``). No files, no Prefect."""
