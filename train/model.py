"""The models (``--model``), all of manualgrad modules, and :class:`Net`: a model with its loss, computed ``fused``
(the MLP and its loss ONE Function, :meth:`manualgrad.nn.MLP.loss`), ``layers`` (one Function per layer; the CNNs'
only way) or ``native`` (the same layers and weights as plain ``torch.nn`` modules), all with the same state_dict."""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor

import manualgrad
import manualgrad.nn as mnn

from . import scatter

IN_FEATURES, CLASSES, SIDE = 28 * 28, 10, 28


def _head(layers: list, width: int, hidden, act, dropout: float, device) -> torch.nn.Sequential:
    """``layers``, then per width in ``hidden`` a ``Linear``, the activation (and dropout); ``Linear(.., 10)``."""
    for h in hidden:
        layers += [mnn.Linear(width, h, device=device), act(), *([mnn.Dropout(dropout)] if dropout > 0 else [])]
        width = h
    return torch.nn.Sequential(*layers, mnn.Linear(width, CLASSES, device=device))


def build_cnn(hidden, activation: str, dropout: float, device, channels=(32, 64)) -> torch.nn.Sequential:
    """pytorch/examples' MNIST CNN: two 3x3 convolutions, ``MaxPool2d(2)``, ``Dropout(dropout / 2)``, the head."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), side = channels, (SIDE - 4) // 2  # two unpadded 3x3 convolutions, then a 2x2 pool
    layers = [mnn.Conv2d(1, c1, 3, device=device), act(), mnn.Conv2d(c1, c2, 3, device=device), act()]
    layers += [mnn.MaxPool2d(2), *([mnn.Dropout(dropout / 2)] if dropout > 0 else []), mnn.Flatten()]
    return _head(layers, c2 * side * side, hidden, act, dropout, device)


def build_small_cnn(hidden, activation: str, dropout: float, device, channels=(16, 32)) -> torch.nn.Sequential:
    """DP-SGD's small CNN (Papernot et al. 2021, Opacus's ``SampleConvNet``); with ``hidden`` (32,): 26,010 weights."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), width = channels, channels[1] * 4 * 4  # 28 -> 14 -> 13 -> 5 -> 4
    layers = [mnn.Conv2d(1, c1, 8, stride=2, padding=3, device=device), act(), mnn.MaxPool2d(2, 1)]
    layers += [mnn.Conv2d(c1, c2, 4, stride=2, device=device), act(), mnn.MaxPool2d(2, 1), mnn.Flatten()]
    return _head(layers, width, hidden, act, dropout, device)


def build_scatter_cnn(hidden, activation: str, dropout: float, device, channels=(16, 32)) -> torch.nn.Sequential:
    """Tramer & Boneh 2021's CNN on ScatterNet features: a GroupNorm without weights, two 3x3 convolutions, the head."""
    act = mnn.ACTIVATIONS[activation]
    (c1, c2), width = channels, channels[1] * 4 * 4  # 7 -> 4 -> 4
    layers = [mnn.GroupNorm(27, scatter.CHANNELS, affine=False, device=device)]
    layers += [mnn.Conv2d(scatter.CHANNELS, c1, 3, stride=2, padding=1, device=device), act()]
    layers += [mnn.Conv2d(c1, c2, 3, padding=1, device=device), act(), mnn.Flatten()]
    return _head(layers, width, hidden, act, dropout, device)


def torch_twin(model: torch.nn.Module) -> torch.nn.Sequential:
    """A copy as plain torch.nn modules: each manualgrad module (a subclass adding no state) set back to its base."""
    twin = copy.deepcopy(model.per_layer() if isinstance(model, mnn.MLP) else model)
    for module in twin.modules():
        module.__class__ = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
    return twin


def build(cfg, device) -> Net:
    """The Net that ``cfg`` trains, its weights drawn from the global RNG (seed it first)."""
    if cfg.model == "mlp":
        sizes = [IN_FEATURES, *cfg.hidden, CLASSES]
        mlp = mnn.MLP(sizes, activation=cfg.activation, dropout=cfg.dropout, device=device)
        architecture = f"MLP {'-'.join(map(str, sizes))}, {cfg.activation}, dropout {cfg.dropout}"
        return Net(mlp, cfg.impl, cfg.label_smoothing, architecture)
    (c1, c2), act, p, head = cfg.channels, cfg.activation, cfg.dropout, "-".join(map(str, (*cfg.hidden, CLASSES)))
    builder, architecture = {
        "cnn": (build_cnn, f"CNN conv{c1}-conv{c2}-pool-{head}, {act}, dropout {p / 2:g}/{p:g}"),
        "small-cnn": (build_small_cnn, f"small CNN conv{c1}-pool-conv{c2}-pool-{head}, {act}, dropout {p:g}"),
        "scatter-cnn": (build_scatter_cnn, f"ScatterNet + CNN groupnorm-conv{c1}-conv{c2}-{head}, {act}"),
    }[cfg.model]
    shape = scatter.SHAPE if cfg.model == "scatter-cnn" else (1, SIDE, SIDE)  # the features' or the images'
    cnn = builder(cfg.hidden, act, p, device, cfg.channels)
    return Net(cnn, "layers", cfg.label_smoothing, architecture, image_shape=shape)


class Net:
    """``module`` (parameters, ``train()``/``eval()``, ``state_dict``) and how to compute its loss and logits."""

    def __init__(self, module, impl: str, label_smoothing: float = 0.0, architecture: str = "", image_shape=None):
        self.module, self.impl, self.label_smoothing = module, impl, label_smoothing
        self.architecture = architecture  # for the log: e.g. "MLP 784-512-256-10, relu, dropout 0.1"
        self.image_shape = image_shape  # None: the model takes rows (N, 784); else images (N, *image_shape)
        self.impls = ("fused", "layers") if isinstance(module, mnn.MLP) else ("layers",)  # what --check-grads checks
        if impl != "fused":  # "fused": the MLP's own loss; "layers": one Function per layer; "native": torch.nn's
            self._sequential = module.per_layer() if isinstance(module, mnn.MLP) else module
            criterion = mnn.CrossEntropyLoss if impl == "layers" else torch.nn.CrossEntropyLoss
            self._criterion = criterion(label_smoothing=label_smoothing)

    def inputs(self, x: Tensor) -> Tensor:
        """Rows of normalised pixels ``(N, 784)``, or images ``(N, 1, 28, 28)`` for a CNN."""
        return x if self.image_shape is None else x.reshape(len(x), *self.image_shape)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """Mean (label-smoothed) softmax cross-entropy over the rows of ``x``."""
        x = self.inputs(x)
        if self.impl == "fused":
            return self.module.loss(x, y, label_smoothing=self.label_smoothing)
        return self._criterion(self._sequential(x), y)

    def logits(self, x: Tensor) -> Tensor:
        return (self.module if self.impl == "fused" else self._sequential)(self.inputs(x))

    def with_impl(self, impl: str) -> Net:
        return Net(self.module, impl, self.label_smoothing, self.architecture, self.image_shape)

    def twin(self) -> Net:
        return Net(torch_twin(self.module), "native", self.label_smoothing, self.architecture, self.image_shape)

    def describe(self) -> str:
        count = sum(p.numel() for p in self.module.parameters())
        return f"{self.architecture}, impl {self.impl}, {count:,} parameters"


def compare_gradients(net: Net, x: Tensor, y: Tensor) -> tuple[float, str, float, manualgrad.Coverage]:
    """--check-grads: the largest relative difference (max |ours - torch| / max |torch|) of ``net``'s gradients from
    its torch.nn twin's, its parameter, the loss difference, our backward graph. Both draw the same dropout masks (on
    the CPU; torch's fused CUDA dropout draws differently, so there without dropout)."""
    twin, use_dropout, was_training = net.twin(), x.device.type == "cpu", net.module.training
    results = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        state = torch.get_rng_state()
        for each in (net, twin):
            each.module.train(use_dropout)
            torch.set_rng_state(state)
            loss = each.loss(x, y)
            coverage = manualgrad.manual_coverage(loss)
            results.append((loss.detach(), torch.autograd.grad(loss, list(each.module.parameters())), coverage))
    net.module.train(was_training)
    (ours, our_grads, coverage), (ref, ref_grads, _) = results
    names = [name for name, _ in net.module.named_parameters()]
    relative = [((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(our_grads, ref_grads)]
    worst = max(range(len(names)), key=lambda i: math.inf if math.isnan(relative[i]) else relative[i])  # NaN: worst
    return relative[worst], names[worst], abs(ours.item() - ref.item()), coverage
