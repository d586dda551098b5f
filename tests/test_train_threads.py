"""Tests of ``--threads auto``: it picks the faster thread count, notices a slowdown, and its
throw-away timing steps leave the training itself untouched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from train_helpers import load_params, make_mnist, run, tiny_config, without_timing

from train import threads as threads_module
from train.threads import Threads


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(threads_module, "cores", lambda: 2)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cores_are_the_affinity_on_linux_and_the_machine_s_elsewhere(monkeypatch):
    assert threads_module.cores() == len(os.sched_getaffinity(0))
    monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS
    assert threads_module.cores() == (os.cpu_count() or 1)


def sleeper(seconds_by_count: dict, calls: list):
    """A stand-in for a training step whose duration depends on the thread count."""

    def step():
        calls.append(torch.get_num_threads())
        time.sleep(seconds_by_count[torch.get_num_threads()])

    return step


@pytest.mark.parametrize("faster", [1, 2])
def test_auto_keeps_the_faster_count(two_cores, faster):
    t = Threads(None)
    assert t.auto and t.candidates == (1, 2) and t.current == 2
    calls = []
    t.choose(sleeper({faster: 0.001, 3 - faster: 0.004}, calls))
    assert t.current == faster and torch.get_num_threads() == faster
    assert set(calls) == {1, 2}


def test_auto_stops_early_on_a_clear_winner(two_cores):
    t, calls = Threads(None), []
    t.choose(sleeper({1: 0.001, 2: 0.03}, calls))
    assert t.current == 1 and calls == [1, 2]  # one round was enough


def test_a_fixed_count_is_never_timed(two_cores):
    t, calls = Threads(2), []
    t.choose(sleeper({1: 0.0, 2: 0.0}, calls))
    assert not t.auto and calls == [] and torch.get_num_threads() == 2
    assert Threads(None, processes_here=2).candidates == (1,)  # two processes share the two cores


def test_a_slowdown_asks_for_a_new_choice(two_cores):
    t = Threads(None)
    asked = [t.step_took(0.01) for _ in range(2 * threads_module.WINDOW)]  # the first window: the baseline
    assert not any(asked)
    asked = [t.step_took(0.05) for _ in range(threads_module.WINDOW)]
    assert asked[-1] and not any(asked[:-1])
    assert t.most_used() == 2


def test_timing_steps_leave_the_training_untouched(two_cores, tmp_path, monkeypatch):
    """auto with trials at every epoch (and the choice held at 2 threads) trains exactly like --threads 2."""
    tiny = make_mnist(tmp_path / "mnist")
    trials = []
    original = Threads.choose

    def choose_but_keep(self, trial_step):
        trials.append(self.auto)
        monkeypatch.setattr(threads_module, "KEEP_MARGIN", 0.0)  # time both counts, switch never
        original(self, trial_step)

    monkeypatch.setattr(Threads, "choose", choose_but_keep)
    cfg = tiny_config(tiny, tmp_path / "auto", epochs=2, dropout=0.2, augment="affine", threads=None)
    auto = run(cfg)
    fixed = run(tiny_config(tiny, tmp_path / "fixed", epochs=2, dropout=0.2, augment="affine", threads=2))
    assert trials == [True, True, False, False] and auto["environment"]["threads"] == "auto"
    assert without_timing(auto["epochs"]) == without_timing(fixed["epochs"])
    a, b = load_params(Path(cfg.out)), load_params(tmp_path / "fixed")
    assert all(torch.equal(a[k], b[k]) for k in a)
