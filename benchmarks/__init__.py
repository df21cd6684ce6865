"""Reproducible performance measurements; each prints a ratio on its last line."""
