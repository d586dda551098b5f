r"""Drop-in twins of ``torch.nn`` modules whose backward passes are manualgrad's.

Each class here subclasses its ``torch.nn`` namesake and replaces only
``forward``: constructor signature, parameters, initialisation, ``repr``,
``state_dict`` keys and ``isinstance`` checks are torch's own, so a checkpoint
saved from one loads into the other and ``import manualgrad.nn as nn`` is the
whole port.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _checks
from . import functional as F
from .functions import (
    ELUFunction,
    GELUFunction,
    LeakyReLUFunction,
    MLPCrossEntropyFunction,
    MLPFunction,
    MLPSpec,
    ReLUFunction,
    SigmoidFunction,
    SiLUFunction,
    SoftplusFunction,
    TanhFunction,
)

__all__ = [
    "ACTIVATIONS",
    "ELU",
    "GELU",
    "MLP",
    "CrossEntropyLoss",
    "Dropout",
    "LeakyReLU",
    "Linear",
    "MSELoss",
    "ReLU",
    "SiLU",
    "Sigmoid",
    "Softplus",
    "Tanh",
]


class Linear(torch.nn.Linear):
    r"""Applies an affine map :math:`y = x W^\top + b` with a hand-written backward.

    Backward (rows are samples): :math:`G_X = G_Y W`, :math:`G_W = G_Y^\top X`,
    :math:`G_b = \sum_n G_Y[n]`; see :class:`manualgrad.functions.LinearFunction`.

    Args:
        in_features: size of each input sample
        out_features: size of each output sample
        bias: if ``False``, the layer learns no additive bias. Default: ``True``
        device, dtype: factory arguments for the parameters

    Attributes:
        weight: ``(out_features, in_features)``, initialised
            :math:`\mathcal{U}(-\sqrt{k}, \sqrt{k})`, :math:`k = 1/\text{in\_features}` (as torch.nn.Linear)
        bias: ``(out_features,)``, same initialisation

    Shape:
        - Input: :math:`(*, H_{in})`, :math:`H_{in} = \text{in\_features}`
        - Output: :math:`(*, H_{out})`, :math:`H_{out} = \text{out\_features}`

    Examples::

        >>> import manualgrad.nn as mnn
        >>> m = mnn.Linear(20, 30)
        >>> m(torch.randn(128, 20)).shape
        torch.Size([128, 30])
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class ReLU(torch.nn.ReLU):
    r""":math:`\text{ReLU}(x) = \max(x, 0)`; backward :math:`G_X = G_Y \odot 1[y > 0]`.

    Args: inplace (default ``False``). Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.relu(input, self.inplace)


class LeakyReLU(torch.nn.LeakyReLU):
    r""":math:`x` if :math:`x > 0` else :math:`a x`; backward :math:`G_X = G_Y \odot (1 \text{ if } y > 0 \text{ else } a)`.

    Args: negative_slope :math:`a` (default ``0.01``), inplace (default ``False``).
    Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class Sigmoid(torch.nn.Sigmoid):
    r""":math:`\sigma(x) = 1 / (1 + e^{-x})`; backward :math:`G_X = G_Y \odot y (1 - y)`.

    Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.sigmoid(input)


class Tanh(torch.nn.Tanh):
    r""":math:`\tanh x`; backward :math:`G_X = G_Y \odot (1 - y^2)`.

    Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.tanh(input)


class GELU(torch.nn.GELU):
    r""":math:`x\,\Phi(x)`; backward :math:`G_X = G_Y \odot (\Phi(x) + x\,\varphi(x))` (or the tanh form).

    Args: approximate ``"none"`` (default) or ``"tanh"``. Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(torch.nn.SiLU):
    r""":math:`x\,\sigma(x)`; backward :math:`G_X = G_Y \odot \sigma(x)(1 + x(1 - \sigma(x)))`.

    Args: inplace (default ``False``). Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.silu(input, inplace=self.inplace)


class ELU(torch.nn.ELU):
    r""":math:`x` if :math:`x > 0` else :math:`\alpha(e^x - 1)`; backward :math:`G_X = G_Y \odot (1 \text{ if } y > 0 \text{ else } y + \alpha)`.

    Args: alpha (default ``1.0``), inplace (default ``False``). Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.elu(input, self.alpha, self.inplace)


class Softplus(torch.nn.Softplus):
    r""":math:`\frac1\beta\log(1 + e^{\beta x})`; backward :math:`G_X = G_Y \odot \sigma(\beta x)` (1 past the threshold).

    Args: beta (default ``1.0``), threshold (default ``20.0``). Shape: input :math:`(*)`, output :math:`(*)`.
    """

    def forward(self, input: Tensor) -> Tensor:
        return F.softplus(input, self.beta, self.threshold)


class Dropout(torch.nn.Dropout):
    r"""Zeroes each element with probability :math:`p` in training, scaling the rest by :math:`1/(1-p)`.

    Backward :math:`G_X = G_Y \odot K/(1-p)`. Identity in eval mode. Args: p in
    ``[0, 1)`` (default ``0.5``), inplace (default ``False``). Shape: input
    :math:`(*)`, output :math:`(*)`. On the CPU the same seed draws the same mask
    as ``torch.nn.Dropout``.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        _checks.dropout_p("Dropout", p)
        super().__init__(p, inplace)

    def forward(self, input: Tensor) -> Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""Softmax cross-entropy, :math:`\ell_n = -\log\operatorname{softmax}(x_n)_{t_n}`, reduced.

    Backward :math:`G_X = (\operatorname{softmax}(X) - \mathrm{onehot}(t))/N` (unweighted,
    unsmoothed); weights, ``ignore_index`` and label smoothing as in torch.nn, see
    :func:`manualgrad.functional.cross_entropy`. Shape: input :math:`(N, C)`
    (or :math:`(C)`, :math:`(N, C, d_1, ...)`), target :math:`(N)` class indices
    or :math:`(N, C)` probabilities.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )


class MSELoss(torch.nn.MSELoss):
    r"""Mean squared error :math:`\frac1M\sum(\hat y - t)^2`; backward :math:`G = 2(\hat y - t)/M`.

    Shape: input :math:`(*)`, target :math:`(*)`, output scalar (or :math:`(*)` for ``"none"``).
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


#: The activation names :class:`MLP` (and the training program) accept, with the module each one builds.
ACTIVATIONS = {
    "relu": ReLU,
    "leaky_relu": LeakyReLU,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
    "gelu": GELU,
    "silu": SiLU,
    "elu": ELU,
    "softplus": Softplus,
}

# For the fused MLP: each activation module's Function and its positional parameters (inplace aside).
_FUNCTIONS = {
    torch.nn.ReLU: (ReLUFunction, lambda m: ()),
    torch.nn.LeakyReLU: (LeakyReLUFunction, lambda m: (m.negative_slope,)),
    torch.nn.Sigmoid: (SigmoidFunction, lambda m: ()),
    torch.nn.Tanh: (TanhFunction, lambda m: ()),
    torch.nn.GELU: (GELUFunction, lambda m: (m.approximate,)),
    torch.nn.SiLU: (SiLUFunction, lambda m: ()),
    torch.nn.ELU: (ELUFunction, lambda m: (m.alpha,)),
    torch.nn.Softplus: (SoftplusFunction, lambda m: (m.beta, m.threshold)),
}


def _activation_function(module: torch.nn.Module):
    for cls in type(module).__mro__:
        if cls in _FUNCTIONS:
            function, args = _FUNCTIONS[cls]
            return function, args(module)
    raise _checks.InputError(f"MLP: activation {module!r} is not one of {', '.join(ACTIVATIONS)}")


class MLP(torch.nn.Sequential):
    r"""A multilayer perceptron whose forward and backward are ONE autograd Function.

    .. math::

        Z_l = A_{l-1} W_l^\top + b_l, \quad A_l = \text{dropout}(h(Z_l)) \ (l < L), \quad \text{output } Z_L

    Backward: the notes' chain :math:`G \leftarrow (G W_l) \odot M_{l-1} \odot h'(Z_{l-1})`
    with :math:`G_{W_l} = G^\top A_{l-1}`, :math:`G_{b_l} = \sum_n G[n]` on the way
    down (:class:`~manualgrad.functions.MLPFunction`). :meth:`loss` fuses the
    softmax cross-entropy too.

    It *is* the ``nn.Sequential`` a per-layer MLP would be, ``Linear,
    activation, [Dropout,] Linear, ...``: same children, same parameters, same
    ``state_dict`` keys (``"0.weight", "0.bias", "2.weight", ...`` without
    dropout, ``"0.weight", "3.weight", ...`` with it), so checkpoints move
    between the two. Only ``forward`` differs; ``per_layer()`` gives the same
    modules run one by one. The fused path is first-order only (a double
    backward raises); ``torch.compile`` traces it without a graph break. For
    ``torch.func`` or forward-mode AD use ``per_layer()``.

    Args:
        sizes: layer widths, input first, e.g. ``(784, 512, 256, 10)``
        activation: a name in :data:`ACTIVATIONS` or an activation module (copied
            after every hidden layer). Default: ``"relu"``
        dropout: dropout probability after every hidden activation. Default: ``0.0``
        bias: whether the Linear layers have biases. Default: ``True``
        device, dtype: factory arguments for the parameters

    Shape:
        - Input: :math:`(*, \text{sizes}[0])`; output: :math:`(*, \text{sizes}[-1])`

    Examples::

        >>> import manualgrad.nn as mnn
        >>> model = mnn.MLP([784, 512, 256, 10], activation="relu", dropout=0.1)
        >>> logits = model(torch.randn(128, 784))
        >>> loss = model.loss(torch.randn(128, 784), torch.randint(0, 10, (128,)))
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | torch.nn.Module = "relu",
        dropout: float = 0.0,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        sizes = tuple(int(s) for s in sizes)
        if len(sizes) < 2 or min(sizes) < 1:
            raise _checks.InputError(f"MLP: sizes needs an input and an output width, all positive, got {sizes}")
        if isinstance(activation, str):
            _checks.choice("MLP", "activation", activation, tuple(ACTIVATIONS))
            activation = ACTIVATIONS[activation]()
        _activation_function(activation)  # raises for an unsupported module
        _checks.dropout_p("MLP", dropout)
        layers = []
        for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(Linear(fan_in, fan_out, bias=bias, device=device, dtype=dtype))
            if i < len(sizes) - 2:
                layers.append(copy.deepcopy(activation))
                if dropout > 0:
                    layers.append(Dropout(dropout))
        super().__init__(*layers)
        self.sizes = sizes
        self.dropout = float(dropout)
        self._linears = [m for m in self if isinstance(m, torch.nn.Linear)]
        self._activation = _activation_function(activation)
        self._specs = {}  # (training, label_smoothing) -> MLPSpec

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice is a plain Sequential of the same modules
            return torch.nn.Sequential(*list(self._modules.values())[idx])
        return super().__getitem__(idx)

    def _spec(self, label_smoothing: float = 0.0) -> MLPSpec:
        key = (self.training, label_smoothing)
        spec = self._specs.get(key)
        if spec is None:
            function, args = self._activation
            spec = self._specs[key] = MLPSpec(function, args, self.dropout, self.training, float(label_smoothing))
        return spec

    def _params(self) -> list:
        # read from _parameters (not m.weight: Module.__getattr__ costs ~0.5 µs a lookup), so a
        # Parameter the user assigns later is still the one used
        return [t for m in self._linears for t in (m._parameters["weight"], m._parameters["bias"])]

    def forward(self, input: Tensor) -> Tensor:
        params = self._params()
        _checks.linear(input, params[0], params[1], layer="MLP")
        return MLPFunction.apply(input, self._spec(), *params)[0]

    def loss(self, input: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
        """Mean softmax cross-entropy of ``self(input)`` against class indices, fused into the same Function.

        Equal to ``manualgrad.functional.cross_entropy(self(input), target,
        label_smoothing=label_smoothing)``, with the whole training step's
        backward in one autograd node. Shape: input ``(N, sizes[0])``, target ``(N,)``.
        """
        params = self._params()
        _checks.linear(input, params[0], params[1], layer="MLP.loss")
        _checks.class_indices("MLP.loss", input, target, self.sizes[-1])
        wants_grad = torch.is_grad_enabled() and (
            input.requires_grad or any(p is not None and p.requires_grad for p in params)
        )
        return MLPCrossEntropyFunction.apply(input, target, self._spec(label_smoothing), wants_grad, *params)[0]

    def per_layer(self) -> torch.nn.Sequential:
        """The same modules (shared parameters) as a plain ``nn.Sequential``: one Function per layer."""
        return torch.nn.Sequential(*self._modules.values())
