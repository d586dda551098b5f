r"""Drop-in twins of ``torch.nn`` modules whose backward passes are manualgrad's.

Each class here subclasses its ``torch.nn`` namesake and replaces only
``forward``: constructor signature, parameters, initialisation, ``repr``,
``state_dict`` keys and ``isinstance`` checks are torch's own, so a checkpoint
saved from one loads into the other and ``import manualgrad.nn as nn`` is the
whole port.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import functional as F

__all__ = ["Linear", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "GELU", "SiLU", "ELU", "Softplus"]


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
