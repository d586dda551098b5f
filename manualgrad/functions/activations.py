r"""Elementwise activations: one mechanism, and per activation its :math:`h` and :math:`h'`.

Every activation is :math:`Y = h(Z)` applied elementwise, so its Jacobian is
:math:`\operatorname{diag}(h'(Z))` and (``docs/derivations.md``, section 2)

.. math::

    G_Z = G_Y \odot h'(Z) \qquad\text{(backward)}\qquad
    \dot Y = h'(Z) \odot \dot Z \qquad\text{(jvp)}

:class:`Elementwise` implements those two lines once. Each activation below is
a ``forward`` (:math:`h`, PyTorch's own kernel), a ``derivative``
(:math:`h'`, the formula) and one line that registers it. Where :math:`h'` is
a function of the output :math:`y` as exactly as of the input (ReLU, LeakyReLU,
Sigmoid, Tanh) the output is kept, ``saves_output``: the next layer keeps it
anyway, so the activation costs no extra memory. Otherwise the input is kept.

At a kink the derivative follows PyTorch: :math:`h'(0) = 0` for ReLU,
:math:`a` for LeakyReLU, :math:`\alpha` for ELU; Softplus switches to the
identity (derivative 1) only where :math:`\beta z > \text{threshold}`; where
the input is NaN the gradient is what PyTorch's kernel gives.

The backward never calls autograd or a PyTorch derivative kernel. Inside a
double backward (``create_graph=True``) the sigmoid and tanh of a derivative
go through :class:`SigmoidFunction` and :class:`TanhFunction`, so that second
derivatives are our formulas too. Half-precision inputs are differentiated in
float32 and rounded once (:func:`~manualgrad.functions.base.opmath`), as
PyTorch's kernels do.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks, _compat
from ..registry import activation
from . import fused
from .base import ManualFunction, cast, exp, opmath, recorded, save

__all__ = [
    "ELUFunction",
    "Elementwise",
    "GELUFunction",
    "LeakyReLUFunction",
    "MishFunction",
    "ReLUFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftplusFunction",
    "TanhFunction",
]


class Elementwise(ManualFunction):
    r"""Base of the elementwise activations: ``Y = h(Z)``, ``G_Z = G_Y ⊙ h'``, ``Ẏ = h' ⊙ Ż``.

    ``apply(input, *params)``, the parameters positional as in
    ``torch.nn.functional``. A subclass defines

    * ``forward(z, *params)``: :math:`h(z)`, any shape. If it takes ``inplace``
      (last) and returns ``z`` itself, the base marks ``z`` dirty; that needs
      ``saves_output``, as the input is gone.
    * ``derivative(s, *params)``: :math:`h'` as a tensor of the shape of ``s``,
      where ``s`` is the output ``y`` if ``saves_output(*params)`` else the input ``z``.
    * ``saves_output(*params)``: whether :math:`h'` can be written from ``y`` (default: no).
    * ``check(*params)``: raise :class:`~manualgrad.InputError` for invalid options (default: none).

    Shape: input ``(*)``, output ``(*)``, same shape, dtype and device.
    """

    @staticmethod
    def saves_output(*params) -> bool:
        return False

    @staticmethod
    def derivative(saved: Tensor, *params) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def check(*params) -> None:
        pass

    def __init_subclass__(cls, **kwargs):
        # Bound to this subclass's h' as closures, so that the stand-in ctx objects of vmap and Dynamo
        # need no attribute of ours.
        def setup_context(ctx, inputs, output):
            z, *params = inputs
            ctx.params = params
            ctx.inplace = output is z  # the forward overwrote its input (inplace=True)
            from_output = cls.saves_output(*params)
            if ctx.inplace:
                if not from_output and ctx.needs_input_grad[0]:
                    raise RuntimeError(
                        f"{cls.__name__}: inplace=True overwrites the input, which the derivative of this "
                        "activation needs; use inplace=False when the input requires grad"
                    )
                ctx.mark_dirty(z)
            saved = output if from_output else z
            save(ctx, saved)

        fresh = cls.__module__ == __name__  # our own derivatives return a new tensor, which times() may reuse

        def backward(ctx, grad_output):
            (saved,) = ctx.saved_tensors
            grad_input = fused.product(cls, grad_output, opmath(saved), ctx.params)  # None unless fused_backward
            if grad_input is None:
                grad_input = times(grad_output, cls.derivative(opmath(saved), *ctx.params), fresh)  # G_Z = G_Y ⊙ h'
            return (cast(grad_input, grad_output.dtype),) + (None,) * len(ctx.params)

        def jvp(ctx, z_tangent, *param_tangents):
            (saved,) = ctx.saved_tensors
            h_prime = cls.derivative(opmath(saved), *ctx.params)
            if ctx.inplace:  # an input changed in place: its tangent changes in place too
                return z_tangent.mul_(h_prime)
            return cast(h_prime * z_tangent, z_tangent.dtype)  # Ẏ = h' ⊙ Ż

        cls.setup_context = staticmethod(setup_context)
        cls.backward = staticmethod(backward)
        if "jvp" not in cls.__dict__:  # the compile twin keeps its default jvp
            cls.jvp = staticmethod(jvp)
        super().__init_subclass__(**kwargs)


def times(grad_output: Tensor, h_prime: Tensor, fresh: bool = False) -> Tensor:
    """``grad_output * h_prime``, written into ``h_prime`` when it is a new tensor nothing else holds.

    Speed (a trick of this file): every new full-size tensor is fresh memory from the allocator, and on a
    CPU whose allocator hands large blocks back to the system (glibc's default) each costs page faults, up to
    several times the multiplication itself; reusing the derivative's own buffer saves one per backward.
    Only where ``fresh`` (the derivatives of this file, which always build a new tensor), nothing records the
    product (no double backward, forward-mode AD or ``torch.compile``), and ``h_prime`` has the product's
    shape and dtype. ``tests/test_gradcheck.py`` checks that both are equal.
    """
    if (
        fresh
        and not (torch.is_grad_enabled() or _compat.forward_ad_enabled() or torch.compiler.is_compiling())
        and h_prime.shape == grad_output.shape
        and h_prime.dtype == torch.promote_types(h_prime.dtype, grad_output.dtype)
        and h_prime.is_contiguous()
        and not (_compat.batched(h_prime) or _compat.batched(grad_output))
    ):
        return h_prime.mul_(grad_output)
    return grad_output * h_prime


class ReLUFunction(Elementwise):
    r""":math:`h(z) = \max(z, 0)`, :math:`h'(z) = 1[z > 0] = 1[y > 0]` (0 at the kink)."""

    @staticmethod
    def forward(z, inplace=False):
        return torch.relu_(z) if inplace else torch.relu(z)

    @staticmethod
    def saves_output(*_):
        return True

    @staticmethod
    def derivative(y, *_):
        return indicator(torch.ne, y, 0)  # 1[y > 0] for y = max(z, 0) >= 0; 1 at NaN (y != 0), as in PyTorch


def indicator(compare, s: Tensor, value: float) -> Tensor:
    """``compare(s, value)`` as 0 and 1 in ``s``'s dtype: ``indicator(torch.gt, s, 0)`` is 1[s > 0].

    Speed (a trick of this file): on the CPU, a comparison that makes a bool mask, the mask's conversion
    to floats and ``torch.where`` cost 4-25x an arithmetic kernel (LeakyReLU's derivative written with
    ``torch.where``: 10x); written straight into a float tensor (``out=``) the comparison costs about one, and
    the piecewise derivatives below are then plain arithmetic, 1[...] ⊙ this + (1 - 1[...]) ⊙ that. It buys
    3-18% of an MLP training step (``python -m benchmarks``). Forward-mode AD, ``torch.func`` and
    ``torch.compile`` cannot take ``out=``: there the plain expression runs. ``tests/test_gradcheck.py``
    checks that both are equal.
    """
    if _compat.forward_ad_enabled() or torch.compiler.is_compiling():
        return compare(s, value).to(s.dtype)
    return compare(s, value, out=torch.empty_like(s))


relu = activation("relu", ReLUFunction, torch.nn.ReLU)


class LeakyReLUFunction(Elementwise):
    r""":math:`h(z) = z` if :math:`z > 0` else :math:`a z`; :math:`h'(z) = 1` if :math:`z > 0` else :math:`a`.

    For :math:`a \ge 0` the sign of :math:`y` is the sign of :math:`z`, so the
    output is kept; for a negative slope the input is.
    """

    @staticmethod
    def forward(z, negative_slope=0.01, inplace=False):
        return torch.nn.functional.leaky_relu(z, negative_slope, inplace)

    @staticmethod
    def saves_output(negative_slope=0.01, *_):
        return negative_slope >= 0

    @staticmethod
    def derivative(s, negative_slope=0.01, *_):
        positive = indicator(torch.gt, s, 0)  # 1[z > 0] (the sign of y is z's when a >= 0)
        return positive.mul_(1 - negative_slope).add_(negative_slope)  # a + (1 − a) 1[z > 0]: 1 where z > 0, else a


leaky_relu = activation("leaky_relu", LeakyReLUFunction, torch.nn.LeakyReLU)


class SigmoidFunction(Elementwise):
    r""":math:`h(z) = \sigma(z) = 1 / (1 + e^{-z})`, :math:`h'(z) = \sigma(z)(1 - \sigma(z)) = y (1 - y)`."""

    @staticmethod
    def forward(z):
        return torch.sigmoid(z)

    @staticmethod
    def saves_output():
        return True

    @staticmethod
    def derivative(y):
        return (1 - y).mul_(y)  # (1 − y) y


sigmoid = activation("sigmoid", SigmoidFunction, torch.nn.Sigmoid)


class TanhFunction(Elementwise):
    r""":math:`h(z) = \tanh z`, :math:`h'(z) = 1 - \tanh^2 z = 1 - y^2`."""

    @staticmethod
    def forward(z):
        return torch.tanh(z)

    @staticmethod
    def saves_output():
        return True

    @staticmethod
    def derivative(y):
        return (y * y).neg_().add_(1)  # 1 − y²


tanh = activation("tanh", TanhFunction, torch.nn.Tanh)


_sigmoid = recorded(torch.sigmoid, SigmoidFunction)  # σ(z) inside a derivative
_tanh = recorded(torch.tanh, TanhFunction)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_K = 0.044715


class GELUFunction(Elementwise):
    r"""GELU, ``approximate="none"`` or ``"tanh"``.

    * exact: :math:`h(z) = z\,\Phi(z)`, :math:`h'(z) = \Phi(z) + z\,\varphi(z)`,
      with :math:`\Phi(z) = \tfrac12(1 + \operatorname{erf}(z/\sqrt2))`, :math:`\varphi(z) = e^{-z^2/2}/\sqrt{2\pi}`;
    * tanh: :math:`h(z) = \tfrac12 z (1 + t)`, :math:`t = \tanh(c(z + k z^3))`,
      :math:`h'(z) = \tfrac12(1 + t) + \tfrac12 z (1 - t^2)\,c\,(1 + 3 k z^2)`,
      :math:`c = \sqrt{2/\pi}`, :math:`k = 0.044715`.
    """

    @staticmethod
    def forward(z, approximate="none"):
        return torch.nn.functional.gelu(z, approximate=approximate)

    @staticmethod
    def check(approximate="none"):
        _checks.choice("gelu", "approximate", approximate, ("none", "tanh"))

    @staticmethod
    def derivative(z, approximate="none"):
        if approximate == "tanh":
            c, k = _SQRT_2_OVER_PI, _GELU_K
            z2 = z * z
            t = _tanh((z2 * k).add_(1).mul_(z).mul_(c))  # t = tanh(c (z + k z³))
            slope = z2.mul_(3 * k).add_(1).mul_(z).mul_(0.5 * c)  # ½ z c (1 + 3k z²)
            return (t * t).neg_().add_(1).mul_(slope).add_(t, alpha=0.5).add_(0.5)  # (1 − t²) ⋅ that + ½(1 + t)
        cdf = (z * _SQRT_HALF).erf_().add_(1).mul_(0.5)  # Φ(z) = ½ (1 + erf(z / √2))
        z_pdf = (z * _INV_SQRT_2PI).mul_(exp(z * z, -0.5, reuse=True))  # z φ(z) = z e^(−z²/2) / √(2π)
        return cdf.add_(z_pdf)  # Φ(z) + z φ(z)


gelu = activation("gelu", GELUFunction, torch.nn.GELU)


class SiLUFunction(Elementwise):
    r""":math:`h(z) = z\,\sigma(z)`, :math:`h'(z) = \sigma(z)\,(1 + z(1 - \sigma(z)))`."""

    @staticmethod
    def forward(z, inplace=False):
        return torch.nn.functional.silu(z, inplace)

    @staticmethod
    def derivative(z, *_):
        s = _sigmoid(z)
        return (1 - s).mul_(z).add_(1).mul_(s)  # (1 + z (1 − σ)) σ


silu = activation("silu", SiLUFunction, torch.nn.SiLU)


class ELUFunction(Elementwise):
    r""":math:`h(z) = z` if :math:`z > 0` else :math:`\alpha(e^z - 1)`;
    :math:`h'(z) = 1` if :math:`z > 0` else :math:`\alpha e^z = y + \alpha`.

    As in PyTorch, the input is kept, and :math:`h' = \alpha e^z`; computed in
    place (``inplace=True``, :math:`\alpha > 0`) the output is kept, and
    :math:`h' = y + \alpha`, which is exact in exact arithmetic but carries the
    rounding of :math:`y` (in float16, a thousand times the error of
    :math:`\alpha e^z` where :math:`z \ll 0`).
    """

    @staticmethod
    def forward(z, alpha=1.0, inplace=False):
        return torch.nn.functional.elu(z, alpha, inplace)

    @staticmethod
    def saves_output(alpha=1.0, inplace=False):
        return inplace and alpha > 0

    @staticmethod
    def derivative(s, alpha=1.0, inplace=False):
        positive = indicator(torch.gt, s, 0)  # 1[z > 0]
        if inplace and alpha > 0:  # s is the output y
            return positive + (1 - positive) * (s + alpha)  # 1 where z > 0, else y + α
        # s is the input z; e^min(z, 0) equals e^z where it is used and stays finite where it is not
        return positive + (1 - positive) * alpha * torch.exp(s.clamp(max=0))  # 1 where z > 0, else α e^z


elu = activation("elu", ELUFunction, torch.nn.ELU)


class SoftplusFunction(Elementwise):
    r""":math:`h(z) = \tfrac1\beta \log(1 + e^{\beta z})`, the identity where :math:`\beta z > \text{threshold}`;
    :math:`h'(z) = \sigma(\beta z)`, and 1 where :math:`\beta z > \text{threshold}`.

    The input is kept: :math:`\sigma(\beta z) = 1 - e^{-\beta y}` in the smooth
    part, but the switch to the identity makes :math:`y \mapsto z` ambiguous near
    the threshold.
    """

    @staticmethod
    def forward(z, beta=1.0, threshold=20.0):
        return torch.nn.functional.softplus(z, beta, threshold)

    @staticmethod
    def derivative(z, beta=1.0, threshold=20.0):
        beyond = indicator(torch.gt, beta * z, threshold)  # 1[βz > threshold]
        return beyond + (1 - beyond) * _sigmoid(beta * z)  # 1 beyond the threshold, else σ(βz)


softplus = activation("softplus", SoftplusFunction, torch.nn.Softplus)


_softplus = recorded(torch.nn.functional.softplus, SoftplusFunction)


class MishFunction(Elementwise):
    r""":math:`h(z) = z \tanh(\operatorname{softplus}(z))`,
    :math:`h'(z) = t + z\,\sigma(z)\,(1 - t^2)` with :math:`t = \tanh(\operatorname{softplus}(z))`."""

    @staticmethod
    def forward(z, inplace=False):
        return torch.nn.functional.mish(z, inplace)

    @staticmethod
    def derivative(z, *_):
        t = _tanh(_softplus(z))
        return t + z * _sigmoid(z) * (1 - t * t)


mish = activation("mish", MishFunction, torch.nn.Mish)
