r"""Elementwise activations: one mechanism, a table of (h, h') pairs.

Every activation is :math:`Y = h(Z)` applied elementwise, so its Jacobian is
:math:`\operatorname{diag}(h'(Z))` and (``../shared/DERIVATIONS.md``)

.. math::

    G_Z = G_Y \odot h'(Z) \qquad\text{(backward)}\qquad
    \dot Y = h'(Z) \odot \dot Z \qquad\text{(jvp)}

:class:`Elementwise` implements those two lines once. Each activation below is
a few lines: ``forward`` is :math:`h`, ``derivative`` is :math:`h'` written in
terms of the one tensor the backward keeps, and ``saves_output`` says which one
that is. Where :math:`h'` is a function of the output :math:`y` (ReLU,
LeakyReLU, Sigmoid, Tanh, ELU) the output is kept: the next layer keeps it
anyway, so the activation costs no extra memory. Otherwise the input is kept.

At a kink the derivative follows PyTorch: :math:`h'(0) = 0` for ReLU,
:math:`a` for LeakyReLU, :math:`\alpha` for ELU, and Softplus switches to the
identity (derivative 1) only where :math:`\beta z > \text{threshold}`.

The backward never calls autograd or a PyTorch derivative kernel. Under
``create_graph=True`` (double backward) the sigmoid and tanh inside a
derivative go through :class:`SigmoidFunction` / :class:`TanhFunction`, so
that second derivatives are our formulas too.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import ManualFunction

__all__ = [
    "Elementwise",
    "ReLUFunction",
    "LeakyReLUFunction",
    "SigmoidFunction",
    "TanhFunction",
    "GELUFunction",
    "SiLUFunction",
    "ELUFunction",
    "SoftplusFunction",
]


class Elementwise(ManualFunction):
    r"""Base of the elementwise activations: ``Y = h(Z)``, ``G_Z = G_Y ⊙ h'(·)``, ``Ẏ = h'(·) ⊙ Ż``.

    ``apply(input, *params)``, the parameters positional as in
    ``torch.nn.functional``. A subclass defines

    * ``forward(z, *params)``: :math:`h(z)`, any shape. If it takes ``inplace``
      (last) and returns ``z`` itself, the base marks ``z`` dirty; that needs
      ``saves_output``, as the input is gone.
    * ``derivative(s, *params)``: :math:`h'` as a tensor (or a boolean mask) of
      the shape of ``s``, where ``s`` is the output ``y`` if
      ``saves_output(*params)`` else the input ``z``. ``*_`` swallows ``inplace``.
    * ``saves_output(*params)``: whether :math:`h'` can be written from ``y``.

    Shape: input ``(*)``, output ``(*)``, same shape, dtype and device.
    """

    @staticmethod
    def saves_output(*params) -> bool:
        return False

    @staticmethod
    def derivative(saved: Tensor, *params) -> Tensor:
        raise NotImplementedError

    def __init_subclass__(cls, **kwargs):
        # Bind the generic pieces to this subclass's h' (a closure, so that the
        # stand-in ctx objects of vmap and Dynamo need no attribute of ours).
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
            ctx.save_for_backward(saved)
            ctx.save_for_forward(saved)

        def backward(ctx, grad_output):
            (saved,) = ctx.saved_tensors
            h_prime = cls.derivative(saved, *ctx.params)
            if _owned(h_prime, grad_output, saved):  # G_Z = G_Y ⊙ h', into h''s own buffer
                return (h_prime.mul_(grad_output),) + (None,) * len(ctx.params)
            return (grad_output * h_prime,) + (None,) * len(ctx.params)

        def jvp(ctx, z_tangent, *param_tangents):
            (saved,) = ctx.saved_tensors
            h_prime = cls.derivative(saved, *ctx.params)
            if ctx.inplace:  # an input changed in place: its tangent changes in place too
                return z_tangent.mul_(h_prime)
            return h_prime * z_tangent  # Ẏ = h' ⊙ Ż

        cls.setup_context = staticmethod(setup_context)
        cls.backward = staticmethod(backward)
        if "jvp" not in cls.__dict__:  # the compile twin keeps its default jvp
            cls.jvp = staticmethod(jvp)
        super().__init_subclass__(**kwargs)


def _owned(h_prime: Tensor, grad_output: Tensor, saved: Tensor) -> bool:
    """Whether the backward may write G_Z into h' itself, sparing a tensor-sized allocation (a third
    of the ReLU backward's time at 1M elements): no graph is being recorded (a double backward
    needs h' intact), no vmap batches the gradient but not h' (torch.func, or the legacy vmap of
    gradcheck's batched check), and h' is a new tensor of the result's shape and dtype, not a
    view of the saved one."""
    return (
        not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # (the compiler fuses the product anyway)
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._functorch.is_legacy_batchedtensor(grad_output)
        and h_prime.shape == grad_output.shape
        and h_prime.dtype == grad_output.dtype
        and h_prime.untyped_storage().data_ptr() != saved.untyped_storage().data_ptr()
    )


# The derivatives below are built from arithmetic kernels (sign, clamp, lerp).
# On CPU, comparisons that make a boolean mask and torch.where run 5-20x slower
# than these, and a float * bool product converts the mask first.


def _positive(s: Tensor) -> Tensor:
    """1[s > 0] in the dtype of ``s``: sign gives -1, 0, 1; the clamp folds -1 into 0."""
    return s.sign().clamp(min=0)


def _select(positive: Tensor, where_positive: float, elsewhere: Tensor) -> Tensor:
    """``where_positive`` where ``positive`` is 1, ``elsewhere`` where it is 0 (lerp is exact at both ends)."""
    return torch.lerp(elsewhere, elsewhere.new_full((), where_positive).expand_as(elsewhere), positive)


def _sigmoid(z: Tensor) -> Tensor:
    """σ(z) inside a derivative: our Function when a double backward records the graph."""
    return SigmoidFunction.apply(z) if torch.is_grad_enabled() else torch.sigmoid(z)


def _tanh(z: Tensor) -> Tensor:
    """tanh(z) inside a derivative: our Function when a double backward records the graph."""
    return TanhFunction.apply(z) if torch.is_grad_enabled() else torch.tanh(z)


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
        return y.sign()  # y >= 0, so sign(y) = 1[y > 0]


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
        if 0 <= negative_slope <= 1:  # s = y: sign(y) in {-1, 0, 1} clamps to {a, a, 1}
            return s.sign().clamp(min=negative_slope)
        return _select(_positive(s), 1.0, torch.full_like(s, negative_slope))


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
        return y * (1 - y)


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
        return 1 - y * y


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
    def derivative(z, approximate="none"):
        if approximate == "tanh":
            t = _tanh(_SQRT_2_OVER_PI * (z + _GELU_K * z * z * z))
            return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_K * z * z)
        cdf = 0.5 * (1 + torch.erf(z * _SQRT_HALF))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf


class SiLUFunction(Elementwise):
    r""":math:`h(z) = z\,\sigma(z)`, :math:`h'(z) = \sigma(z)\,(1 + z(1 - \sigma(z)))`."""

    @staticmethod
    def forward(z, inplace=False):
        return torch.nn.functional.silu(z, inplace)

    @staticmethod
    def derivative(z, *_):
        s = _sigmoid(z)
        return s * (1 + z * (1 - s))


class ELUFunction(Elementwise):
    r""":math:`h(z) = z` if :math:`z > 0` else :math:`\alpha(e^z - 1)`;
    :math:`h'(z) = 1` if :math:`z > 0` else :math:`\alpha e^z = y + \alpha`.

    For :math:`\alpha > 0`, :math:`y > 0` exactly where :math:`z > 0`, so the
    output is kept; otherwise the input, with :math:`h'(z) = \alpha e^z` for :math:`z \le 0`.
    """

    @staticmethod
    def forward(z, alpha=1.0, inplace=False):
        return torch.nn.functional.elu(z, alpha, inplace)

    @staticmethod
    def saves_output(alpha=1.0, *_):
        return alpha > 0

    @staticmethod
    def derivative(s, alpha=1.0, *_):
        if alpha > 0:  # s is the output y: y + alpha where y <= 0
            return _select(_positive(s), 1.0, s.clamp(max=0) + alpha)
        return _select(_positive(s), 1.0, alpha * torch.exp(s.clamp(max=0)))


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
        bz = z * beta
        return _select(_positive(bz - threshold), 1.0, _sigmoid(bz))
