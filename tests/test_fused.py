"""manualgrad.fused_backward (functions/fused.py): each activation's G_Y ⊙ h' compiled into one pass gives the
plain formula's gradient, runs only where it can, and says so when it cannot compile."""

from __future__ import annotations

import warnings

import pytest
import torch
from support import CUDA, TOL, example, example_params, outputs_and_grads

import manualgrad
from manualgrad.functions import fused


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Every test starts switched off, with nothing compiled or refused yet."""
    monkeypatch.setattr(fused._State, "enabled", False)
    monkeypatch.setattr(fused._State, "min_numel", fused.MIN_NUMEL)
    monkeypatch.setattr(fused._State, "compiled", {})


def calls(monkeypatch) -> list:
    """The Functions whose compiled backward ran (appended to as they run)."""
    ran, run = [], fused.run

    def counting(owner, *args):
        out = run(owner, *args)
        if out is not None:
            ran.append(owner)
        return out

    monkeypatch.setattr(fused, "run", counting)
    return ran


#: every activation's examples, and LayerNorm's (GroupNorm's backward stays plain: test below)
COMPILED = example_params("activation") + example_params(where=lambda op: op.name == "layer_norm")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op, index", COMPILED)
def test_fused_backward_equals_the_plain_formula(op, index, dtype, device, monkeypatch):
    """float64: equal to rounding. Lower precisions, where one pass rounds differently from several: no farther
    from the float64 gradient than the plain formula or PyTorch's own kernel is."""
    ran = calls(monkeypatch)
    args, kwargs = example(op, index, dtype, device)
    g = torch.randn_like(op.functional(*args, **kwargs))
    _, plain = outputs_and_grads(op.functional, args, kwargs, g)
    assert not ran
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile warns: it must not happen here
        with manualgrad.fused_backward(min_numel=0):
            _, one_pass = outputs_and_grads(op.functional, args, kwargs, g)
    assert ran == [op.function]
    assert [t.dtype for t in one_pass] == [t.dtype for t in plain]
    if dtype == torch.float64:
        for ours, theirs in zip(one_pass, plain):
            torch.testing.assert_close(ours, theirs, rtol=TOL[dtype][0], atol=TOL[dtype][1])
        return
    _, torchs = outputs_and_grads(op.reference, args, kwargs, g)
    wide = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    _, exact = outputs_and_grads(op.functional, wide, kwargs, g.double())
    for i, truth in enumerate(exact):

        def error(t, truth=truth):
            difference = (t.double() - truth).abs()
            return float(difference.max()) if difference.numel() else 0.0  # an empty example has none

        assert error(one_pass[i]) <= max(error(plain[i]), error(torchs[i])), (i, error(one_pass[i]), error(plain[i]))


def test_group_norm_keeps_the_plain_backward(monkeypatch):
    """GroupNorm's G_X compiled was measured slower than the plain formulas: it is not compiled."""
    ran = calls(monkeypatch)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    with manualgrad.fused_backward(min_numel=0):
        manualgrad.functional.group_norm(x, 3).sum().backward()
    assert ran == [] and fused._State.compiled == {}


def test_fused_backward_is_a_switch_and_a_context_manager():
    assert not fused._State.enabled
    with manualgrad.fused_backward(min_numel=10):
        assert (fused._State.enabled, fused._State.min_numel) == (True, 10)
        with manualgrad.fused_backward(False):
            assert not fused._State.enabled
        assert fused._State.enabled
    assert (fused._State.enabled, fused._State.min_numel) == (False, fused.MIN_NUMEL)
    manualgrad.fused_backward()  # called: on for the process (the fixture switches it back)
    assert fused._State.enabled


@pytest.mark.parametrize("bad", [dict(enabled=1), dict(enabled=None), dict(min_numel=-1), dict(min_numel=2.5)])
def test_fused_backward_refuses_bad_arguments(bad):
    with pytest.raises(TypeError, match="fused_backward: (enabled|min_numel) must be"):
        manualgrad.fused_backward(**bad)
    assert not fused._State.enabled


def test_small_tensors_double_backward_and_vmap_take_the_plain_formula(monkeypatch):
    ran = calls(monkeypatch)
    z = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    with manualgrad.fused_backward():  # 35 elements, below min_numel
        manualgrad.functional.gelu(z).sum().backward()
    assert ran == [] and fused._State.compiled == {}
    with manualgrad.fused_backward(min_numel=0):
        (g,) = torch.autograd.grad(manualgrad.functional.gelu(z).sum(), z, create_graph=True)  # records: plain
        (gg,) = torch.autograd.grad(g.sum(), z)
        per_row = torch.func.vmap(torch.func.grad(lambda r: manualgrad.functional.tanh(r).sum()))(z)
    assert ran == []
    zr = z.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(torch.nn.functional.gelu(zr).sum(), zr, create_graph=True)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(gg, torch.autograd.grad(g_ref.sum(), zr)[0])
    torch.testing.assert_close(per_row, 1 - torch.tanh(z.detach()) ** 2)


def test_a_failed_compile_warns_once_and_the_plain_formula_runs(monkeypatch):
    def broken(formula, name):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(fused, "_compile", broken)
    z = torch.randn(300, dtype=torch.float64, requires_grad=True)
    with manualgrad.fused_backward(min_numel=0):
        with pytest.warns(RuntimeWarning, match="SiLUFunction could not be compiled .*no C\\+\\+ compiler"):
            manualgrad.functional.silu(z).sum().backward()
        first = z.grad
        z.grad = None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            manualgrad.functional.silu(z).sum().backward()
    s = torch.sigmoid(z.detach())
    torch.testing.assert_close(first, s * (1 + z.detach() * (1 - s)))
    torch.testing.assert_close(z.grad, first)
