"""Every private PyTorch API manualgrad uses lives in manualgrad/_compat.py; this calls each of them, so a torch
release that renames or removes one fails here, loudly, rather than in some backward."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import vmap

from manualgrad import _compat


def test_forward_ad_enabled():
    assert _compat.forward_ad_enabled() is False
    with fwAD.dual_level():
        assert _compat.forward_ad_enabled() is True
    seen = []
    vmap(lambda t: seen.append(_compat.forward_ad_enabled()) or t)(torch.ones(2))
    assert seen == [True]


def test_functorch_active():
    assert _compat.functorch_active() is False
    seen = []
    vmap(lambda t: seen.append(_compat.functorch_active()) or t)(torch.ones(2))
    assert seen == [True]


def test_traced():
    t = torch.ones(2)
    assert _compat.traced(t) is False
    seen = []
    vmap(lambda x: seen.append(_compat.traced(x)) or x)(torch.ones(2, 2))
    assert seen == [True]


def test_assert_async():
    _compat.assert_async(torch.tensor(True), "fine")
    with pytest.raises(RuntimeError, match="failed"):
        _compat.assert_async(torch.tensor(False), "failed")


def test_private_names_stay_in_the_compat_module():
    """The library names no private torch API outside _compat.py (the tests may)."""
    import pathlib
    import re

    root = pathlib.Path(_compat.__file__).parent
    pattern = re.compile(r"torch\._C\.|\._forward_ad\._|torch\._[a-z_]+\(|\._base\b|\._parameters\b|\._modules\b")
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        if path.name != "_compat.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_queue_callback_runs_at_the_end_of_the_backward_pass():
    order = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            _compat.queue_callback(lambda: order.append("callback"))
            order.append("backward")
            return g * 2

    x = torch.ones(2, requires_grad=True)
    (Probe.apply(x) * 3).sum().backward()
    order.append("after")
    assert order == ["backward", "callback", "after"]


def test_graph_task_id():
    assert _compat.graph_task_id() == -1
    seen = []
    x = torch.ones(2, requires_grad=True)
    for _ in range(2):
        y = x * 2
        y.register_hook(lambda g: seen.append(_compat.graph_task_id()) or g)
        y.sum().backward()
    assert seen[0] >= 0 and seen[1] != seen[0]


def test_has_call_hooks():
    module = torch.nn.Linear(2, 2)
    assert _compat.has_call_hooks(module) is False
    handle = module.register_forward_pre_hook(lambda m, i: None)
    assert _compat.has_call_hooks(module) is True
    handle.remove()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        assert _compat.has_call_hooks(module) is True
    finally:
        handle.remove()
    assert _compat.has_call_hooks(module) is False
