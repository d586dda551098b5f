"""Interleaved timing: A B A B ..., in one process, medians of repeated runs.

Timing on a shared 2-core machine is noisy; running the contenders in
alternation (with the order rotated every round) exposes each one to the same
noise, and medians discard the outliers. Ratios of medians are what the
benchmarks report.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: str = "cpu",
    warmup: int = 3,
    rounds: int = 30,
    min_time: float = 0.02,
) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternation.

    Each round times every function once (a run of ``inner`` back-to-back
    calls, with ``inner`` chosen so a run lasts about ``min_time``), rotating
    the order from round to round so none always goes first.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    inner = {}
    for name in names:  # calls per timed run
        start = time.perf_counter()
        fns[name]()
        synchronize(device)
        once = max(time.perf_counter() - start, 1e-7)
        inner[name] = max(1, min(1000, int(min_time / once)))
    samples = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, n = fns[name], inner[name]
            synchronize(device)
            start = time.perf_counter()
            for _ in range(n):
                fn()
            synchronize(device)
            samples[name].append((time.perf_counter() - start) / n)
    return {name: statistics.median(s) for name, s in samples.items()}
