"""How many CPU threads torch uses: a fixed number, or ``auto``: time a few throw-away steps with 1 thread and with
all this process's cores, every epoch and when steps slow down twofold, and train with the faster (see the README)."""

from __future__ import annotations

import collections
import os
import statistics
import time
from collections.abc import Callable

import torch

TRIALS = 3  # throw-away steps per candidate, interleaved; the fastest of each counts
CLEAR_WIN = 2.0  # after a round, a candidate this many times faster than the others wins at once
KEEP_MARGIN = 0.9  # switch only to a candidate at least 10% faster than the current one
WINDOW = 10  # steps whose median step time is compared with the one after the last choice
SLOWDOWN = 2.0  # that many times slower: choose again


def cores() -> int:
    """The cores this process may run on: its CPU affinity on Linux, elsewhere all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Threads:
    """Sets torch's thread count: ``requested`` (a number), or chosen by timing when it is None."""

    def __init__(self, requested: int | None, processes_here: int = 1, device: torch.device | None = None):
        mine = max(1, cores() // processes_here)  # the processes of this machine share its cores
        on_cpu = device is None or device.type == "cpu"  # on a GPU, CPU threads hardly matter
        self.candidates = (requested,) if requested is not None else (1, mine) if mine > 1 and on_cpu else (mine,)
        self.current, self.auto = self.candidates[-1], len(self.candidates) > 1  # auto: chosen by timing
        self.steps = collections.Counter()  # steps taken with each count since the epoch began
        self._times, self._baseline = [], None  # step times since the last choice, and their first median
        torch.set_num_threads(self.current)

    def describe(self) -> str:
        if self.auto:
            return f"threads auto ({' or '.join(map(str, self.candidates))}, now {self.current})"
        return f"{self.current} thread{'s' if self.current > 1 else ''}"

    def choose(self, trial_step: Callable[[], None]) -> None:
        """Time ``trial_step`` (a throw-away training step) with each candidate and keep the fastest."""
        if not self.auto:
            return
        best = {}
        for _ in range(TRIALS):
            for count in self.candidates:
                torch.set_num_threads(count)
                start = time.perf_counter()
                trial_step()
                best[count] = min(best.get(count, float("inf")), time.perf_counter() - start)
            if max(best.values()) > CLEAR_WIN * min(best.values()):  # e.g. all cores on a busy machine
                break
        fastest = min(best, key=best.get)
        if best[fastest] < KEEP_MARGIN * best[self.current]:
            self.current = fastest
        torch.set_num_threads(self.current)
        self._times, self._baseline = [], None

    def step_took(self, seconds: float) -> bool:
        """Record a training step's time; True when steps have slowed down enough to choose again."""
        self.steps[self.current] += 1
        if not self.auto:
            return False
        self._times.append(seconds)
        if len(self._times) < WINDOW:
            return False
        median, self._times = statistics.median(self._times), []
        if self._baseline is None:
            self._baseline = median
            return False
        return median > SLOWDOWN * self._baseline

    def most_used(self) -> int:
        return self.steps.most_common(1)[0][0] if self.steps else self.current
