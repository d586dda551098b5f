"""Property-based: Linear against torch.nn.functional.linear over random shapes, biases and gradient subsets."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import manualgrad.functional as MF


@settings(max_examples=60, deadline=None)
@given(
    leading=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    in_features=st.integers(1, 9),
    out_features=st.integers(1, 9),
    bias=st.booleans(),
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans()).filter(any),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_matches_torch(leading, in_features, out_features, bias, needs, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*leading, in_features, dtype=torch.float64, generator=generator).requires_grad_(needs[0])
    w = torch.randn(out_features, in_features, dtype=torch.float64, generator=generator).requires_grad_(needs[1])
    b = torch.randn(out_features, dtype=torch.float64, generator=generator).requires_grad_(needs[2]) if bias else None
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad_output = torch.randn(*leading, out_features, dtype=torch.float64, generator=generator)

    ours = MF.linear(x, w, b)
    theirs = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    if not leaves:
        return
    for a, r in zip(torch.autograd.grad(ours, leaves, grad_output), torch.autograd.grad(theirs, leaves, grad_output)):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
