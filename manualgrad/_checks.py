"""Input validation shared by the functional wrappers.

Every check reads only shapes, dtypes, devices and Python values, never tensor
data, so it is safe under ``torch.func`` transforms (which see per-sample
shapes) and ``torch.compile`` (which turns shape checks into guards).
"""

from __future__ import annotations

import torch
from torch import Tensor

_REDUCTIONS = ("none", "mean", "sum")


class InputError(ValueError, RuntimeError):
    """Bad input to a manualgrad layer.

    A ``ValueError``, and a ``RuntimeError`` too, so code written against the
    errors ``torch.nn.functional`` raises for the same mistakes still catches it.
    """


def shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def tensor(layer: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{layer}: {name} must be a Tensor, got {type(value).__name__}")


def floating(layer: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise InputError(f"{layer}: {name} must be a floating-point tensor, got dtype {t.dtype}")


def same_device(layer: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise InputError(f"{layer}: {name_a} is on {a.device} but {name_b} is on {b.device}")


def same_dtype(layer: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Equal dtypes, unless autocast is on for the device (it casts both, as for torch.nn)."""
    if a.dtype != b.dtype and not torch.is_autocast_enabled(a.device.type):
        raise InputError(f"{layer}: {name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}")


def choice(layer: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise InputError(f"{layer}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def linear(input: Tensor, weight: Tensor, bias: Tensor | None, layer: str = "linear") -> None:
    # The common case in one expression: after a large matrix product the interpreter's caches are
    # cold, and each further Python step of a check costs several times what it does in a loop.
    try:
        if (
            weight.dim() == 2
            and input.shape[-1] == weight.shape[1]
            and input.dtype == weight.dtype
            and input.is_floating_point()
            and input.device == weight.device
            and (
                bias is None
                or (bias.shape == weight.shape[:1]
                and bias.dtype == weight.dtype
                and bias.device == weight.device)
            )
        ):
            return
    except (AttributeError, IndexError, TypeError):
        pass
    _linear(input, weight, bias, layer)


def _linear(input, weight, bias, layer) -> None:
    """Each check in turn, with its message (and autocast's allowance for mixed dtypes)."""
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
    floating(layer, "input", input)
    same_device(layer, "input", input, "weight", weight)
    same_dtype(layer, "input", input, "weight", weight)
    if bias is not None:
        tensor(layer, "bias", bias)
        if bias.dim() != 1 or bias.shape[0] != out_features:
            raise InputError(
                f"{layer}: bias has shape {shape(bias)}, weight has {out_features} output features "
                f"(expected bias shape ({out_features},))"
            )
        same_device(layer, "bias", bias, "weight", weight)
        same_dtype(layer, "bias", bias, "weight", weight)


def reduction(layer: str, value: str) -> None:
    choice(layer, "reduction", value, _REDUCTIONS)


def legacy_reduction(layer: str, size_average, reduce, reduction: str) -> str:
    """Map the deprecated ``size_average``/``reduce`` pair to ``reduction``, as torch.nn.functional does."""
    if size_average is None and reduce is None:
        return reduction
    import warnings

    warnings.warn(f"{layer}: size_average and reduce are deprecated, use reduction", stacklevel=3)
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


def _traced(t: Tensor) -> bool:
    """True while torch.compile or a torch.func transform sees ``t``: its values cannot be read."""
    return torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t)


def cross_entropy(input, target, weight, ignore_index, reduction_, label_smoothing):
    """Validate; return ``ignore_index``, or None once the data show that no target equals it."""
    try:  # the common case in one expression (see linear)
        plain = (
            weight is None
            and input.dim() == 2
            and target.dtype == torch.int64
            and target.shape == input.shape[:1]
            and input.is_floating_point()
            and input.device == target.device
            and reduction_ in _REDUCTIONS
            and 0.0 <= label_smoothing <= 1.0
        )
    except (AttributeError, TypeError):
        plain = False
    if not plain:
        _cross_entropy(input, target, weight, ignore_index, reduction_, label_smoothing)
        if target.is_floating_point():
            return ignore_index
    return _class_values("cross_entropy", target, input.shape[0 if input.dim() == 1 else 1], ignore_index)


def _cross_entropy(input, target, weight, ignore_index, reduction_, label_smoothing) -> None:
    """Each check on shapes, dtypes and options in turn, with its message."""
    layer = "cross_entropy"
    tensor(layer, "input", input)
    tensor(layer, "target", target)
    reduction(layer, reduction_)
    if not 0.0 <= label_smoothing <= 1.0:
        raise InputError(f"{layer}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if input.dim() == 0:
        raise InputError(f"{layer}: input must be (C), (N, C) or (N, C, d1, ...), got a 0-d tensor")
    floating(layer, "input", input)
    same_device(layer, "input", input, "target", target)
    class_dim = 0 if input.dim() == 1 else 1
    classes = input.shape[class_dim]
    if weight is not None:
        tensor(layer, "weight", weight)
        if weight.dim() != 1 or weight.shape[0] != classes:
            raise InputError(
                f"{layer}: weight has shape {shape(weight)}, input has {classes} classes (shape {shape(input)})"
            )
        same_device(layer, "input", input, "weight", weight)
        if weight.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{layer}: the class weight is not differentiated; pass weight.detach()")
    if target.is_floating_point():
        if target.shape != input.shape:
            raise InputError(
                f"{layer}: class-probability target has shape {shape(target)}, input has shape {shape(input)} "
                "(they must match; class indices need an integer target)"
            )
        return ignore_index
    expected = input.shape[:class_dim] + input.shape[class_dim + 1 :]
    if target.dtype in (torch.bool, torch.uint8) or target.is_complex():
        raise InputError(
            f"{layer}: target must hold class indices (int64) or class probabilities (float), got dtype {target.dtype}"
        )
    if target.shape != expected:
        raise InputError(
            f"{layer}: target has shape {shape(target)}, expected {tuple(expected)} "
            f"for input of shape {shape(input)} (class indices) or {shape(input)} (class probabilities)"
        )


def _class_values(layer: str, target: Tensor, classes: int, ignore_index: int | None = None):
    """Class indices in [0, classes), or ``ignore_index`` (None: no row may be ignored).

    Returns ``ignore_index``, or None when the data show that no target equals it. Reads the data
    on the CPU (two numbers, min and max), on CUDA as a device-side assert (no host sync), and
    not at all under torch.compile or torch.func.
    """
    if target.numel() == 0 or _traced(target):
        return ignore_index

    def bad():
        outside = (target < 0) | (target >= classes)
        return outside if ignore_index is None else outside & (target != ignore_index)

    if target.device.type != "cpu":
        torch._assert_async(~bad().any(), f"{layer}: target holds class indices outside [0, {classes})")
        return ignore_index
    low, high = (v.item() for v in torch.aminmax(target))
    if 0 <= low and high < classes:  # the common case, from two numbers
        return ignore_index if ignore_index is not None and low <= ignore_index <= high else None
    outside = bad()
    if outside.any():
        allowed = f"0..{classes - 1}" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise InputError(
            f"{layer}: target holds class indices outside [0, {classes}) (e.g. {target[outside][0].item()}); "
            f"the allowed range is {allowed}"
        )
    return ignore_index


def mse_loss(input, target, weight, reduction_) -> None:
    layer = "mse_loss"
    tensor(layer, "input", input)
    tensor(layer, "target", target)
    reduction(layer, reduction_)
    floating(layer, "input", input)
    floating(layer, "target", target)
    same_device(layer, "input", input, "target", target)
    try:
        torch.broadcast_shapes(input.shape, target.shape)
    except RuntimeError:
        raise InputError(
            f"{layer}: target shape {shape(target)} does not broadcast to input shape {shape(input)}"
        ) from None
    if target.shape != input.shape:
        import warnings

        warnings.warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=3,
        )
    if weight is not None:
        tensor(layer, "weight", weight)
        if weight.shape != input.shape:
            raise InputError(
                f"{layer}: weight has shape {shape(weight)}, input has shape {shape(input)} (they must match)"
            )
        same_device(layer, "input", input, "weight", weight)
        if weight.requires_grad and torch.is_grad_enabled():
            raise InputError(f"{layer}: the weight is not differentiated; pass weight.detach()")


def dropout_p(layer: str, p) -> None:
    if not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise InputError(
            f"{layer}: p is the probability of zeroing an element and must be in [0, 1), got {p!r} "
            "(p = 1 would zero everything; its gradient scale 1/(1 - p) is undefined)"
        )


def class_indices(layer: str, input: Tensor, target: Tensor, classes: int) -> None:
    """A 1-D integer target of one class index in [0, classes) per row of a 2-D input."""
    tensor(layer, "target", target)
    if input.dim() != 2:
        raise InputError(f"{layer}: input must be (N, features), got shape {shape(input)}")
    if target.dtype != torch.int64 or target.shape != input.shape[:1]:
        raise InputError(
            f"{layer}: target must be class indices of dtype int64 and shape ({input.shape[0]},), "
            f"got dtype {target.dtype} and shape {shape(target)}"
        )
    same_device(layer, "input", input, "target", target)
    _class_values(layer, target, classes)
