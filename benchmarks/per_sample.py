"""Per-sample gradient norms, DP-SGD clipping and per-sample gradients: manualgrad's per_sample against torch.func,
BackPACK and Opacus (when installed: ``pip install -e ".[compare]"``), one training step each, same model and batch.

Every variant is a whole step (gradients set to None, forward, loss, backward, and the per-sample quantity);
ratios are to the plain manualgrad step of the same kind (fused ``MLP.loss``, or one Function per layer).
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import torch

import manualgrad
import manualgrad.functional as MF
import manualgrad.nn as mnn

from .timing import interleaved

CASES = [((784, 512, 256, 10), 128), ((784, 1024, 1024, 10), 256)]


def _torch_twin(model: torch.nn.Sequential) -> torch.nn.Sequential:
    twin = copy.deepcopy(model)
    for module in twin:
        module.__class__ = next(c for c in type(module).__mro__ if c.__module__.startswith("torch.nn"))
    return twin


def _variants(sizes, batch, device):
    torch.manual_seed(0)
    fused = mnn.MLP(sizes).to(device)
    layers = fused.per_layer()
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (batch,), device=device)

    def step(model, loss, **per_sample):
        def run():
            model.zero_grad(set_to_none=True)
            if per_sample:
                with manualgrad.per_sample(model, **per_sample):
                    loss().backward()
            else:
                loss().backward()

        return run

    def fused_loss():
        return fused.loss(x, y)

    def layers_loss():
        return MF.cross_entropy(layers(x), y)

    variants = {
        "fused: plain": step(fused, fused_loss),
        "fused: norms": step(fused, fused_loss, norms=True),
        "fused: clip": step(fused, fused_loss, clip=1.0),
        "per-layer: plain": step(layers, layers_loss),
        "per-layer: norms": step(layers, layers_loss, norms=True),
        "per-layer: clip": step(layers, layers_loss, clip=1.0),
    }
    # grads=True leaves (N, *p.shape) tensors on its parameters: on a copy, so that freeing them is not timed in the
    # other variants
    copy_of_layers = copy.deepcopy(layers)
    variants["per-layer: grads"] = step(
        copy_of_layers, lambda: MF.cross_entropy(copy_of_layers(x), y), norms=False, grads=True
    )
    twin = _torch_twin(layers)
    variants["torch.nn: plain"] = step(twin, lambda: torch.nn.functional.cross_entropy(twin(x), y))
    variants["torch.func vmap(grad): grads"] = _torch_func(twin, x, y)
    if importlib.util.find_spec("backpack") is not None:
        variants.update(_backpack(twin, x, y))
    if importlib.util.find_spec("opacus") is not None:
        variants["Opacus GradSampleModule: grads"] = _opacus(twin, x, y)
    return variants


def _torch_func(twin, x, y):
    from torch.func import functional_call, grad, vmap

    def loss(params, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(twin, params, (xi[None],)), yi[None])

    per_sample_grads = vmap(grad(loss), in_dims=(None, 0, 0))

    def run():
        params = {k: v.detach() for k, v in twin.named_parameters()}
        return per_sample_grads(params, x, y)

    return run


def _backpack(twin, x, y):
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad, BatchL2Grad

    model = extend(copy.deepcopy(twin))
    loss_fn = extend(torch.nn.CrossEntropyLoss())

    def with_extension(extension):
        def run():
            model.zero_grad(set_to_none=True)
            with backpack(extension()):
                loss_fn(model(x), y).backward()

        return run

    return {
        "BackPACK BatchL2Grad: norms": with_extension(BatchL2Grad),
        "BackPACK BatchGrad: grads": with_extension(BatchGrad),
    }


def _opacus(twin, x, y):
    from opacus import GradSampleModule

    model = GradSampleModule(copy.deepcopy(twin))

    def run():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return run


def per_sample_steps(device: str, quick: bool = False, rounds: int = 15) -> list[dict]:
    """One row per variant and MLP: µs per step and the ratio to the plain manualgrad step of its kind."""
    cases = [((6, 5, 3), 4)] if quick else CASES
    rows = []
    for sizes, batch in cases:
        with warnings.catch_warnings():  # BackPACK's and Opacus's module hooks warn that the input needs no grad
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            t = interleaved(_variants(sizes, batch, device), device=device, rounds=2 if quick else rounds, warmup=2)
        for name, seconds in t.items():
            kind = "fused: plain" if name.startswith("fused") else "per-layer: plain"
            rows.append(
                {
                    "sizes": "-".join(map(str, sizes)),
                    "batch": batch,
                    "variant": name,
                    "us": seconds * 1e6,
                    "ratio": seconds / t[kind],
                    "versus": kind,
                }
            )
    return rows
