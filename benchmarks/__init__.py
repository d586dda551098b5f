"""Benchmarks: manualgrad against native PyTorch, in the same process; ``python -m benchmarks``."""
