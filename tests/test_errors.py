"""Bad input: a clear error naming the layer and the offending shapes, dtypes, devices or values."""

from __future__ import annotations

import re

import pytest
import torch
from torch.func import grad, vmap

import manualgrad.functional as MF
import manualgrad.nn as mnn
from manualgrad import InputError


def test_linear_feature_mismatch_names_both_shapes():
    with pytest.raises(InputError, match=r"linear: input has 6 features \(shape \(2, 6\)\), weight expects 5"):
        MF.linear(torch.randn(2, 6), torch.randn(3, 5))
    with pytest.raises(RuntimeError):  # also what torch raises, for code written against torch
        mnn.Linear(5, 3)(torch.randn(2, 6))


@pytest.mark.parametrize("bias_shape", [(4,), (3, 1), ()])
def test_linear_bias_of_the_wrong_length(bias_shape):
    with pytest.raises(
        InputError, match=re.escape(f"linear: bias has shape {bias_shape}, weight has 3 output features")
    ):
        MF.linear(torch.randn(2, 5), torch.randn(3, 5), torch.randn(bias_shape))


def test_linear_weight_not_2d():
    with pytest.raises(InputError, match=r"weight must be 2-D .*got shape \(3, 5, 1\)"):
        MF.linear(torch.randn(2, 5), torch.randn(3, 5, 1))


def test_linear_dtype_mismatch_names_both_dtypes():
    with pytest.raises(InputError, match="linear: input has dtype torch.float64 but weight has dtype torch.float32"):
        MF.linear(torch.randn(2, 5, dtype=torch.float64), torch.randn(3, 5))
    with pytest.raises(InputError, match="must be a floating-point tensor, got dtype torch.int64"):
        MF.linear(torch.ones(2, 5, dtype=torch.long), torch.randn(3, 5))


def test_linear_device_mismatch_names_both_devices():
    with pytest.raises(InputError, match="linear: input is on cpu but weight is on meta"):
        MF.linear(torch.randn(2, 5), torch.randn(3, 5, device="meta"))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="relu: input must be a Tensor, got list"):
        MF.relu([1.0, -1.0])


def test_gelu_approximate_choice():
    with pytest.raises(InputError, match="gelu: approximate must be one of 'none', 'tanh', got 'fast'"):
        MF.gelu(torch.randn(3), approximate="fast")


@pytest.mark.parametrize("bad", [5, -1, 17])
def test_cross_entropy_class_out_of_range(bad):
    target = torch.tensor([0, bad, 1])
    with pytest.raises(InputError, match=rf"target holds class indices outside \[0, 5\) \(e.g. {bad}\).*0..4"):
        MF.cross_entropy(torch.randn(3, 5), target)


def test_cross_entropy_ignore_index_is_allowed():
    loss = MF.cross_entropy(torch.randn(3, 5), torch.tensor([0, -100, 4]))
    assert torch.isfinite(loss)


def test_cross_entropy_target_shape_and_dtype():
    with pytest.raises(InputError, match=r"target has shape \(2,\), expected \(3,\) for input of shape \(3, 5\)"):
        MF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(InputError, match=r"class-probability target has shape \(3, 4\), input has shape \(3, 5\)"):
        MF.cross_entropy(torch.randn(3, 5), torch.rand(3, 4))
    with pytest.raises(InputError, match="got dtype torch.bool"):
        MF.cross_entropy(torch.randn(3, 5), torch.tensor([True, False, True]))
    with pytest.raises(InputError, match=r"weight has shape \(4,\), input has 5 classes"):
        MF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), weight=torch.ones(4))
    with pytest.raises(InputError, match="label_smoothing must be in"):
        MF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), label_smoothing=1.5)
    with pytest.raises(InputError, match="reduction must be one of 'none', 'mean', 'sum', got 'avg'"):
        MF.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 2]), reduction="avg")


def test_mse_loss_shapes():
    with pytest.raises(InputError, match=r"target shape \(4,\) does not broadcast to input shape \(3, 5\)"):
        MF.mse_loss(torch.randn(3, 5), torch.randn(4))


@pytest.mark.parametrize("p", [-0.1, 1.5, "0.5"])
def test_dropout_probability(p):
    with pytest.raises(InputError, match=rf"dropout: dropout probability has to be between 0 and 1, but got {p!r}"):
        MF.dropout(torch.randn(3), p)
    if not isinstance(p, str):
        with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):  # torch's own check
            mnn.Dropout(p)


@pytest.mark.parametrize("name", ["relu", "sigmoid", "tanh", "silu", "gelu", "softmax", "linear", "dropout"])
def test_complex_input_is_refused_clearly(name):
    """The formulas are real: a complex input gets a clear error, not a wrong (non-conjugate) gradient."""
    z = torch.randn(3, 4, dtype=torch.complex64, requires_grad=True)
    args = {"linear": (z, torch.randn(2, 4, dtype=torch.complex64)), "softmax": (z, 1)}.get(name, (z,))
    with pytest.raises(
        InputError, match=rf"{name}: input has complex dtype torch.complex64; manualgrad differentiates real"
    ):
        getattr(MF, name)(*args)


def test_mlp_errors():
    with pytest.raises(InputError, match="MLP: activation must be one of"):
        mnn.MLP([3, 2], activation="swish")
    model = mnn.MLP([3, 4, 2])
    with pytest.raises(InputError, match=r"MLP: input has 5 features \(shape \(2, 5\)\), weight expects 3"):
        model(torch.randn(2, 5))
    with pytest.raises(InputError, match=r"MLP.loss: target holds class indices outside \[0, 2\)"):
        model.loss(torch.randn(2, 3), torch.tensor([0, 2]))
    with pytest.raises(InputError, match=r"target must be class indices of dtype int64 \(or uint8\) and shape \(2,\)"):
        model.loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]))
    for smoothing in (-0.1, 1.5):
        with pytest.raises(InputError, match=rf"MLP.loss: label_smoothing must be in \[0, 1\], got {smoothing}"):
            model.loss(torch.randn(2, 3), torch.tensor([0, 1]), label_smoothing=smoothing)


def test_checks_do_not_break_vmap_or_compile():
    """The value check on class indices reads data: it stands aside under torch.func and torch.compile."""
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    per_sample = vmap(grad(lambda xi, yi: MF.cross_entropy(xi, yi)))(x, y)
    assert per_sample.shape == (4, 5)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda a, b: MF.cross_entropy(MF.linear(a, torch.eye(5)), b))(x, y)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_input_error_is_exported():
    import manualgrad.errors

    assert manualgrad.InputError is InputError is manualgrad.errors.InputError
    assert issubclass(InputError, ValueError) and issubclass(InputError, RuntimeError)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_the_class_losses_fast_check_passes_only_what_the_detailed_checks_pass(name):
    """_class_indices_fit settles the common case ((N, C) scores, int64 indices, no class weight) in one expression:
    whatever it passes, the detailed checks pass, and it passes every common valid case."""
    from manualgrad import _checks

    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    common = [(x, t, None, -100, "mean", 0.0), (x.double(), t, None, 1, "none", 1), (x[:0], t[:0], None, 7, "sum", 0.3)]
    others = [
        (x, t, torch.ones(3), -100, "mean", 0.0),  # a class weight
        (x, t.int(), None, -100, "mean", 0.0),
        (x, t.to(torch.uint8), None, -100, "mean", 0.0),
        (x, t[:3], None, -100, "mean", 0.0),
        (x.reshape(4, 3, 1), t.reshape(4, 1), None, -100, "mean", 0.0),
        (x[0], t[0], None, -100, "mean", 0.0),
        (x.long(), t, None, -100, "mean", 0.0),
        (x.to(torch.complex64), t, None, -100, "mean", 0.0),
        (x, t, None, -100, "average", 0.0),
        (x, t, None, -100, None, 0.0),
        (x, t, None, None, "mean", 0.0),
        (x, t, None, 2.0, "mean", 0.0),
        (x, t, None, True, "mean", 0.0),
        (x, t, None, -100, "mean", 1.5),
        (x, t, None, -100, "mean", "0.1"),
        (x, t.to("meta"), None, -100, "mean", 0.0),
        (x, torch.rand(4, 3), None, -100, "mean", 0.0),  # class probabilities
        ([[1.0, 2.0]], t, None, -100, "mean", 0.0),
        (x, [0, 1, 2, 0], None, -100, "mean", 0.0),
    ]
    if name == "nll_loss":  # no label smoothing to pass
        others = [case for case in others if case[5] == 0.0]
    for case in common + others:
        args = case if name == "cross_entropy" else case[:5]
        if any(case is c for c in common):
            getattr(_checks, name)(*args)  # the common cases pass the detailed checks
        assert _checks._class_indices_fit(*args) == any(case is c for c in common), args


def test_linears_fast_check_agrees_with_the_detailed_checks():
    """_linear_fits settles the common case in one expression: it must pass exactly the inputs the checks pass
    (with equal dtypes) and send everything else to them."""
    from manualgrad import _checks

    f64 = torch.float64
    cases = [
        (torch.randn(2, 5), torch.randn(3, 5), torch.randn(3)),
        (torch.randn(5), torch.randn(3, 5), None),
        (torch.randn(2, 4, 5, dtype=f64), torch.randn(3, 5, dtype=f64), torch.randn(3, dtype=f64)),
        (torch.randn(0, 5), torch.randn(3, 5), None),
        (torch.randn(2, 0), torch.randn(3, 0), torch.randn(3)),
        (torch.randn(2, 6), torch.randn(3, 5), None),
        (torch.randn(2, 5), torch.randn(3, 5, 1), None),
        (torch.randn(2, 5, dtype=f64), torch.randn(3, 5), None),
        (torch.ones(2, 5, dtype=torch.long), torch.ones(3, 5, dtype=torch.long), None),
        (torch.randn(2, 5, dtype=torch.complex64), torch.randn(3, 5, dtype=torch.complex64), None),
        (torch.randn(()), torch.randn(3, 5), None),
        (torch.randn(2, 5), torch.randn(3, 5), torch.randn(4)),
        (torch.randn(2, 5), torch.randn(3, 5), torch.randn(3, dtype=f64)),
        (torch.randn(2, 5), torch.randn(3, 5, device="meta"), None),
        (torch.randn(2, 5), torch.randn(3, 5), torch.randn(3, device="meta")),
        ([1.0, 2.0], torch.randn(3, 2), None),
        (torch.randn(2, 5), "weight", None),
    ]
    for input, weight, bias in cases:
        try:
            _checks.linear(input, weight, bias)
            passes = True
        except (InputError, TypeError):
            passes = False
        same_dtypes = passes and input.dtype == weight.dtype and (bias is None or bias.dtype == weight.dtype)
        assert _checks._linear_fits(input, weight, bias) == same_dtypes, (input, weight, bias)
