"""Fitting service: turns filter survivors into candidates (worker + GPUs + claims)."""
