"""Labelled images: the landing zone, per-row checks, the manifest formats, splits, the benchmark and validation."""
