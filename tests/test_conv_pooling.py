"""conv2d, the poolings, flatten/unflatten and padding: what the registry's tables do not cover.

Bad input (clear errors naming the layer and the shapes), ``return_indices``, ties and NaN in max pooling,
``nn.Conv2d``'s ``padding_mode`` (our PadFunction), the module twins with their own forward (Unflatten,
Conv2d), G_W's speed path against the formula, derivatives of every order without a derivative kernel,
empty batches, integer inputs, and in-place use of a flattened tensor.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from support import F64, RecordOps, outputs_and_grads
from torch.autograd import gradcheck, gradgradcheck

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError
from manualgrad.functions import PadFunction, conv


def _grads(fn, inputs, grad_output=None):
    g = torch.randn_like if grad_output is None else grad_output
    return outputs_and_grads(fn, inputs, grad_output=g, leaves=range(len(inputs)))


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        (((1, 2, 5, 5), (4, 3, 3, 3)), {}, r"conv2d: input has 2 channels \(shape \(1, 2, 5, 5\)\), weight expects 3"),
        (
            ((1, 4, 5, 5), (3, 2, 3, 3)),
            {"groups": 2},
            r"conv2d: weight has 3 output channels \(shape \(3, 2, 3, 3\)\), not divisible by groups=2",
        ),
        (((1, 6, 5, 5), (4, 2, 3, 3)), {"groups": 2}, r"input has 6 channels .* weight expects 4 = groups 2 x 2"),
        (((1, 2, 2, 2), (4, 2, 3, 3)), {}, r"the padded input is 2 x 2 .* smaller than the dilated kernel 3 x 3"),
        (
            ((1, 2, 5, 5), (4, 2, 2, 2)),
            {"dilation": 5},
            r"padded input is 5 x 5 .* smaller than the dilated kernel 6 x 6",
        ),
        (((2, 5, 5), (4, 2, 3)), {}, r"conv2d: weight must be 4-D .* got shape \(4, 2, 3\)"),
        (
            ((5, 5), (4, 1, 3, 3)),
            {},
            r"conv2d: input must be \(N, C, H, W\) or unbatched \(C, H, W\), got shape \(5, 5\)",
        ),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"stride": 2, "padding": "same"}, "padding='same' is not supported for strided"),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"padding": "full"}, "padding must be one of 'same', 'valid', got 'full'"),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"padding": -1}, "padding must be non-negative, got -1"),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"stride": (1, 0)}, r"stride must be positive, got \(1, 0\)"),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"stride": (1, 1, 1)}, "stride must be an int or a pair of ints"),
        (((1, 2, 5, 5), (4, 2, 3, 3)), {"groups": 0}, "groups must be a positive int, got 0"),
    ],
)
def test_conv2d_bad_shapes_and_options(args, kwargs, message):
    x, w = (torch.randn(s) for s in args)
    with pytest.raises(InputError, match=message):
        MF.conv2d(x, w, **kwargs)
    with pytest.raises(RuntimeError):  # torch raises too (InputError is a RuntimeError as well)
        F.conv2d(x, w, **kwargs)


def test_conv2d_bias_dtype_and_device():
    x, w = torch.randn(1, 2, 5, 5), torch.randn(4, 2, 3, 3)
    with pytest.raises(InputError, match=re.escape("conv2d: bias has shape (3,), weight has 4 output channels")):
        MF.conv2d(x, w, torch.randn(3))
    with pytest.raises(InputError, match="conv2d: input has dtype torch.float64 but weight has dtype torch.float32"):
        MF.conv2d(x.double(), w)
    with pytest.raises(InputError, match="conv2d: input is on cpu but weight is on meta"):
        MF.conv2d(x, w.to("meta"))
    with pytest.raises(InputError, match="conv2d: input has complex dtype"):
        MF.conv2d(x.to(torch.complex64), w.to(torch.complex64))
    with pytest.raises(RuntimeError, match="conv2d: input has 3 channels"):  # through the module twin
        mnn.Conv2d(2, 4, 3)(torch.randn(1, 3, 5, 5))


@pytest.mark.parametrize(
    "name,args,kwargs,message",
    [
        ("max_pool2d", (1, 2, 5, 5), {"kernel_size": 3, "padding": 2}, r"padding \(2, 2\) must be at most half"),
        ("max_pool2d", (1, 2, 1, 1), {"kernel_size": 2}, r"the output would be 0 x 0 for input shape \(1, 2, 1, 1\)"),
        ("max_pool2d", (1, 2, 5, 5), {"kernel_size": 2, "stride": 0}, "stride must be positive, got 0"),
        ("max_pool2d", (1, 2, 5, 5), {"kernel_size": 2, "dilation": 0}, "dilation must be positive, got 0"),
        ("max_pool2d", (2, 5), {"kernel_size": 2}, r"max_pool2d: input must be \(N, C, H, W\) or \(C, H, W\)"),
        ("avg_pool2d", (1, 2, 5, 5), {"kernel_size": 2, "divisor_override": 0}, "divisor_override must be a non-zero"),
        ("avg_pool2d", (1, 2, 5, 5), {"kernel_size": 3, "padding": 2}, r"padding \(2, 2\) must be at most half"),
        (
            "adaptive_avg_pool2d",
            (2, 5),
            {"output_size": 3},
            r"adaptive_avg_pool2d: input must be .* got shape \(2, 5\)",
        ),
    ],
)
def test_pooling_bad_input(name, args, kwargs, message):
    x = torch.randn(args)
    with pytest.raises(InputError, match=message):
        getattr(MF, name)(x, **kwargs)
    with pytest.raises(RuntimeError):
        getattr(F, name)(x, **kwargs)


def test_flatten_and_unflatten_bad_input():
    x = torch.randn(4, 6)
    with pytest.raises(InputError, match=r"flatten: start_dim 1 comes after end_dim 0 \(input shape \(4, 6\)\)"):
        MF.flatten(x, 1, 0)
    with pytest.raises(IndexError, match="flatten: start_dim 2 is out of range for a 2-d input"):
        MF.flatten(x, 2)
    with pytest.raises(InputError, match=r"unflatten: sizes \(4, 2\) do not multiply up to the size of dim 1 \(6\)"):
        MF.unflatten(x, 1, (4, 2))
    with pytest.raises(InputError, match="at most one -1"):
        MF.unflatten(x, 1, (-1, -1))
    with pytest.raises(InputError, match="sizes must be a sequence of ints"):
        MF.unflatten(x, 1, 6)
    for args in ((1, 0), (2,)):
        with pytest.raises((RuntimeError, IndexError)):
            torch.flatten(x, *args)


# ---- max pooling: indices, ties, NaN --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"kernel_size": 2}, {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 1, "ceil_mode": True}],
    ids=["k2", "k3,padding,ceil_mode"],
)
def test_max_pool2d_return_indices_is_torchs(kwargs):
    x = torch.randn(2, 3, 5, 6, dtype=F64)
    out, indices = MF.max_pool2d(x, **kwargs, return_indices=True)
    ref, ref_indices = F.max_pool2d(x, **kwargs, return_indices=True)
    torch.testing.assert_close(out, ref)
    assert torch.equal(indices, ref_indices) and indices.dtype == torch.int64
    g = torch.randn_like(out)
    ours = _grads(lambda t: MF.max_pool2d(t, **kwargs, return_indices=True), [x], g)[1]
    theirs = _grads(lambda t: F.max_pool2d(t, **kwargs, return_indices=True), [x], g)[1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    leaf = x.clone().requires_grad_()
    assert gradcheck(lambda t: MF.max_pool2d(t, **kwargs, return_indices=True)[0], (leaf,), check_forward_ad=True)
    module_out, module_indices = mnn.MaxPool2d(**kwargs, return_indices=True)(x)
    assert torch.equal(module_indices, ref_indices) and torch.equal(module_out, ref)


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=str)
def test_max_pool2d_ties_and_nan_go_where_torchs_go(dtype):
    """Equal values in a window (the gradient goes to one of them: torch's choice) and NaN (it wins)."""
    x = torch.tensor([[[[1.0, 1.0, 2.0], [1.0, 1.0, 2.0], [0.0, float("nan"), 2.0]]]], dtype=dtype)
    for kwargs in ({"kernel_size": 2, "stride": 1}, {"kernel_size": 2, "stride": 1, "padding": 1}):
        g = torch.randn_like(F.max_pool2d(x, **kwargs))
        out, ours = _grads(lambda t, kw=kwargs: MF.max_pool2d(t, **kw), [x], g)
        ref, theirs = _grads(lambda t, kw=kwargs: F.max_pool2d(t, **kw), [x], g)
        torch.testing.assert_close(out, ref, equal_nan=True)
        # each window's gradient lands on the same pixel as torch's: the same sums
        assert torch.equal(ours[0] != 0, theirs[0] != 0)
        torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)


# ---- Conv2d's padding modes: PadFunction ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular", "zeros"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same"], ids=["1", "(2,1)", "same"])
def test_conv2d_module_padding_modes_match_torch(mode, padding):
    torch.manual_seed(0)
    theirs = torch.nn.Conv2d(2, 3, (3, 4), padding=padding, padding_mode=mode, dtype=F64)
    ours = mnn.Conv2d(2, 3, (3, 4), padding=padding, padding_mode=mode, dtype=F64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 2, 5, 6, dtype=F64, requires_grad=True)
    out, ref = ours(x), theirs(x)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    params = [x, *ours.parameters()]
    ours_grads = torch.autograd.grad(out, params, g)
    theirs_grads = torch.autograd.grad(ref, [x, *theirs.parameters()], g)
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b)
    coverage = manualgrad.manual_coverage(ours(x))
    assert coverage.complete, coverage
    assert coverage.manual.get("PadFunctionBackward", 0) == (mode != "zeros")


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate", "circular"])
def test_pad_function_gradients(mode):
    x = torch.randn(2, 1, 3, 4, dtype=F64, requires_grad=True)
    fn = lambda t: PadFunction.pad(t, (1, 2, 2, 0), mode, value=0.5)  # noqa: E731
    torch.testing.assert_close(fn(x), F.pad(x, (1, 2, 2, 0), mode, 0.5 if mode == "constant" else None))
    assert gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=True)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True)
    g = torch.randn_like(fn(x))
    torch.testing.assert_close(
        torch.autograd.grad(fn(x), x, g)[0], torch.autograd.grad(F.pad(x, (1, 2, 2, 0), mode), x, g)[0]
    )
    with RecordOps() as recorder:
        torch.autograd.grad(fn(x), x, g)
    assert recorder.derivative_kernels == []


def test_pad_function_refuses_what_f_pad_refuses():
    with pytest.raises(InputError, match=r"Conv2d: reflect padding \(3, 3, 0, 0\) is too large for an input of shape"):
        PadFunction.pad(torch.randn(1, 1, 3, 3), (3, 3, 0, 0), "reflect", layer="Conv2d")
    with pytest.raises(InputError, match="padding_mode must be one of"):
        PadFunction.pad(torch.randn(1, 1, 3, 3), (1, 1, 1, 1), "wrap")


# ---- module twins with their own forward -------------------------------------------------------


def test_unflatten_and_flatten_modules():
    x = torch.randn(4, 6, 2, dtype=F64)
    for ours, theirs in (
        (mnn.Unflatten(1, (2, 3)), torch.nn.Unflatten(1, (2, 3))),
        (mnn.Unflatten(-1, (1, -1)), torch.nn.Unflatten(-1, (1, -1))),
        (mnn.Flatten(), torch.nn.Flatten()),
        (mnn.Flatten(0, 1), torch.nn.Flatten(0, 1)),
    ):
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        torch.testing.assert_close(ours(x), theirs(x))
        assert manualgrad.manual_coverage(ours(x.clone().requires_grad_())).complete


def test_pooling_modules_pass_their_settings():
    x = torch.randn(2, 3, 7, 6, dtype=F64)
    pairs = [
        (mnn.MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (mnn.AvgPool2d(3, 2, 1, True, False), torch.nn.AvgPool2d(3, 2, 1, True, False)),
        (mnn.AvgPool2d(2, divisor_override=5), torch.nn.AvgPool2d(2, divisor_override=5)),
        (mnn.AdaptiveAvgPool2d((None, 4)), torch.nn.AdaptiveAvgPool2d((None, 4))),
    ]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(x), theirs(x))


# ---- G_W: the speed path is the formula -----------------------------------------------------------


@pytest.mark.parametrize(
    "shape,weight,kwargs",
    [
        ((2, 4, 7, 8), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 2}),
        ((3, 2, 6, 6), (4, 2, 2, 2), {"dilation": 2}),
        ((1, 3, 5, 9), (3, 1, 3, 3), {"stride": 3, "padding": 1, "groups": 3}),
        ((2, 2, 5, 6), (3, 2, 4, 4), {"padding": "same", "dilation": (2, 1)}),
        ((2, 5, 6), (3, 2, 3, 3), {"padding": 1}),
        ((0, 2, 5, 6), (3, 2, 3, 3), {}),
    ],
    ids=["stride,padding,dilation,groups", "dilation", "depthwise,stride>kernel", "same,even", "unbatched", "empty"],
)
def test_weight_gradient_by_convolution_equals_the_formula(shape, weight, kwargs):
    """``_weight_grad_by_convolution`` (the swapped-dims convolution) against ``_weight_grad_by_patches``
    (unfold, then Σ_n G_Z X̂ᵀ) and torch's own weight gradient."""
    x, w = torch.randn(shape, dtype=F64), torch.randn(weight, dtype=F64, requires_grad=True)
    options = [kwargs.get(name, default) for name, default in (("stride", 1), ("padding", 0), ("dilation", 1))]
    geometry = conv._geometry(x, w, None, *options, kwargs.get("groups", 1))
    z = F.conv2d(x, w, **kwargs)
    g = torch.randn_like(z)
    expected = torch.autograd.grad(z, w, g)[0]
    torch.testing.assert_close(conv._weight_grad(x, g, geometry), expected)
    if shape[0] == 0:
        return
    batched = (x if x.dim() == 4 else x.unsqueeze(0)), (g if g.dim() == 4 else g.unsqueeze(0))
    torch.testing.assert_close(conv._weight_grad_by_patches(*batched, geometry), expected)
    torch.testing.assert_close(conv._weight_grad_by_convolution(*batched, geometry), expected)
    torch.testing.assert_close(conv._weight_grad_by_offsets(*batched, geometry), expected)


@pytest.mark.parametrize(
    "shape,weight,kwargs",
    [
        ((2, 3, 9, 8), (4, 3, 3, 2), {}),
        ((2, 3, 9, 11), (4, 3, 3, 2), {"stride": (2, 3)}),
        ((2, 2, 10, 9), (3, 2, 3, 4), {"stride": (3, 2), "padding": (2, 1), "dilation": (2, 3)}),
        ((2, 2, 6, 7), (3, 2, 4, 2), {"padding": "same", "dilation": (1, 2)}),
        ((2, 2, 5, 6), (3, 2, 4, 4), {"padding": "same", "dilation": (2, 1)}),
        ((2, 4, 7, 8), (6, 2, 3, 2), {"stride": (2, 1), "padding": (1, 2), "dilation": (1, 2), "groups": 2}),
        ((1, 3, 5, 9), (3, 1, 3, 3), {"stride": 3, "padding": 1, "groups": 3}),
        ((3, 2, 1, 12), (3, 2, 1, 3), {"stride": (1, 2), "padding": (0, 1)}),
        ((2, 5, 7), (3, 2, 3, 2), {"stride": (2, 1), "padding": 1}),
        ((0, 2, 5, 6), (3, 2, 3, 2), {"stride": 2}),
    ],
    ids=[
        "3x2",
        "stride",
        "stride,padding,dilation",
        "same,even,dilated-width",
        "same,even,dilated-height",
        "groups",
        "depthwise,stride>kernel",
        "one-row",
        "unbatched",
        "empty",
    ],
)
def test_weight_gradient_by_kernel_offsets_equals_the_unfold_formula(shape, weight, kwargs, monkeypatch):
    """``_weight_grad_by_offsets`` (G_W[:, :, i, j] one product per kernel offset, over the input's stride phases)
    against Σ_{n,ℓ} G_Z[n, :, ℓ] X̂[n, :, ℓ]ᵀ with X̂ = unfold(X_pad), one einsum in float64. Non-square kernels,
    strides and dilations that differ between height and width, so that swapping i and j, or a stride or a
    dilation dropped or read along the other axis, changes the sums; routed through ``_weight_grad`` (every
    geometry by offsets) for the unbatched and empty ones. And each sample's G_W[n] (``per_sample``)."""
    monkeypatch.setattr(conv, "SWAP_AT", 0)
    monkeypatch.setattr(conv, "_by_offsets", lambda x, geometry: True)
    x, w = torch.randn(shape, dtype=F64), torch.randn(weight, dtype=F64)
    options = [kwargs.get(name, default) for name, default in (("stride", 1), ("padding", 0), ("dilation", 1))]
    groups = kwargs.get("groups", 1)
    geometry = conv._geometry(x, w, None, *options, groups)
    with warnings.catch_warnings():  # torch's note on an even 'same' kernel's padded copy
        warnings.simplefilter("ignore")
        g = torch.randn_like(F.conv2d(x, w, **kwargs))
    xb, gb = (x, g) if x.dim() == 4 else (x.unsqueeze(0), g.unsqueeze(0))
    top, bottom, left, right = geometry.padding
    x_hat = F.unfold(F.pad(xb, (left, right, top, bottom)), w.shape[2:], geometry.dilation, 0, geometry.stride)
    x_hat = x_hat.reshape(len(xb), groups, w.shape[1], *w.shape[2:], x_hat.shape[-1])  # (N, G, C_g, k_h, k_w, L)
    g_z = gb.reshape(len(gb), groups, w.shape[0] // groups, x_hat.shape[-1])  # (N, G, O_g, L)
    expected = torch.einsum("ngol,ngcijl->gocij", g_z, x_hat).reshape(w.shape)
    got = conv._weight_grad(x, g, geometry)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if shape[0]:
        torch.testing.assert_close(conv._weight_grad_by_offsets(xb, gb, geometry), expected, rtol=1e-12, atol=1e-12)
        each = torch.einsum("ngol,ngcijl->ngocij", g_z, x_hat).reshape(len(xb), *w.shape)  # G_W[n], not summed
        got = conv._weight_grad_by_offsets(xb, gb, geometry, per_sample=True)
        torch.testing.assert_close(got, each, rtol=1e-12, atol=1e-12)


# ---- derivatives of any order, edge shapes, integers, in place ----------------------------------


def _counted(monkeypatch, name: str) -> list:
    """Count the calls of ``conv.<name>`` (one entry per call)."""
    calls, fn = [], getattr(conv, name)
    monkeypatch.setattr(conv, name, lambda *args, **kwargs: calls.append(1) or fn(*args, **kwargs))
    return calls


@pytest.mark.parametrize(
    "shapes,kwargs,by_offsets",
    [
        (((2, 2, 5, 6), (4, 1, 3, 2)), {"stride": (2, 1), "padding": 1, "dilation": (1, 2), "groups": 2}, False),
        (((2, 16, 5, 6), (3, 16, 3, 2)), {"stride": (2, 1), "padding": 1, "dilation": (1, 2)}, True),
    ],
    ids=["groups", "16-channels"],
)
def test_conv2d_third_derivatives_match_torch_without_a_derivative_kernel(shapes, kwargs, by_offsets, monkeypatch):
    """The backward applies ConvTranspose2dFunction and Conv2dWeightFunction, whose backward passes apply the
    three again: every order is convolutions. The third step squares the second derivatives (it took their
    cos, which turned float64 rounding of second derivatives of size ~10² into differences up to ~1e-9).
    With 16 channels G_W is computed by kernel offsets (:data:`conv.OFFSETS_AT`)."""
    offsets = _counted(monkeypatch, "_weight_grad_by_offsets")
    x0, w0 = (torch.randn(shape, dtype=F64) for shape in shapes)
    b0 = torch.randn(shapes[1][0], dtype=F64)
    results = []
    for fn in (MF.conv2d, F.conv2d):
        x, w, b = (t.clone().requires_grad_() for t in (x0, w0, b0))
        with RecordOps() as recorder:
            z = fn(x, w, b, **kwargs)
            first = torch.autograd.grad((z * z.sin()).sum(), (x, w, b), create_graph=True)
            second = torch.autograd.grad(sum((g * g).sum() for g in first), (x, w, b), create_graph=True)
            third = torch.autograd.grad(sum((g * g).sum() for g in second), (x, w, b))
        results.append((third, recorder.derivative_kernels))
    (ours, our_kernels), (theirs, their_kernels) = results
    assert our_kernels == [] and "convolution_backward" in their_kernels
    assert bool(offsets) == by_offsets
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_conv1d_with_16_channels_by_kernel_offsets_passes_gradcheck(monkeypatch):
    """A Conv1d's k positions are a 1 x k kernel's: from :data:`conv.OFFSETS_AT` channels, G_W by kernel offsets.
    First and second derivatives against finite differences."""
    offsets = _counted(monkeypatch, "_weight_grad_by_offsets")
    x, w, b = (torch.randn(shape, dtype=F64, requires_grad=True) for shape in ((2, 16, 7), (3, 16, 3), (3,)))

    def fn(*args):
        return MF.conv1d(*args, stride=2, padding=1)

    assert gradcheck(fn, (x, w, b)) and gradgradcheck(fn, (x, w, b)) and offsets


@pytest.mark.parametrize(
    "name,call",
    [
        ("conv2d", lambda fn, x, w: fn(x, w, padding=1)),
        ("max_pool2d", lambda fn, x, w: fn(x, 2)),
        ("avg_pool2d", lambda fn, x, w: fn(x, 2, ceil_mode=True)),
        ("adaptive_avg_pool2d", lambda fn, x, w: fn(x, (3, 4))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_an_empty_batch(name, call):
    x, w = torch.randn(0, 2, 5, 6, dtype=F64), torch.randn(3, 2, 3, 3, dtype=F64)
    results = []
    for fn in (getattr(MF, name), getattr(F, name)):
        out, grads = _grads(lambda a, b, fn=fn: call(fn, a, b) + 0 * b.sum(), [x, w], None)
        results.append((out, grads))
    (out, grads), (ref, ref_grads) = results
    assert out.shape == ref.shape and out.shape[0] == 0
    for a, b in zip(grads, ref_grads):
        assert a.shape == b.shape and torch.equal(a, b)  # zeros: an empty sum


def test_integer_inputs_get_torchs_own_ops():
    x = torch.arange(2 * 4 * 6).reshape(1, 2, 4, 6)
    assert torch.equal(MF.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert torch.equal(MF.flatten(x, 1), torch.flatten(x, 1))
    assert torch.equal(MF.unflatten(x, 1, (1, 2)), torch.unflatten(x, 1, (1, 2)))


def test_a_flattened_tensor_can_be_modified_in_place():
    """torch code does F.relu(torch.flatten(x), inplace=True): our flatten's result is not a view made inside a
    custom Function (those may not be modified in place)."""
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    for flatten, relu in ((MF.flatten, MF.relu), (torch.flatten, F.relu)):
        y = relu(flatten(x * 1, 1), inplace=True)
        assert torch.autograd.grad(y.sum(), x)[0].shape == x.shape


def test_conv2d_autocast_keeps_parameter_gradients_in_float32():
    model = mnn.Conv2d(2, 3, 3)
    x = torch.randn(2, 2, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert model.weight.grad.dtype == torch.float32 and model.bias.grad.dtype == torch.float32


def test_convert_switches_a_cnn_and_every_node_is_ours():
    """A torch.nn CNN of every new module, converted in place: same output, quietly, and a complete coverage."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.AvgPool2d(2),
        torch.nn.AdaptiveAvgPool2d((None, 2)),
        torch.nn.Flatten(),
        torch.nn.Unflatten(1, (4, 4)),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    )
    x = torch.randn(2, 1, 8, 8, requires_grad=True)  # so that the padding of the input has a backward node
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manualgrad.convert(model)
    assert all(type(m).__module__ == "manualgrad.nn" for m in model)
    out = model(x)
    torch.testing.assert_close(out, expected)
    coverage = manualgrad.manual_coverage(MF.cross_entropy(out, torch.tensor([0, 2])))
    assert coverage.complete, coverage
    assert coverage.manual["ReshapeFunctionBackward"] == 3 and coverage.manual["PadFunctionBackward"] == 1


@pytest.mark.parametrize("pool", ["adaptive", "avg"])
def test_a_global_average_backward_is_the_outer_product_form_of_the_separable_map(pool):
    """A 1 x 1 output takes SeparableMap's outer-product branch, G_Y (p_hᵀ p_w); it equals P_hᵀ G_Y P_w (and torch)."""
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    if pool == "adaptive":
        ours, theirs = MF.adaptive_avg_pool2d(x, 1), torch.nn.functional.adaptive_avg_pool2d(x, 1)
    else:
        ours, theirs = MF.avg_pool2d(x, (5, 4)), torch.nn.functional.avg_pool2d(x, (5, 4))
    (mine,) = torch.autograd.grad(ours, x, g)
    (reference,) = torch.autograd.grad(theirs, x, g)
    p_h, p_w = torch.full((1, 5), 1 / 5, dtype=torch.float64), torch.full((1, 4), 1 / 4, dtype=torch.float64)
    torch.testing.assert_close(mine, p_h.t().matmul(g).matmul(p_w), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(mine, reference, rtol=1e-14, atol=1e-15)
