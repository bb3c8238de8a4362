"""Releases: the versioned folder, boxes.parquet, COCO JSON and the HTML harvest report."""
