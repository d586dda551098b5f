"""The max pooling forward's channels-last route (functions/pooling.py, ``_torch_max_pool2d``) gives exactly
PyTorch's values and indices: ties (a ReLU's zeros, repeated values), NaN, -inf, every geometry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from manualgrad.functions.pooling import _torch_max_pool2d

GEOMETRIES = [  # kernel, stride, padding, dilation, ceil_mode
    (2, 1, 0, 1, False),
    (2, 2, 0, 1, False),
    (3, 2, 1, 1, True),
    ((3, 2), (1, 2), (1, 0), (2, 1), False),
    (3, 3, 1, 2, True),
]


def inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=g, dtype=dtype)
    yield x
    yield x.relu()  # many exact ties at 0
    yield torch.randint(-2, 3, (3, 5, 9, 11), generator=g).to(dtype)  # ties everywhere
    special = x.clone()
    special[0, 1, 2, 3] = float("nan")
    special[1, 2, :, 4] = float("-inf")
    special[2, 0, 4, 4:7] = float("inf")
    yield special


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_same_values_and_indices_as_torch(dtype, geometry):
    for x in inputs(dtype):
        got_out, got_idx = _torch_max_pool2d(x, *geometry)
        want_out, want_idx = F.max_pool2d(x, *geometry[:4], ceil_mode=geometry[4], return_indices=True)
        assert got_out.is_contiguous() and got_idx.is_contiguous()
        torch.testing.assert_close(got_out, want_out, equal_nan=True, rtol=0, atol=0)
        assert torch.equal(got_idx, want_idx)


def test_other_layouts_take_torch_as_it_is():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out, _ = _torch_max_pool2d(x, 2, 1, 0, 1, False)
    assert out.is_contiguous(memory_format=torch.channels_last)  # as torch returns it for this input
    for shape in [(4, 6, 6), (2, 1, 6, 6)]:  # unbatched, one channel
        y = torch.randn(*shape)
        for got, want in zip(_torch_max_pool2d(y, 2, 1, 0, 1, False), F.max_pool2d(y, 2, 1, return_indices=True)):
            assert torch.equal(got, want)
