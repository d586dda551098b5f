"""The model: an MLP of manualgrad modules, and the ways to run it.

``Net`` pairs a module with its training loss, so that the training loop does
not care which implementation it drives:

* ``fused``: :class:`manualgrad.nn.MLP` with :meth:`~manualgrad.nn.MLP.loss`:
  the whole MLP and its softmax cross-entropy are ONE autograd Function;
* ``layers``: the same modules as a plain ``nn.Sequential``
  (:meth:`~manualgrad.nn.MLP.per_layer`), one manualgrad Function per layer,
  with :class:`manualgrad.nn.CrossEntropyLoss`;
* ``native`` (for ``--compare-native`` and ``--check-grads`` only): the same
  architecture and weights as plain ``torch.nn`` modules and
  ``torch.nn.functional.cross_entropy``, i.e. torch autograd's backward.

All three have the same ``state_dict`` keys, so one checkpoint fits all.

:func:`build` makes the run's ``Net`` from its configuration; it is the one
place that knows which model a run trains (another model, e.g. a CNN, is
another branch there and another ``Net``: the loop needs only ``loss``,
``logits``, ``parameters``, ``module``, ``twin``, ``with_impl`` and
``describe``).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

import manualgrad.nn as mnn

IN_FEATURES, CLASSES = 28 * 28, 10


def build_mlp(hidden, activation: str, dropout: float, device) -> mnn.MLP:
    """``784 -> hidden... -> 10``, PyTorch's default initialisation (seed the global RNG first)."""
    return mnn.MLP([IN_FEATURES, *hidden, CLASSES], activation=activation, dropout=dropout, device=device)


def torch_twin(mlp: mnn.MLP) -> torch.nn.Sequential:
    """The same layers as plain torch.nn modules (``torch.nn.Linear``, ``torch.nn.ReLU``...), with a copy
    of the weights. Every manualgrad module subclasses its torch.nn namesake and adds no state, so the
    twin is a copy with each module's class set back to that namesake."""
    twin = copy.deepcopy(mlp.per_layer())
    for module in twin:
        torch_class = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
        module.__class__ = torch_class
    return twin


def build(cfg, device) -> Net:
    """The Net that ``cfg`` (a :class:`~train.config.Config`) trains, its weights drawn from the global
    RNG (seed it first)."""
    mlp = build_mlp(cfg.hidden, cfg.activation, cfg.dropout, device)
    sizes = "-".join(str(s) for s in mlp.sizes)
    return Net(mlp, cfg.impl, cfg.label_smoothing, f"MLP {sizes}, {cfg.activation}, dropout {cfg.dropout}")


class Net:
    """A module (parameters, ``train()``/``eval()``, ``state_dict``) and how to compute its loss and logits."""

    impls = ("fused", "layers")  # the ways of computing our gradients that --check-grads checks

    def __init__(self, module: torch.nn.Module, impl: str, label_smoothing: float = 0.0, architecture: str = ""):
        self.module, self.impl, self.label_smoothing = module, impl, label_smoothing
        self.architecture = architecture  # for the log: e.g. "MLP 784-512-256-10, relu, dropout 0.1"
        if impl == "fused":
            assert isinstance(module, mnn.MLP)
        elif impl == "layers":
            self._sequential = module.per_layer() if isinstance(module, mnn.MLP) else module
            self._criterion = mnn.CrossEntropyLoss(label_smoothing=label_smoothing)
        elif impl != "native":
            raise ValueError(f"unknown impl {impl!r}")

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean (label-smoothed) softmax cross-entropy over the rows of ``x``."""
        if self.impl == "fused":
            return self.module.loss(x, y, label_smoothing=self.label_smoothing)
        if self.impl == "layers":
            return self._criterion(self._sequential(x), y)
        return F.cross_entropy(self.module(x), y, label_smoothing=self.label_smoothing)

    def logits(self, x: Tensor) -> Tensor:
        return (self._sequential if self.impl == "layers" else self.module)(x)

    def parameters(self):
        return self.module.parameters()

    def with_impl(self, impl: str) -> Net:
        """The same module (same weights), its loss computed the ``impl`` way."""
        return Net(self.module, impl, self.label_smoothing, self.architecture)

    def twin(self) -> Net:
        """A torch.nn copy (same weights, torch autograd's backward): --compare-native, --check-grads."""
        return Net(torch_twin(self.module), "native", self.label_smoothing, self.architecture)

    def describe(self) -> str:
        count = sum(p.numel() for p in self.parameters())
        return f"{self.architecture}, impl {self.impl}, {count:,} parameters"
