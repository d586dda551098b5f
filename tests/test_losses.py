"""The losses where the registry's example tables do not reach: PyTorch's conventions at the edges (x exactly 0
or 1, extreme logits, all-equal inputs, NaN and inf), broadcasting with its warning, the legacy arguments,
autocast from half-precision inputs, bad input, and the speed helpers against the plain formulas."""

from __future__ import annotations

import warnings

import pytest
import support
import torch
from support import F64
from torch.autograd import gradcheck, gradgradcheck

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError, _checks
from manualgrad.functions.losses import base as losses_base
from manualgrad.functions.losses import pointwise

TF = torch.nn.functional


def outputs_and_grads(fn, args, kwargs=None, leaves=(0, 1)):
    """``fn(*args, **kwargs)`` and the gradients of ``args[i]`` for ``i`` in ``leaves`` (for the sum of the output)."""
    return support.outputs_and_grads(fn, args, kwargs, torch.ones_like, leaves)


def assert_same_as_torch(name, args, kwargs=None, leaves=(0, 1), exact=True):
    ours = outputs_and_grads(getattr(MF, name), args, kwargs, leaves)
    theirs = outputs_and_grads(getattr(TF, name), args, kwargs, leaves)
    for a, b in zip((ours[0], *ours[1]), (theirs[0], *theirs[1])):
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact:
            assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)), (a, b)  # equal, NaN for NaN, inf for inf
        else:
            torch.testing.assert_close(a, b, equal_nan=True)


# ---- binary cross-entropy: x exactly 0 or 1 ------------------------------------------------------

EDGES = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1e-30, 1 - 2**-24, 0.25])
EDGE_TARGETS = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.3, 0.2, 0.9, 1.0])


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_at_zero_and_one_is_torchs(dtype, reduction):
    """The loss (each log clamped at -100), G_X = (x − t)/max((1 − x)x, 1e-12) (±1e12·(x − t) at the ends, 0 where
    t = x) and G_T = −logit(x) (±inf at the ends): bit for bit PyTorch's, also with a weight."""
    x, t = EDGES.to(dtype), EDGE_TARGETS.to(dtype)
    assert_same_as_torch("binary_cross_entropy", (x, t), {"reduction": reduction})
    weight = torch.linspace(0.5, 2.0, 8, dtype=dtype)
    assert_same_as_torch("binary_cross_entropy", (x, t), {"reduction": reduction, "weight": weight})
    out, (grad_x, grad_t) = outputs_and_grads(MF.binary_cross_entropy, (x, t), {"reduction": "none"})
    assert out[2] == out[3] == 100  # −log 0, clamped
    assert grad_x[0] == grad_x[1] == 0 and grad_x[2] == -grad_x[3] < -1e11
    assert grad_t[2] == torch.inf and grad_t[3] == -torch.inf


def test_bce_half_precision_at_the_ends():
    """float16: where x = t = 0 or 1 the gradient is 0 (torch's float16 kernel floors (1 − x)x at 1e-12 rounded to
    float16, 0, and gives 0/0 = NaN); elsewhere as torch's."""
    x, t = EDGES[:5].half(), EDGE_TARGETS[:5].half()
    _, (ours, _) = outputs_and_grads(MF.binary_cross_entropy, (x, t), {"reduction": "sum"})
    _, (theirs, _) = outputs_and_grads(TF.binary_cross_entropy, (x, t), {"reduction": "sum"})
    assert ours[:2].tolist() == [0.0, 0.0] and theirs[:2].isnan().all()
    assert torch.equal(ours[2:], theirs[2:])


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_bce_input_outside_zero_one_raises_like_torch(bad):
    x, t = torch.tensor([0.5, bad]), torch.tensor([0.5, 0.5])
    with pytest.raises(InputError, match=r"binary_cross_entropy: input must hold probabilities in \[0, 1\]"):
        MF.binary_cross_entropy(x, t)
    with pytest.raises(RuntimeError, match="between 0 and 1"):  # torch raises too
        TF.binary_cross_entropy(x, t)


def test_bce_shapes_and_weights():
    x, t = torch.rand(2, 3), torch.rand(2, 3)
    with pytest.raises(InputError, match=r"target has shape \(2, 1\), input has shape \(2, 3\)"):
        MF.binary_cross_entropy(x, t[:, :1])
    with pytest.raises(ValueError, match="target size"):  # torch refuses a target of another size too
        TF.binary_cross_entropy(x, t[:, :1])
    with pytest.raises(InputError, match=r"weight has shape \(2,\), which does not broadcast to the input's shape"):
        MF.binary_cross_entropy(x, t, torch.rand(2))
    with pytest.raises(InputError, match=r"weight has shape \(4, 2, 3\)"):
        MF.binary_cross_entropy(x, t, torch.rand(4, 2, 3))  # broadcasts, but past the input's shape
    with pytest.raises(InputError, match="the weight is not differentiated"):
        MF.binary_cross_entropy(x, t, torch.rand(3, requires_grad=True))
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        TF.binary_cross_entropy(x, t, torch.rand(3, requires_grad=True))  # nor does torch differentiate it
    class_weight = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    assert_same_as_torch("binary_cross_entropy", (x.double(), t.double()), {"weight": class_weight}, exact=False)


# ---- binary cross-entropy with logits ----------------------------------------------------------------


@pytest.mark.parametrize("pos_weight", [None, 2.0, 0.5], ids=["plain", "p=2", "p=0.5"])
def test_bce_with_logits_at_extreme_logits_is_torchs(pos_weight):
    """Logits of ±1e4, ±inf and NaN: the loss and both gradients as PyTorch's (finite where torch's are)."""
    z = torch.tensor([-1e4, 1e4, 0.0, 30.0, -30.0, torch.inf, -torch.inf, torch.nan], dtype=F64)
    t = torch.tensor([1.0, 0.0, 0.5, 0.2, 0.7, 1.0, 0.0, 0.5], dtype=F64)
    kwargs = {"reduction": "none"}
    if pos_weight is not None:
        kwargs["pos_weight"] = torch.tensor(pos_weight, dtype=F64)
    assert_same_as_torch("binary_cross_entropy_with_logits", (z, t), kwargs, exact=False)
    _, (grad_z, grad_t) = outputs_and_grads(MF.binary_cross_entropy_with_logits, (z, t), kwargs)
    assert torch.isfinite(grad_z[:7]).all() and torch.isfinite(grad_t[:5]).all()


def test_bce_with_logits_pos_weight_broadcasts_along_the_class_dimension():
    """pos_weight of shape (C,) for (N, C), (C, 1, 1) for (N, C, H, W): as torch, gradients checked numerically."""
    for shape, pos_shape in (((4, 3), (3,)), ((2, 3, 2, 2), (3, 1, 1)), ((5,), ())):
        z = torch.randn(shape, dtype=F64, requires_grad=True) * 2
        t = torch.rand(shape, dtype=F64, requires_grad=True)
        p = torch.rand(pos_shape, dtype=F64) * 3 + 0.1
        w = torch.rand(pos_shape, dtype=F64) + 0.5
        kwargs = {"pos_weight": p, "weight": w}
        assert_same_as_torch("binary_cross_entropy_with_logits", (z, t), kwargs, exact=False)
        assert gradcheck(lambda a, b, kw=kwargs: MF.binary_cross_entropy_with_logits(a, b, **kw), (z, t))
    with pytest.raises(InputError, match=r"pos_weight has shape \(2,\), which does not broadcast"):
        MF.binary_cross_entropy_with_logits(torch.randn(4, 3), torch.rand(4, 3), pos_weight=torch.ones(2))
    with pytest.raises(InputError, match=r"target has shape \(4, 2\), input has shape \(4, 3\)"):
        MF.binary_cross_entropy_with_logits(torch.randn(4, 3), torch.rand(4, 2))
    with pytest.raises(InputError, match="the pos_weight is not differentiated"):
        MF.binary_cross_entropy_with_logits(torch.randn(3), torch.rand(3), pos_weight=torch.ones(3).requires_grad_())


def test_bce_with_logits_module_keeps_its_pos_weight():
    p = torch.tensor([1.0, 3.0, 0.5])
    z, t = torch.randn(4, 3), torch.rand(4, 3)
    torch.testing.assert_close(
        mnn.BCEWithLogitsLoss(pos_weight=p)(z, t), torch.nn.BCEWithLogitsLoss(pos_weight=p)(z, t)
    )


# ---- losses of a difference ---------------------------------------------------------------------------

DIFFERENCE_LOSSES = [
    ("l1_loss", {}),
    ("smooth_l1_loss", {"beta": 1.0}),
    ("smooth_l1_loss", {"beta": 0.0}),
    ("huber_loss", {"delta": 1.5}),
    ("mse_loss", {}),
]
IDS = [f"{name}{kw}" for name, kw in DIFFERENCE_LOSSES]


@pytest.mark.parametrize("name,kwargs", DIFFERENCE_LOSSES, ids=IDS)
def test_all_equal_input_and_target(name, kwargs):
    """D = 0 everywhere (the kink of L1 and of smooth L1 with β = 0): the gradient is 0, as torch's sign(0) = 0."""
    x = torch.full((3, 4), 0.7, dtype=F64)
    for reduction in ("mean", "sum", "none"):
        assert_same_as_torch(name, (x, x.clone()), {**kwargs, "reduction": reduction})
    _, grads = outputs_and_grads(getattr(MF, name), (x, x.clone()), kwargs)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("name,kwargs", DIFFERENCE_LOSSES, ids=IDS)
def test_nan_inf_and_the_kinks_are_torchs(name, kwargs):
    """At NaN, ±inf, and exactly at |D| = β or δ, the loss and gradients are PyTorch's."""
    x = torch.tensor([0.0, 1.0, -1.0, 1.5, -1.5, 0.5, torch.nan, torch.inf, -torch.inf], dtype=F64)
    t = torch.zeros_like(x)
    for reduction in ("none", "sum"):
        assert_same_as_torch(name, (x, t), {**kwargs, "reduction": reduction})


@pytest.mark.parametrize("name,kwargs", DIFFERENCE_LOSSES, ids=IDS)
@pytest.mark.parametrize(
    "shapes", [((4, 3), (1, 3)), ((4, 1), (1, 3)), ((3,), (2, 3))], ids=["target", "both", "input"]
)
def test_broadcasting_warns_and_differentiates_like_torch(name, kwargs, shapes):
    """A target of another shape broadcasts with torch's warning; each gradient is summed back to its own shape."""
    x = torch.randn(shapes[0], dtype=F64, requires_grad=True) * 2
    t = torch.randn(shapes[1], dtype=F64, requires_grad=True) * 2
    fn = getattr(MF, name)
    with pytest.warns(UserWarning, match="different to the input size") as caught:
        fn(x, t, **kwargs)
    assert [w.filename for w in caught] == [__file__]  # ours once, at the caller; torch's own silenced
    for reduction in ("mean", "none"):
        assert_same_as_torch(name, (x, t), {**kwargs, "reduction": reduction})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert gradcheck(lambda a, b: fn(a, b, **kwargs), (x, t), check_forward_ad=True, check_batched_grad=True)
        assert gradgradcheck(lambda a, b: fn(a, b, **kwargs), (x, t))


@pytest.mark.parametrize("name", ["l1_loss", "mse_loss", "huber_loss"])
def test_weighted_means_divide_as_torch(name):
    """mse and l1: Σ w ℓ / Σ w; huber: the mean of w ℓ over the elements (PyTorch's own, different, choices)."""
    x, t = torch.randn(5, 4, dtype=F64), torch.randn(5, 4, dtype=F64)
    weight = torch.rand(5, 4, dtype=F64) * 3
    assert_same_as_torch(name, (x, t), {"weight": weight}, exact=False)
    with pytest.raises(InputError, match=r"weight has shape \(4,\), input has shape \(5, 4\)"):
        getattr(MF, name)(x, t, weight=weight[0])


def test_options_are_checked():
    x = torch.randn(3)
    with pytest.raises(InputError, match="smooth_l1_loss: beta must be >= 0, got -1.0"):
        MF.smooth_l1_loss(x, x, beta=-1.0)
    with pytest.raises(RuntimeError, match="negative values for beta"):
        TF.smooth_l1_loss(x, x, beta=-1.0)
    for delta in (0.0, -2.0):
        with pytest.raises(InputError, match=f"huber_loss: delta must be > 0, got {delta}"):
            MF.huber_loss(x, x, delta=delta)
        with pytest.raises(RuntimeError, match="non-positive values for delta"):
            TF.huber_loss(x, x, delta=delta)
    with pytest.raises(InputError, match=r"l1_loss: target shape \(4,\) does not broadcast to input shape \(3,\)"):
        MF.l1_loss(x, torch.randn(4))
    with pytest.raises(InputError, match="reduction must be one of"):
        MF.huber_loss(x, x, reduction="avg")


# ---- legacy arguments and autocast --------------------------------------------------------------------

LEGACY = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "smooth_l1_loss", "l1_loss", "mse_loss"]


@pytest.mark.parametrize("name", LEGACY)
@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True), (False, True)], ids=str)
def test_legacy_size_average_and_reduce(name, size_average, reduce):
    x, t = torch.rand(3, 4, dtype=F64) * 0.9 + 0.05, torch.rand(3, 4, dtype=F64)
    with pytest.warns(UserWarning, match="deprecated"):
        ours = getattr(MF, name)(x, t, size_average=size_average, reduce=reduce)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(TF, name)(x, t, size_average=size_average, reduce=reduce)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs)


NEW_LOSSES = ["binary_cross_entropy", "binary_cross_entropy_with_logits", "smooth_l1_loss", "huber_loss", "l1_loss"]


@pytest.mark.parametrize("name", [*NEW_LOSSES, "mse_loss"])
def test_autocast_from_half_precision_inputs(name):
    """Under CPU autocast the losses run in float32, as torch's do; gradients come back in each input's dtype."""
    x = (torch.rand(4, 3) * 0.9 + 0.05).bfloat16()
    t = torch.rand(4, 3)
    results = []
    for fn in (getattr(MF, name), getattr(TF, name)):
        a, b = x.clone().requires_grad_(), t.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(a, b)
        results.append((out, *torch.autograd.grad(out, (a, b))))
    for ours, theirs in zip(*results):
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=1e-2)


# ---- class indices: the wrapper's reading of the targets ----------------------------------------------


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_an_ignore_index_among_the_classes(name):
    """ignore_index inside [0, C) and present: those rows count nowhere (the shortcut for 'none ignored' is off)."""
    x = torch.log_softmax(torch.randn(6, 4, dtype=F64), 1)
    t = torch.tensor([0, 2, 1, 2, 3, 0])
    for kwargs in ({"ignore_index": 2}, {"ignore_index": 2, "reduction": "none"}, {"ignore_index": 7}):
        assert_same_as_torch(name, (x, t), kwargs, leaves=(0,), exact=False)
    _, (grad,) = outputs_and_grads(getattr(MF, name), (x, t), {"ignore_index": 2}, leaves=(0,))
    assert torch.equal(grad[[1, 3]], torch.zeros(2, 4, dtype=F64))


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_the_checks_say_no_row_is_ignored_only_where_they_read_it(name):
    """``{"ignore_index": None}`` (the Function then looks for no ignored row) only where every index was read to be a
    class and ignore_index is none of them."""
    check = getattr(_checks, name)
    extra = (0.0,) if name == "cross_entropy" else ()
    x, t = torch.randn(6, 4), torch.tensor([0, 2, 1, 2, 3, 0])
    assert check(x, t, None, -100, "mean", *extra) == {"ignore_index": None}
    assert check(x, t, None, 4, "sum", *extra) == {"ignore_index": None}
    assert check(x, t, None, 2, "mean", *extra) is None  # a class: rows may be ignored
    assert check(x, torch.tensor([0, -100, 1, 2, 3, 0]), None, -100, "mean", *extra) is None
    assert check(x[:0], t[:0], None, -100, "mean", *extra) is None  # nothing read
    if name == "cross_entropy":
        assert check(x, torch.rand(6, 4), None, -100, "mean", 0.0) is None  # probabilities


@pytest.mark.parametrize("bad", [None, 2.0, True])
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_ignore_index_must_be_an_int_as_in_torch(name, bad):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError):
        getattr(TF, name)(x, t, ignore_index=bad)
    with pytest.raises(TypeError, match=f"{name}: ignore_index must be an int"):
        getattr(MF, name)(x, t, ignore_index=bad)
    if name == "cross_entropy":  # class probabilities: torch's parser refuses it all the same
        with pytest.raises(TypeError):
            TF.cross_entropy(x, torch.rand(3, 4), ignore_index=bad)
        with pytest.raises(TypeError, match="cross_entropy: ignore_index must be an int"):
            MF.cross_entropy(x, torch.rand(3, 4), ignore_index=bad)


@pytest.mark.parametrize(
    "function, options",
    [
        ("CrossEntropyFunction", ("mean", 0.0)),
        ("CrossEntropyFunction", ("sum", 0.1)),
        ("CrossEntropyFunction", ("none", 0.0)),
        ("NLLLossFunction", ("mean",)),
        ("NLLLossFunction", ("none",)),
    ],
)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("shape", [(5, 4), (4,), (3, 4, 2)], ids=str)
def test_a_function_told_no_row_is_ignored_equals_one_told_the_index(function, options, weighted, shape):
    """ignore_index None (what the checks hand on) and an index no row holds: the same loss, gradient and jvp."""
    from manualgrad import functions

    cls = getattr(functions, function)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    t = torch.randint(0, 4, shape[:1] + shape[2:] if len(shape) > 1 else ())
    w = torch.rand(4, dtype=F64) + 0.5 if weighted else None
    results = []
    loss = (lambda *a: cls.apply(*a)[0]) if function == "CrossEntropyFunction" else cls.apply  # (loss, log P)
    for ignore_index in (None, -100):
        out = loss(x, t, w, ignore_index, *options)
        (grad,) = torch.autograd.grad(out, x, torch.rand_like(out, generator=torch.Generator().manual_seed(1)))
        with torch.autograd.forward_ad.dual_level():
            tangent = torch.autograd.forward_ad.make_dual(x.detach(), torch.ones_like(x))
            jvp = torch.autograd.forward_ad.unpack_dual(loss(tangent, t, w, ignore_index, *options)).tangent
        results.append((out, grad, jvp))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


# ---- the speed helpers equal the plain formulas ------------------------------------------------------


@pytest.mark.parametrize("in_place", [False, True], ids=["copy", "in_place"])
def test_minus_onehot_is_the_plain_formula(in_place):
    g = torch.randn(5, 4, 3, dtype=F64)
    target = torch.randint(0, 4, (5, 3))
    onehot = TF.one_hot(target, 4).permute(0, 2, 1).to(F64)  # (5, 4, 3), classes along dim 1
    index = target.unsqueeze(1)
    for coefficient in (0.7, torch.tensor(-1.3, dtype=F64), torch.randn(5, 1, 3, dtype=F64)):
        expected = g - onehot * coefficient
        got = losses_base._minus_onehot(g.clone(), index, coefficient, 1, in_place)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


def test_times_is_the_plain_product():
    t, factor = torch.randn(4, 3, dtype=F64), torch.randn(3, dtype=F64)
    torch.testing.assert_close(losses_base._times(t.clone(), factor, True), t * factor, rtol=0, atol=0)
    fresh = t.clone()
    assert losses_base._times(fresh, factor, True) is fresh
    assert losses_base._times(fresh, factor, False) is not fresh


def test_logit_and_log_sigmoid_are_the_same_either_way():
    """The kernels outside a graph, the plain arithmetic inside one: the same numbers."""
    x = torch.tensor([1e-300, 1e-8, 0.3, 0.5, 0.9, 1 - 1e-12], dtype=F64)
    z = torch.tensor([-800.0, -30.0, -1.0, 0.0, 2.0, 40.0, 800.0], dtype=F64)
    with torch.no_grad():
        kernels = pointwise._logit(x), pointwise._log_sigmoid(z)
    with torch.enable_grad():
        plain = pointwise._logit(x), pointwise._log_sigmoid(z)
    for a, b in zip(kernels, plain):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cross_entropy", {}),
        ("cross_entropy", {"label_smoothing": 0.2, "reduction": "none"}),
        ("nll_loss", {}),
        ("binary_cross_entropy", {}),
        ("binary_cross_entropy_with_logits", {}),
        *DIFFERENCE_LOSSES,
    ],
    ids=str,
)
def test_in_place_backward_equals_the_recorded_one(name, kwargs):
    """A plain backward overwrites the tensors it makes; a recorded one (create_graph) does not: same gradients."""
    x = torch.rand(6, 5, dtype=F64) * 0.9 + 0.05
    if name == "nll_loss":
        x = torch.log_softmax(x, 1)
    t = torch.randint(0, 5, (6,)) if name in ("cross_entropy", "nll_loss") else torch.rand(6, 5, dtype=F64)
    leaves = (0,) if t.dtype == torch.int64 else (0, 1)
    args = [a.clone().requires_grad_(i in leaves) for i, a in enumerate((x, t))]
    out = getattr(MF, name)(*args, **kwargs)
    g = torch.randn_like(out)
    inputs = [args[i] for i in leaves]
    recorded = torch.autograd.grad(out, inputs, g, create_graph=True, retain_graph=True)
    plain = torch.autograd.grad(out, inputs, g)
    for a, b in zip(plain, recorded):
        torch.testing.assert_close(a, b.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name,kwargs", [("cross_entropy", {}), ("nll_loss", {}), *DIFFERENCE_LOSSES], ids=str)
def test_jacobian_over_the_incoming_gradient(name, kwargs):
    """jacrev batches the incoming gradient, not the inputs: the in-place steps must stand aside."""
    x = torch.randn(4, 3, dtype=F64)
    t = torch.randint(0, 3, (4,)) if name in ("cross_entropy", "nll_loss") else torch.randn(4, 3, dtype=F64)
    kwargs = {**kwargs, "reduction": "none"}
    ours = torch.func.jacrev(lambda a: getattr(MF, name)(a, t, **kwargs))(x)
    theirs = torch.func.jacrev(lambda a: getattr(TF, name)(a, t, **kwargs))(x)
    torch.testing.assert_close(ours, theirs)


# ---- dtypes: accepted where torch accepts them, an InputError naming the layer where torch errors -----------------

INTEGER_DTYPES = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


def _torch_accepts(fn, *args, **kwargs) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn(*args, **kwargs)
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("input_shape", [(5,), (3, 5), (3, 5, 2)], ids=["C", "NC", "NCd"])
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_class_index_target_dtypes_as_torch(name, input_shape, dtype):
    """int64 everywhere, uint8 for a (C) or (N, C) input (torch's kernel takes both); int32 and the rest: torch
    raises a bare RuntimeError, ours an InputError naming the layer and the dtype."""
    x = torch.randn(input_shape, dtype=torch.float64)
    target = torch.randint(0, 2, input_shape[:1] + input_shape[2:] if len(input_shape) > 1 else ()).to(dtype)
    if _torch_accepts(getattr(TF, name), x, target):
        assert_same_as_torch(name, (x, target), leaves=(0,), exact=False)
    else:
        with pytest.raises(InputError, match=rf"^{name}: target .*{dtype}"):
            getattr(MF, name)(x, target)


BCE_DTYPES = [torch.float32, torch.float64, torch.float16]


@pytest.mark.parametrize(
    ("input_dtype", "target_dtype"),
    # float16 with float16 is test_bce_half_precision_at_the_ends's (torch's float16 kernel rounds otherwise)
    [(a, b) for a in BCE_DTYPES for b in BCE_DTYPES if a != torch.float16 or b != torch.float16],
    ids=str,
)
def test_bce_mixed_input_and_target_dtypes(input_dtype, target_dtype):
    x, t = torch.rand(4, 3).to(input_dtype), torch.rand(4, 3).to(target_dtype)
    if _torch_accepts(TF.binary_cross_entropy, x, t):
        assert_same_as_torch("binary_cross_entropy", (x, t), exact=False)
    else:
        with pytest.raises(InputError, match=rf"^binary_cross_entropy: input has dtype {input_dtype} but target"):
            MF.binary_cross_entropy(x, t)


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@pytest.mark.parametrize("input_dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32])
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float64, torch.int64], ids=str)
def test_softmax_of_an_integer_tensor_with_a_floating_dtype(name, input_dtype, dtype):
    """``softmax(int_tensor, dim, dtype=torch.float32)`` casts first, as torch does; without a floating dtype
    torch's kernel refuses and ours raises an InputError naming the layer."""
    x = torch.tensor([[0, 1, 3], [2, 2, 1]]).to(input_dtype)
    if _torch_accepts(getattr(TF, name), x, 1, dtype=dtype):
        ours, theirs = getattr(MF, name)(x, 1, dtype=dtype), getattr(TF, name)(x, 1, dtype=dtype)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs)
    else:
        with pytest.raises(InputError, match=rf"^{name}: "):
            getattr(MF, name)(x, 1, dtype=dtype)


# ---- a new elementwise loss is its forward and its partial derivatives ------------------------------------------


class _PoissonNLLFunction(losses_base.ElementwiseLoss):
    """ℓ = e^x − t x (torch's poisson_nll_loss with log_input): ∂ℓ/∂x = e^x − t, ∂ℓ/∂t = −x."""

    @staticmethod
    def forward(input, target, weight, reduction):
        return TF.poisson_nll_loss(input, target, log_input=True, full=False, reduction=reduction)

    @staticmethod
    def d_input(x, t, in_place):
        return torch.exp(x) - t, 1.0

    @staticmethod
    def d_target(x, t, in_place):
        return -x, 1.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_elementwise_loss_of_input_and_target_apart_gets_its_backward_and_jvp_from_its_partials(reduction):
    from manualgrad.functions.base import apply
    from manualgrad.testing import check

    def ours(x, t):
        return apply(_PoissonNLLFunction, x, t, None, reduction)

    def reference(x, t):
        return TF.poisson_nll_loss(x, t, log_input=True, full=False, reduction=reduction)

    x, t = torch.randn(4, 3, dtype=F64), torch.rand(4, 3, dtype=F64)
    properties = ["gradcheck", "jvp", "gradgradcheck", "parity float64", "vmap", "derivative kernels"]
    check(ours, x, t, reference=reference, properties=properties).assert_ok()
    wrong = type("Wrong", (_PoissonNLLFunction,), {"d_target": staticmethod(lambda x, t, in_place: (x, 1.0))})
    report = check(lambda x, t: apply(wrong, x, t, None, reduction), x, t, reference=reference, properties=properties)
    assert not report.ok  # a sign flipped in ∂ℓ/∂t is caught


def test_cross_entropy_on_many_short_rows_is_torchs():
    """The MNIST shape (written-out log-softmax forward, softmax backward): loss and gradient as torch's."""
    x, t = torch.randn(256, 10, requires_grad=True), torch.randint(0, 10, (256,))
    for reduction in ("mean", "none"):
        ours = outputs_and_grads(MF.cross_entropy, (x, t), {"reduction": reduction}, leaves=(0,))
        theirs = outputs_and_grads(TF.cross_entropy, (x, t), {"reduction": reduction}, leaves=(0,))
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1][0], theirs[1][0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "target, options",
    [
        ("indices", (None, -100, "mean", 0.0)),
        ("indices", ("weight", 1, "sum", 0.2)),
        ("indices", (None, -100, "none", 0.0)),
        ("probabilities", (None, -100, "mean", 0.1)),
    ],
)
def test_cross_entropy_function_gives_log_p_with_its_derivatives(target, options):
    """CrossEntropyFunction's second output is log_softmax(Z), which it keeps for its backward; gradients through
    both outputs, second derivatives (P from the kept log P) and the jvp pass gradcheck in float64."""
    from manualgrad.functions import CrossEntropyFunction

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, dtype=F64, generator=g, requires_grad=True)
    weight, *rest = options
    w = torch.rand(4, dtype=F64, generator=g) + 0.5 if weight else None
    if target == "indices":
        t = torch.randint(0, 4, (5, 3), generator=g)
    else:
        t = torch.rand(5, 4, 3, dtype=F64, generator=g).softmax(1).requires_grad_()
    loss, logp = CrossEntropyFunction.apply(x, t, w, *rest)
    torch.testing.assert_close(logp, torch.log_softmax(x, 1), rtol=0, atol=0)
    ignore_index, reduction, smoothing = rest
    expected = TF.cross_entropy(x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-14, atol=1e-14)
    inputs = (x, t) if t.requires_grad else (x,)

    def both(*xs):
        return CrossEntropyFunction.apply(*xs, *((t,) if len(xs) == 1 else ()), w, *rest)

    assert torch.autograd.gradcheck(both, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(both, inputs)


def test_reduce_for_a_forward_written_out():
    """PointwiseLoss.reduce (the README's pseudo-Huber forward): Σ w ℓ / Σ w for ``mean``, in the terms' dtype."""
    terms, weight = torch.rand(4, 3, dtype=torch.float16), torch.rand(4, 3, dtype=torch.float16) + 0.5
    got = losses_base.PointwiseLoss.reduce(terms, weight, "mean")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, ((terms.float() * weight.float()).sum() / weight.float().sum()).half())
    torch.testing.assert_close(losses_base.PointwiseLoss.reduce(terms, None, "sum"), terms.sum())
    torch.testing.assert_close(losses_base.PointwiseLoss.reduce(terms, weight, "none"), terms * weight)
