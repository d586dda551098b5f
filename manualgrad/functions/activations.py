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

from .base import ManualFunction, save_for_forward

__all__ = [
    "ELUFunction",
    "Elementwise",
    "GELUFunction",
    "LeakyReLUFunction",
    "ReLUFunction",
    "SiLUFunction",
    "SigmoidFunction",
    "SoftplusFunction",
    "TanhFunction",
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
            save_for_forward(ctx, saved)

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
        h_prime is not saved
        and h_prime._base is None  # not a view (of the saved tensor or anything else)
        and h_prime.dtype == grad_output.dtype
        and h_prime.shape == grad_output.shape
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()  # (the compiler fuses the product anyway)
        and not torch._C._are_functorch_transforms_active()
        and not torch._C._functorch.is_legacy_batchedtensor(grad_output)
    )


# The derivatives below are built from arithmetic kernels (sign, clamp, lerp).
# On CPU, comparisons that make a boolean mask and torch.where run 5-20x slower
# than these, and a float * bool product converts the mask first.


class _Fresh:
    """A tensor a derivative has just made, transformed step by step: ``_Fresh(z * z).mul(-0.5).exp()``.

    Each step runs in place when no graph is being recorded, sparing a tensor-sized allocation (for
    GELU's derivative on 1M elements, half the time); under ``create_graph`` it runs out of place,
    since autograd needs every intermediate intact, and ``sigmoid``/``tanh`` go through our own
    Functions, so that second derivatives are our formulas too. ``.t`` is the result.
    """

    __slots__ = ("inplace", "t")

    def __init__(self, t: Tensor):
        self.t, self.inplace = t, not torch.is_grad_enabled()

    def _step(self, name: str, *args) -> _Fresh:
        args = tuple(a.t if isinstance(a, _Fresh) else a for a in args)
        self.t = getattr(self.t, name + "_" if self.inplace else name)(*args)
        return self

    def add(self, other):
        return self._step("add", other)

    def mul(self, other):
        return self._step("mul", other)

    def neg(self):
        return self._step("neg")

    def exp(self):
        return self._step("exp")

    def erf(self):
        return self._step("erf")

    def sign(self):
        return self._step("sign")

    def clamp(self, min=None, max=None):
        return self._step("clamp", min, max)

    def select(self, positive: _Fresh, where_positive: float = 1.0):
        """``where_positive`` where ``positive`` is 1, this tensor where it is 0 (lerp is exact at both ends)."""
        return self._step("lerp", self.t.new_full((), where_positive).expand_as(self.t), positive)

    def sigmoid(self):
        if self.inplace:
            return self._step("sigmoid")
        self.t = SigmoidFunction.apply(self.t)
        return self

    def tanh(self):
        if self.inplace:
            return self._step("tanh")
        self.t = TanhFunction.apply(self.t)
        return self


def _positive(s: Tensor) -> _Fresh:
    """1[s > 0] in the dtype of ``s``: sign gives -1, 0, 1; the clamp folds -1 into 0."""
    return _Fresh(s.sign()).clamp(min=0)


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
            return _Fresh(s.sign()).clamp(min=negative_slope).t
        return _Fresh(torch.full_like(s, negative_slope)).select(_positive(s)).t


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
        return _Fresh(1 - y).mul(y).t  # y (1 - y)


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
        return _Fresh(y * y).neg().add(1).t  # 1 - y²


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
            t = _Fresh(z * z).mul(_GELU_K).add(1).mul(z).mul(_SQRT_2_OVER_PI).tanh().t  # tanh(c (z + k z³))
            slope = _Fresh(z * z).mul(3 * _GELU_K).add(1).mul(z).mul(0.5 * _SQRT_2_OVER_PI)  # ½ z c (1 + 3k z²)
            slope.mul(_Fresh(t * t).neg().add(1))  # × (1 - t²)
            return slope.add(_Fresh(t + 1).mul(0.5)).t  # + ½ (1 + t)
        cdf = _Fresh(z * _SQRT_HALF).erf().add(1).mul(0.5)  # Φ(z) = ½ (1 + erf(z / √2))
        z_pdf = _Fresh(z * z).mul(-0.5).exp().mul(_INV_SQRT_2PI).mul(z)  # z φ(z) = z e^(-z²/2) / √(2π)
        return cdf.add(z_pdf).t


class SiLUFunction(Elementwise):
    r""":math:`h(z) = z\,\sigma(z)`, :math:`h'(z) = \sigma(z)\,(1 + z(1 - \sigma(z)))`."""

    @staticmethod
    def forward(z, inplace=False):
        return torch.nn.functional.silu(z, inplace)

    @staticmethod
    def derivative(z, *_):
        s = SigmoidFunction.apply(z) if torch.is_grad_enabled() else torch.sigmoid(z)  # σ(z), ours under create_graph
        return _Fresh(1 - s).mul(z).add(1).mul(s).t  # σ (1 + z (1 - σ))


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
            return _Fresh(s.clamp(max=0)).add(alpha).select(_positive(s)).t
        return _Fresh(s.clamp(max=0)).exp().mul(alpha).select(_positive(s)).t


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
        beyond = _Fresh(z * beta).add(-threshold).sign().clamp(min=0)  # 1[βz > threshold]
        return _Fresh(z * beta).sigmoid().select(beyond).t  # σ(βz), or 1 beyond the threshold
