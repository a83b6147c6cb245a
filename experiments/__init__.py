"""Experiments: configs (one per experiment), the one CLI (``experiments.train``),
benchmarks and notebooks."""
