"""``--check-grads``: our gradients against torch autograd's, on one batch of the real model.

The reference is the model's torch.nn twin (same weights; ``torch.nn.Linear``,
``torch.nn.ReLU``... and ``torch.nn.functional.cross_entropy``), whose backward
is torch autograd's. Both see the same batch and, through a restored RNG
state, the same dropout masks (on the CPU; on CUDA torch's fused dropout draws
differently, so there the check runs without dropout). Nothing here changes
the run's random streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import manualgrad

from .model import Net

TOLERANCE = 1e-4  # float32: the two backward passes sum in different orders


@dataclass
class GradCheck:
    impl: str
    loss_difference: float
    worst_parameter: str
    worst_relative: float  # max |ours - torch| / max |torch|, over the worst parameter
    coverage: manualgrad.Coverage

    @property
    def ok(self) -> bool:
        return self.worst_relative <= TOLERANCE

    def __str__(self) -> str:
        verdict = "OK" if self.ok else f"MISMATCH (tolerance {TOLERANCE:g})"
        return (
            f"check-grads [{self.impl}]: largest relative difference to torch autograd "
            f"{self.worst_relative:.2e} (in {self.worst_parameter}), loss difference "
            f"{self.loss_difference:.1e}: {verdict}\n  backward graph: {self.coverage}"
        )


def _gradients(net: Net, x, y, rng_state):
    torch.set_rng_state(rng_state)
    params = list(net.module.parameters())
    loss = net.loss(x, y)
    coverage = manualgrad.manual_coverage(loss)
    return loss.detach(), torch.autograd.grad(loss, params), coverage


def check_grads(net: Net, x: torch.Tensor, y: torch.Tensor) -> GradCheck:
    """Compare ``net``'s loss and parameter gradients on ``(x, y)`` with its torch.nn twin's."""
    twin = net.twin()
    use_dropout = x.device.type == "cpu"
    devices = [x.device] if x.device.type == "cuda" else []
    was_training = net.module.training
    with torch.random.fork_rng(devices=devices):
        net.module.train(use_dropout)
        twin.module.train(use_dropout)
        state = torch.get_rng_state()
        ours, our_grads, coverage = _gradients(net, x, y, state)
        ref, ref_grads, _ = _gradients(twin, x, y, state)
    net.module.train(was_training)
    worst_name, worst = "", -1.0
    for (name, _), g, r in zip(net.module.named_parameters(), our_grads, ref_grads):
        relative = ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        if relative > worst:
            worst_name, worst = name, relative
    return GradCheck(net.impl, abs(ours.item() - ref.item()), worst_name, worst, coverage)


def check_all(net: Net, x: torch.Tensor, y: torch.Tensor) -> list[GradCheck]:
    """:func:`check_grads` for the run's way of computing gradients first, then every other one."""
    return [check_grads(net.with_impl(impl), x, y) for impl in dict.fromkeys((net.impl, *net.impls))]
