"""Benchmarks: `python -m experiments.benchmarks.attention --out DIR`."""
