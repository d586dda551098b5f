"""The model: an MLP or a CNN of manualgrad modules, and the ways to run it.

Three models (``--model``): the MLP ``784 -> hidden... -> 10``; the classic
MNIST CNN of pytorch/examples (:func:`build_cnn`: two 3x3 convolutions, a 2x2
max-pool, dropout, then fully connected layers); and the small CNN that DP-SGD
trains (:func:`build_small_cnn`, Papernot et al. 2021's), both fed images
``(N, 1, 28, 28)``.

``Net`` pairs a module with its training loss, so that the training loop does
not care which implementation it drives:

* ``fused``: :class:`manualgrad.nn.MLP` with :meth:`~manualgrad.nn.MLP.loss`:
  the whole MLP and its softmax cross-entropy are ONE autograd Function;
* ``layers``: the same modules as a plain ``nn.Sequential``
  (:meth:`~manualgrad.nn.MLP.per_layer`), one manualgrad Function per layer,
  with :class:`manualgrad.nn.CrossEntropyLoss`; the CNN's only way;
* ``native`` (for ``--compare-native`` and ``--check-grads`` only): the same
  architecture and weights as plain ``torch.nn`` modules and
  ``torch.nn.functional.cross_entropy``, i.e. torch autograd's backward.

All three have the same ``state_dict`` keys, so one checkpoint fits all.

:func:`build` makes the run's ``Net`` from its configuration; it is the one
place that knows which model a run trains (the loop needs only ``loss``,
``logits``, ``parameters``, ``module``, ``twin``, ``with_impl`` and
``describe``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

import manualgrad.nn as mnn

from . import scatter

IN_FEATURES, CLASSES, SIDE = 28 * 28, 10, 28


def build_mlp(hidden, activation: str, dropout: float, device) -> mnn.MLP:
    """``784 -> hidden... -> 10``, PyTorch's default initialisation (seed the global RNG first)."""
    return mnn.MLP([IN_FEATURES, *hidden, CLASSES], activation=activation, dropout=dropout, device=device)


def build_cnn(hidden, activation: str, dropout: float, device, channels=(32, 64)) -> torch.nn.Sequential:
    """The classic MNIST CNN, of manualgrad modules only: ``Conv2d(1, 32, 3)``, activation, ``Conv2d(32, 64,
    3)``, activation, ``MaxPool2d(2)``, ``Dropout(dropout / 2)``, ``Flatten``, then for each width in
    ``hidden`` a ``Linear``, the activation and ``Dropout(dropout)``, and ``Linear(.., 10)``: with ``hidden``
    ``(128,)``, dropout 0.5 and relu, pytorch/examples' model (dropouts 0.25 and 0.5). Images ``(N, 1, 28,
    28)`` in, logits ``(N, 10)`` out. PyTorch's default initialisation (seed the global RNG first)."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), side = channels, (SIDE - 4) // 2  # two unpadded 3x3 convolutions, then a 2x2 pool
    layers = [
        mnn.Conv2d(1, c1, 3, device=device),
        act(),
        mnn.Conv2d(c1, c2, 3, device=device),
        act(),
        mnn.MaxPool2d(2),
        *([mnn.Dropout(dropout / 2)] if dropout > 0 else []),
        mnn.Flatten(),
    ]
    width = c2 * side * side  # 9216
    for h in hidden:
        layers += [mnn.Linear(width, h, device=device), act(), *([mnn.Dropout(dropout)] if dropout > 0 else [])]
        width = h
    layers.append(mnn.Linear(width, CLASSES, device=device))
    return torch.nn.Sequential(*layers)


def build_small_cnn(hidden, activation: str, dropout: float, device, channels=(16, 32)) -> torch.nn.Sequential:
    """The small CNN of DP-SGD on MNIST (Papernot et al. 2021's tanh CNN; Opacus's ``SampleConvNet`` with
    ``--activation relu``): ``Conv2d(1, 16, 8, stride 2, padding 3)``, activation, ``MaxPool2d(2, stride 1)``,
    ``Conv2d(16, 32, 4, stride 2)``, activation, ``MaxPool2d(2, stride 1)``, ``Flatten`` (512), then for each
    width in ``hidden`` a ``Linear``, the activation (and ``Dropout(dropout)``), and ``Linear(.., 10)``. With
    ``hidden`` ``(32,)``: 26,010 parameters, few for the noise to spread over. ``channels``: the two
    convolutions' outputs (16 and 32 above)."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), width = channels, channels[1] * 4 * 4  # 28 -> 14 -> 13 -> 5 -> 4
    layers = [
        *(mnn.Conv2d(1, c1, 8, stride=2, padding=3, device=device), act(), mnn.MaxPool2d(2, 1)),
        *(mnn.Conv2d(c1, c2, 4, stride=2, device=device), act(), mnn.MaxPool2d(2, 1)),
        mnn.Flatten(),
    ]
    for h in hidden:
        layers += [mnn.Linear(width, h, device=device), act(), *([mnn.Dropout(dropout)] if dropout > 0 else [])]
        width = h
    layers.append(mnn.Linear(width, CLASSES, device=device))
    return torch.nn.Sequential(*layers)


def build_scatter_cnn(hidden, activation: str, dropout: float, device, channels=(16, 32)) -> torch.nn.Sequential:
    """Tramer & Boneh 2021's CNN on ScatterNet features (:mod:`train.scatter`): ``GroupNorm(27, 81)`` without
    parameters (each image's features normalised by themselves), ``Conv2d(81, 16, 3, stride 2, padding 1)``,
    activation, ``Conv2d(16, 32, 3, padding 1)``, activation, ``Flatten`` (512), then the fully connected layers.
    Features ``(N, 81, 7, 7)`` in, logits out; seed the global RNG first."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), width = channels, channels[1] * 4 * 4  # 7 -> 4 -> 4
    layers = [mnn.GroupNorm(27, scatter.CHANNELS, affine=False, device=device)]
    layers += [mnn.Conv2d(scatter.CHANNELS, c1, 3, stride=2, padding=1, device=device), act()]
    layers += [mnn.Conv2d(c1, c2, 3, padding=1, device=device), act(), mnn.Flatten()]
    for h in hidden:
        layers += [mnn.Linear(width, h, device=device), act(), *([mnn.Dropout(dropout)] if dropout > 0 else [])]
        width = h
    layers.append(mnn.Linear(width, CLASSES, device=device))
    return torch.nn.Sequential(*layers)


def torch_twin(model: torch.nn.Module) -> torch.nn.Sequential:
    """The same layers as plain torch.nn modules (``torch.nn.Linear``, ``torch.nn.Conv2d``...), with a copy
    of the weights. Every manualgrad module subclasses its torch.nn namesake and adds no state, so the
    twin is a copy with each module's class set back to that namesake."""
    twin = copy.deepcopy(model.per_layer() if isinstance(model, mnn.MLP) else model)
    for module in twin.modules():
        torch_class = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        module.__class__ = torch_class
    return twin


def build(cfg, device) -> Net:
    """The Net that ``cfg`` (a :class:`~train.config.Config`) trains, its weights drawn from the global
    RNG (seed it first)."""
    widths = "-".join(str(h) for h in (*cfg.hidden, CLASSES))
    if cfg.model == "cnn":
        cnn = build_cnn(cfg.hidden, cfg.activation, cfg.dropout, device, cfg.channels)
        c1, c2 = cfg.channels
        architecture = (
            f"CNN conv{c1}-conv{c2}-pool-{widths}, {cfg.activation}, dropout {cfg.dropout / 2:g}/{cfg.dropout:g}"
        )
        return Net(cnn, "layers", cfg.label_smoothing, architecture, image_shape=(1, SIDE, SIDE))
    if cfg.model == "scatter-cnn":
        cnn = build_scatter_cnn(cfg.hidden, cfg.activation, cfg.dropout, device, cfg.channels)
        c1, c2 = cfg.channels
        architecture = f"ScatterNet + CNN groupnorm-conv{c1}-conv{c2}-{widths}, {cfg.activation}"
        return Net(cnn, "layers", cfg.label_smoothing, architecture, image_shape=scatter.SHAPE)
    if cfg.model == "small-cnn":
        cnn = build_small_cnn(cfg.hidden, cfg.activation, cfg.dropout, device, cfg.channels)
        c1, c2 = cfg.channels
        architecture = f"small CNN conv{c1}-pool-conv{c2}-pool-{widths}, {cfg.activation}, dropout {cfg.dropout:g}"
        return Net(cnn, "layers", cfg.label_smoothing, architecture, image_shape=(1, SIDE, SIDE))
    mlp = build_mlp(cfg.hidden, cfg.activation, cfg.dropout, device)
    sizes = "-".join(str(s) for s in mlp.sizes)
    return Net(mlp, cfg.impl, cfg.label_smoothing, f"MLP {sizes}, {cfg.activation}, dropout {cfg.dropout}")


class Net:
    """A module (parameters, ``train()``/``eval()``, ``state_dict``) and how to compute its loss and logits."""

    def __init__(
        self,
        module: torch.nn.Module,
        impl: str,
        label_smoothing: float = 0.0,
        architecture: str = "",
        image_shape: tuple | None = None,
    ):
        self.module, self.impl, self.label_smoothing = module, impl, label_smoothing
        self.architecture = architecture  # for the log: e.g. "MLP 784-512-256-10, relu, dropout 0.1"
        self.image_shape = image_shape  # None: the model takes rows (N, 784); else images (N, *image_shape)
        # the ways of computing our gradients that --check-grads checks
        self.impls = ("fused", "layers") if isinstance(module, mnn.MLP) else ("layers",)
        if impl == "fused":
            assert isinstance(module, mnn.MLP)
        elif impl == "layers":
            self._sequential = module.per_layer() if isinstance(module, mnn.MLP) else module
            self._criterion = mnn.CrossEntropyLoss(label_smoothing=label_smoothing)
        elif impl != "native":
            raise ValueError(f"unknown impl {impl!r}")

    def inputs(self, x: Tensor) -> Tensor:
        """The model's input from rows of normalised pixels ``(N, 784)``: those rows, or images ``(N, 1, 28, 28)``."""
        return x if self.image_shape is None else x.reshape(len(x), *self.image_shape)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean (label-smoothed) softmax cross-entropy over the rows of ``x``."""
        x = self.inputs(x)
        if self.impl == "fused":
            return self.module.loss(x, y, label_smoothing=self.label_smoothing)
        if self.impl == "layers":
            return self._criterion(self._sequential(x), y)
        return F.cross_entropy(self.module(x), y, label_smoothing=self.label_smoothing)

    def logits(self, x: Tensor) -> Tensor:
        return (self._sequential if self.impl == "layers" else self.module)(self.inputs(x))

    def parameters(self):
        return self.module.parameters()

    def with_impl(self, impl: str) -> Net:
        """The same module (same weights), its loss computed the ``impl`` way."""
        return Net(self.module, impl, self.label_smoothing, self.architecture, self.image_shape)

    def twin(self) -> Net:
        """A torch.nn copy (same weights, torch autograd's backward): --compare-native, --check-grads."""
        return Net(torch_twin(self.module), "native", self.label_smoothing, self.architecture, self.image_shape)

    def describe(self) -> str:
        count = sum(p.numel() for p in self.parameters())
        return f"{self.architecture}, impl {self.impl}, {count:,} parameters"
