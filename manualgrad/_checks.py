"""Input validation: each check raises a clear :class:`~manualgrad.InputError` (naming the layer and the
offending shapes, dtypes, devices or values) or returns nothing. How to compute is the Functions' business.

Every check reads shapes, dtypes, devices and Python values only, except
:func:`class_values`, which reads the class indices (two numbers, on the CPU;
a device-side assert on CUDA; nothing under ``torch.compile`` or
``torch.func``, where the values cannot be read).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _compat
from .errors import InputError

REDUCTIONS = ("none", "mean", "sum")


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def tensor(layer: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{layer}: {name} must be a Tensor, got {type(value).__name__}")


def real_floating(layer: str, name: str, t) -> None:
    """A tensor of a real floating-point dtype (the formulas are real: complex inputs are refused)."""
    tensor(layer, name, t)
    if not t.is_floating_point():
        if t.is_complex():
            raise InputError(f"{layer}: {name} has complex dtype {t.dtype}; manualgrad differentiates real inputs only")
        raise InputError(f"{layer}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def same_device(layer: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise InputError(f"{layer}: {name_a} is on {a.device} but {name_b} is on {b.device}")


def same_dtype(layer: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Equal dtypes, unless autocast is on for the device (it casts both, as for torch.nn)."""
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        raise InputError(f"{layer}: {name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}")


def integer(layer: str, name: str, value) -> None:
    """A Python int (not a bool), as torch's argument parser takes for an int argument."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__}")


def choice(layer: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"{layer}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def probability(layer: str, name: str, value, *, open_top: bool = False) -> None:
    """A number in [0, 1] (or [0, 1) with ``open_top``)."""
    if not isinstance(value, (int, float)) or not (0 <= value < 1 if open_top else 0 <= value <= 1):
        raise InputError(f"{layer}: {name} must be in [0, {'1)' if open_top else '1]'}, got {value!r}")


def at_least(layer: str, name: str, value, low: float, *, strict: bool = False) -> None:
    """``value >= low`` (``> low`` when ``strict``); NaN is refused."""
    if not (value > low if strict else value >= low):
        raise InputError(f"{layer}: {name} must be {'>' if strict else '>='} {low}, got {value!r}")


def reduction(layer: str, value: str) -> None:
    choice(layer, "reduction", value, REDUCTIONS)


def legacy_reduction(layer: str, size_average, reduce, reduction: str) -> str:
    """Map the deprecated ``size_average``/``reduce`` pair to ``reduction``, as torch.nn.functional does (warning
    at the caller of a loss's wrapper, three frames up: ``functions.losses.base.loss``)."""
    if size_average is None and reduce is None:
        return reduction
    warnings.warn(f"{layer}: size_average and reduce are deprecated, use reduction", stacklevel=4)
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, layer: str = "linear") -> None:
    """A Linear layer's input, weight and bias fit together. The common case is settled by one expression
    (:func:`_linear_fits`, tested to agree with the checks below); anything else goes through the checks."""
    if _linear_fits(input, weight, bias):
        return
    tensor(layer, "input", input)
    tensor(layer, "weight", weight)
    if weight.dim() != 2:
        raise InputError(f"{layer}: weight must be 2-D (out_features, in_features), got shape {shape(weight)}")
    out_features, in_features = weight.shape
    if input.dim() == 0:
        raise InputError(f"{layer}: input must have at least 1 dimension (*, {in_features}), got a 0-d tensor")
    if input.shape[-1] != in_features:
        raise InputError(
            f"{layer}: input has {input.shape[-1]} features (shape {shape(input)}), "
            f"weight expects {in_features} (weight shape {shape(weight)})"
        )
    real_floating(layer, "input", input)
    same_device(layer, "input", input, "weight", weight)
    same_dtype(layer, "input", input, "weight", weight)
    layer_bias(layer, bias, weight, out_features, "features")


def layer_bias(layer: str, bias: Tensor | None, weight: Tensor, outputs: int, units: str) -> None:
    """A layer's optional bias: one per output (feature or channel), on the weight's device, in its dtype."""
    if bias is None:
        return
    tensor(layer, "bias", bias)
    if bias.shape != (outputs,):
        raise InputError(
            f"{layer}: bias has shape {shape(bias)}, weight has {outputs} output {units} "
            f"(expected bias shape ({outputs},))"
        )
    same_device(layer, "bias", bias, "weight", weight)
    same_dtype(layer, "bias", bias, "weight", weight)


def _linear_fits(input, weight, bias) -> bool:
    """True only where :func:`linear`'s checks all pass, same dtypes (a tenth of their cost: after a large matrix
    product the interpreter's caches are cold, and each further Python step costs several times what it does
    in a loop). ``tests/test_errors.py`` checks it against the checks on valid and invalid inputs."""
    try:
        return (
            weight.dim() == 2
            and input.dim() > 0
            and input.shape[-1] == weight.shape[1]
            and input.dtype == weight.dtype
            and input.is_floating_point()
            and input.device == weight.device
            and (
                bias is None
                or (bias.shape == weight.shape[:1] and bias.dtype == weight.dtype and bias.device == weight.device)
            )
        )
    except (AttributeError, TypeError):  # not tensors: the checks say which
        return False


def not_differentiated(layer: str, name: str, t: Tensor | None) -> None:
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise InputError(f"{layer}: the {name} is not differentiated; pass {name}.detach()")


def class_weight(layer: str, weight: Tensor | None, input: Tensor, classes: int) -> None:
    if weight is None:
        return
    tensor(layer, "weight", weight)
    if weight.shape != (classes,):
        raise InputError(
            f"{layer}: weight has shape {shape(weight)}, input has {classes} classes (shape {shape(input)})"
        )
    same_device(layer, "input", input, "weight", weight)
    not_differentiated(layer, "class weight", weight)


def cross_entropy(input, target, weight, ignore_index, reduction_, label_smoothing, layer="cross_entropy"):
    """Logits ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` against class indices or class probabilities; returns
    what :func:`nll_loss` returns."""
    if _class_indices_fit(input, target, weight, ignore_index, reduction_, label_smoothing):
        return _none_ignored(layer, target, input.shape[1], ignore_index)
    probability(layer, "label_smoothing", label_smoothing)
    integer(layer, "ignore_index", ignore_index)
    if isinstance(target, Tensor) and target.is_floating_point():
        _class_scores(layer, input, target, weight, reduction_)
        if target.shape != input.shape:
            raise InputError(
                f"{layer}: class-probability target has shape {shape(target)}, input has shape {shape(input)} "
                "(they must match; class indices need an integer target)"
            )
        return None
    return nll_loss(input, target, weight, ignore_index, reduction_, layer)


def nll_loss(input, target, weight, ignore_index, reduction_, layer="nll_loss"):
    """Scores ``(C)``, ``(N, C)`` or ``(N, C, d1, ...)`` against class indices in [0, C) (or ``ignore_index``).
    Returns ``{"ignore_index": None}`` where it read every index to be a class and ``ignore_index`` none: no row
    is ignored, which the loss's Function then need not look for (None otherwise)."""
    if _class_indices_fit(input, target, weight, ignore_index, reduction_):
        return _none_ignored(layer, target, input.shape[1], ignore_index)
    _class_scores(layer, input, target, weight, reduction_)
    integer(layer, "ignore_index", ignore_index)
    class_dim = 0 if input.dim() == 1 else 1
    class_index_target(layer, input, target, class_dim)
    return _none_ignored(layer, target, input.shape[class_dim], ignore_index)


def _none_ignored(layer: str, target: Tensor, classes: int, ignore_index: int) -> dict | None:
    """:func:`class_values`, then ``{"ignore_index": None}`` if it read every index to be a class and ``ignore_index``
    is none of them."""
    if class_values(layer, target, classes, ignore_index) and not 0 <= ignore_index < classes:
        return {"ignore_index": None}
    return None


def _class_indices_fit(input, target, weight, ignore_index, reduction_, label_smoothing=0.0) -> bool:
    """True only where :func:`cross_entropy`'s and :func:`nll_loss`'s checks of everything but the index values all
    pass, for the common case: ``(N, C)`` floating-point scores, int64 indices ``(N,)``, no class weight. One
    expression, as :func:`_linear_fits` (a step's loss runs after its largest products, with cold caches: measured
    in a whole per-layer step, our loss's forward took ~100 µs against ~50 for torch's). ``tests/test_errors.py``
    checks it against the checks."""
    try:
        return (
            weight is None
            and isinstance(reduction_, str)
            and reduction_ in REDUCTIONS
            and type(ignore_index) is int
            and isinstance(label_smoothing, (int, float))
            and 0 <= label_smoothing <= 1
            and input.dim() == 2
            and target.dtype == torch.int64
            and target.shape == input.shape[:1]
            and input.is_floating_point()
            and target.device == input.device
        )
    except (AttributeError, TypeError):  # not tensors: the checks say which
        return False


def _class_scores(layer, input, target, weight, reduction_) -> None:
    """What a classification loss's input, target, class weight and reduction must be, whatever the target."""
    tensor(layer, "input", input)
    tensor(layer, "target", target)
    reduction(layer, reduction_)
    if input.dim() == 0:
        raise InputError(f"{layer}: input must be (C), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    real_floating(layer, "input", input)
    same_device(layer, "input", input, "target", target)
    class_weight(layer, weight, input, input.shape[0 if input.dim() == 1 else 1])


def class_index_target(layer: str, input: Tensor, target: Tensor, class_dim: int) -> None:
    """An integer target with one class index per position of ``input`` outside its class dimension: int64, or
    uint8 for a ``(C)`` or ``(N, C)`` input (where torch's kernel takes it too)."""
    if target.dtype != torch.int64 and not (target.dtype == torch.uint8 and input.dim() <= 2):
        uint8 = "int64, or uint8 for a (C) or (N, C) input" if input.dim() > 2 else "int64 or uint8"
        raise InputError(
            f"{layer}: target must hold class indices ({uint8}) or class probabilities (float), "
            f"got dtype {target.dtype} for input of shape {shape(input)}"
        )
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.shape != expected:
        raise InputError(
            f"{layer}: target has shape {shape(target)}, expected {tuple(expected)} "
            f"for input of shape {shape(input)} (class indices) or {shape(input)} (class probabilities)"
        )


def class_values(layer: str, target: Tensor, classes: int, ignore_index: int | None = None) -> bool:
    """Class indices in [0, classes), or ``ignore_index`` (None: no index is ignored). True where it read every
    index to lie in [0, classes) (on the CPU), False where it could not tell or some index is ``ignore_index``."""
    if target.numel() == 0 or _compat.traced(target):
        return False
    if target.device.type == "cpu":
        low, high = (v.item() for v in torch.aminmax(target))
        if 0 <= low and high < classes:  # the common case, read from two numbers
            return True
    outside = (target < 0) | (target >= classes)
    if ignore_index is not None:
        outside &= target != ignore_index
    if target.device.type != "cpu":
        _compat.assert_async(~outside.any(), f"{layer}: target holds class indices outside [0, {classes})")
    elif outside.any():
        allowed = f"0..{classes - 1}" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise InputError(
            f"{layer}: target holds class indices outside [0, {classes}) (e.g. {target[outside][0].item()}); "
            f"the allowed range is {allowed}"
        )
    return False


def class_indices(layer: str, input: Tensor, target: Tensor, classes: int) -> None:
    """A 1-D int64 (or uint8, as torch's cross_entropy takes) target of one class index in [0, classes) per row
    of a 2-D input."""
    tensor(layer, "target", target)
    if input.dim() != 2:
        raise InputError(f"{layer}: input must be (N, features), got shape {shape(input)}")
    if target.dtype not in (torch.int64, torch.uint8) or target.shape != input.shape[:1]:
        raise InputError(
            f"{layer}: target must be class indices of dtype int64 (or uint8) and shape ({input.shape[0]},), "
            f"got dtype {target.dtype} and shape {shape(target)}"
        )
    same_device(layer, "input", input, "target", target)
    class_values(layer, target, classes)


#: the parameter of a loss of a difference: its name, its lower bound, whether it must lie strictly above it
_LOSS_PARAMETERS = {"smooth_l1_loss": ("beta", 0, False), "huber_loss": ("delta", 0, True)}


def pointwise_loss(input, target, weight, reduction_, parameter=None, layer="mse_loss") -> None:
    """A loss of ``input`` against a ``target`` that broadcasts to it (torch warns when the shapes differ: so do we,
    at the caller of the loss's wrapper, three frames up), and its parameter (:data:`_LOSS_PARAMETERS`)."""
    tensor(layer, "input", input)
    tensor(layer, "target", target)
    reduction(layer, reduction_)
    real_floating(layer, "input", input)
    real_floating(layer, "target", target)
    same_device(layer, "input", input, "target", target)
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise InputError(
            f"{layer}: target shape {shape(target)} does not broadcast to input shape {shape(input)}"
        ) from None
    if target.shape != input.shape:
        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=4,
        )
    if weight is not None:
        tensor(layer, "weight", weight)
        if weight.shape != input.shape:
            raise InputError(
                f"{layer}: weight has shape {shape(weight)}, input has shape {shape(input)} (they must match)"
            )
        same_device(layer, "input", input, "weight", weight)
        not_differentiated(layer, "weight", weight)
    if layer in _LOSS_PARAMETERS:
        name, low, strict = _LOSS_PARAMETERS[layer]
        at_least(layer, name, parameter, low, strict=strict)


def binary_cross_entropy(input, target, weight, reduction_, layer="binary_cross_entropy") -> None:
    """Probabilities in [0, 1] of the target's dtype (torch's kernel takes no mixture); the rest as with logits."""
    binary_cross_entropy_with_logits(input, target, weight, None, reduction_, layer)
    same_dtype(layer, "input", input, "target", target)
    probabilities(layer, input)


def binary_cross_entropy_with_logits(
    input, target, weight, pos_weight, reduction_, layer="binary_cross_entropy_with_logits"
) -> None:
    """A binary cross-entropy's input and target of one shape, its weights broadcasting to it."""
    tensor(layer, "input", input)
    tensor(layer, "target", target)
    reduction(layer, reduction_)
    real_floating(layer, "input", input)
    real_floating(layer, "target", target)
    same_device(layer, "input", input, "target", target)
    if target.shape != input.shape:
        raise InputError(f"{layer}: target has shape {shape(target)}, input has shape {shape(input)} (they must match)")
    broadcast_weight(layer, "weight", weight, input)
    broadcast_weight(layer, "pos_weight", pos_weight, input)


def broadcast_weight(layer: str, name: str, weight: Tensor | None, input: Tensor) -> None:
    """A weight that broadcasts to the input's shape (PyTorch computes ℓ ⊙ w in an output of the input's shape),
    on its device, not differentiated."""
    if weight is None:
        return
    tensor(layer, name, weight)
    try:
        fits = torch.broadcast_shapes(weight.shape, input.shape) == input.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InputError(
            f"{layer}: {name} has shape {shape(weight)}, which does not broadcast to the input's shape {shape(input)}"
        )
    same_device(layer, "input", input, name, weight)
    not_differentiated(layer, name, weight)


def probabilities(layer: str, input: Tensor) -> None:
    """Every element of ``input`` in [0, 1], as PyTorch's CPU kernel requires (a NaN is outside): on the CPU from
    two numbers; on CUDA a device-side assert (no host sync); not read under ``torch.compile`` or ``torch.func``."""
    if not input.numel() or _compat.traced(input):
        return
    if input.device.type != "cpu":
        _compat.assert_async(((input >= 0) & (input <= 1)).all(), f"{layer}: input values must be in [0, 1]")
        return
    low, high = (v.item() for v in torch.aminmax(input.detach()))
    if not (0 <= low and high <= 1):
        raise InputError(
            f"{layer}: input must hold probabilities in [0, 1], got values from {low} to {high}"
            " (for logits use binary_cross_entropy_with_logits)"
        )


def dropout_p(layer: str, p) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise InputError(f"{layer}: dropout probability has to be between 0 and 1, but got {p!r}")


# ---- convolutions ---------------------------------------------------------------------------------


def pair(layer: str, name: str, value, *, minimum: int) -> tuple[int, int]:
    """An int or a sequence of one or two ints (as torch accepts them), each at least ``minimum``."""
    values = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise InputError(f"{layer}: {name} must be an int or a pair of ints, got {value!r}")
    if min(values) < minimum:
        raise InputError(f"{layer}: {name} must be {'positive' if minimum else 'non-negative'}, got {value!r}")
    return values


def conv2d(input, weight, bias, stride, padding, dilation, groups, layer: str = "conv2d") -> tuple:
    """A conv2d call (what torch refuses, refused with the shapes named); returns its ``(stride, sides,
    dilation)``: pairs, and the padding of each side (top, bottom, left, right)."""
    tensor(layer, "input", input)
    tensor(layer, "weight", weight)
    if input.dim() not in (3, 4):
        raise InputError(f"{layer}: input must be (N, C, H, W) or unbatched (C, H, W), got shape {shape(input)}")
    if weight.dim() != 4:
        raise InputError(
            f"{layer}: weight must be 4-D (out_channels, in_channels / groups, k_h, k_w), got shape {shape(weight)}"
        )
    real_floating(layer, "input", input)
    same_device(layer, "input", input, "weight", weight)
    same_dtype(layer, "input", input, "weight", weight)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise InputError(f"{layer}: groups must be a positive int, got {groups!r}")
    out_channels, per_group = weight.shape[:2]
    channels = input.shape[-3]
    if out_channels % groups:
        raise InputError(
            f"{layer}: weight has {out_channels} output channels (shape {shape(weight)}), "
            f"not divisible by groups={groups}"
        )
    if channels != per_group * groups:
        raise InputError(
            f"{layer}: input has {channels} channels (shape {shape(input)}), weight expects "
            f"{per_group * groups} = groups {groups} x {per_group} (weight shape {shape(weight)})"
        )
    layer_bias(layer, bias, weight, out_channels, "channels")
    stride = pair(layer, "stride", stride, minimum=1)
    dilation = pair(layer, "dilation", dilation, minimum=1)
    kernel = tuple(weight.shape[2:])
    if isinstance(padding, str):
        choice(layer, "padding", padding, ("same", "valid"))
        if padding == "valid":
            sides = (0, 0, 0, 0)
        elif stride != (1, 1):
            raise InputError(f"{layer}: padding='same' is not supported for strided convolutions (stride={stride})")
        else:  # d (k − 1) in all, the odd one at the end (as torch pads it)
            total_h, total_w = (d * (k - 1) for d, k in zip(dilation, kernel))
            sides = (total_h // 2, total_h - total_h // 2, total_w // 2, total_w - total_w // 2)
    else:
        p_h, p_w = pair(layer, "padding", padding, minimum=0)
        sides = (p_h, p_h, p_w, p_w)
    size = tuple(input.shape[-2:])
    padded = (size[0] + sides[0] + sides[1], size[1] + sides[2] + sides[3])
    reach = tuple(d * (k - 1) + 1 for d, k in zip(dilation, kernel))
    if padded[0] < reach[0] or padded[1] < reach[1]:
        raise InputError(
            f"{layer}: the padded input is {padded[0]} x {padded[1]} (input shape {shape(input)}), smaller "
            f"than the dilated kernel {reach[0]} x {reach[1]} (weight shape {shape(weight)})"
        )
    return stride, sides, dilation


def conv1d(input, weight, stride, padding, dilation) -> tuple:
    """A conv1d call's tensors (the rest is checked as a conv2d's, lifted to 2-D) and its int options (an int or a
    1-tuple), as the 2-D ``(stride, padding, dilation)`` of the lifted call."""
    tensor("conv1d", "input", input)
    tensor("conv1d", "weight", weight)
    if input.dim() not in (2, 3) or weight.dim() != 3:
        raise InputError(
            f"conv1d: input must be (N, C, L) or (C, L) and weight (O, C / groups, k), got shapes "
            f"{shape(input)} and {shape(weight)}"
        )
    if not isinstance(padding, str):
        padding = (0, _single("padding", padding))
    return (1, _single("stride", stride)), padding, (1, _single("dilation", dilation))


def _single(name: str, value):
    """A 1-D convolution's int option, given as an int or a 1-tuple."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"conv1d: {name} must be an int or a 1-tuple, got {value!r}")
    return value
