"""A whole DP-SGD step (forward, clipping, noise, optimizer step) against a plain step and Opacus, interleaved.

Three models (issue 16): Opacus's SampleConvNet at batch 240, the MLP 784-512-256-10 at batch 256, and a small
text model (Embedding, LayerNorm, Linear) at 64 sequences of 128 tokens. Each variant takes the same fixed batch
(the Poisson sampler is outside the timing: it is one uniform draw per example), σ = 1, C = 1, SGD:

* ``plain (torch.nn)``: torch's own step, no privacy: the reference of every ratio;
* ``manualgrad DP``: :mod:`manualgrad.privacy` (clipping inside the one backward pass);
* ``Opacus hooks`` and ``Opacus ghost``: Opacus's ``make_private`` with ``grad_sample_mode="hooks"`` (per-sample
  gradients) and ``"ghost"`` (ghost clipping: two backward passes), when Opacus is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from manualgrad import privacy

from .timing import interleaved


class SampleConvNet(nn.Module):
    """Opacus's examples/mnist.py model."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TextModel(nn.Module):
    """Embedding, LayerNorm, mean over the tokens, Linear."""

    def __init__(self, vocabulary=10000, width=128, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocabulary, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.out(self.norm(self.embed(tokens)).mean(1))


def _cases(quick: bool):
    if quick:
        return [
            ("SampleConvNet", SampleConvNet, lambda: torch.randn(4, 1, 28, 28), 4),
            (
                "MLP 8-6-10",
                lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 10)),
                lambda: torch.randn(4, 8),
                4,
            ),
            ("text 4x5 tokens", lambda: TextModel(50, 8), lambda: torch.randint(0, 50, (4, 5)), 4),
        ]
    mlp = lambda: nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))  # noqa: E731
    return [
        ("SampleConvNet", SampleConvNet, lambda: torch.randn(240, 1, 28, 28), 240),
        ("MLP 784-512-256-10", mlp, lambda: torch.randn(256, 784), 256),
        ("text 64x128 tokens", TextModel, lambda: torch.randint(0, 10000, (64, 128)), 64),
    ]


def _loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _step(model, optimizer, x, y, criterion=F.cross_entropy):
    def run():
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y).backward()
        optimizer.step()

    return run


def _variants(build, x, y, batch) -> dict:
    torch.manual_seed(0)
    reference = build()
    data = (torch.cat([x] * 4), torch.cat([y] * 4))  # a dataset of 4 batches: sampling rate 1/4
    plain = copy.deepcopy(reference)
    fns = {"plain (torch.nn)": _step(plain, torch.optim.SGD(plain.parameters(), lr=0.01), x, y)}
    ours = copy.deepcopy(reference)
    engine = privacy.PrivacyEngine()
    ours, optimizer, _ = engine.make_private(
        module=ours,
        optimizer=torch.optim.SGD(ours.parameters(), lr=0.01),
        data_loader=_loader(*data, batch),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    fns["manualgrad DP"] = _step(ours, optimizer, x, y)
    if importlib.util.find_spec("opacus") is not None:
        from opacus import PrivacyEngine

        for mode in ("hooks", "ghost"):
            model = copy.deepcopy(reference)
            made = PrivacyEngine().make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
                data_loader=_loader(*data, batch),
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                criterion=nn.CrossEntropyLoss(),
                grad_sample_mode=mode,
            )
            if mode == "ghost":
                model, opt, criterion, _ = made
                fns["Opacus ghost"] = _step(model, opt, x, y, criterion)
            else:
                model, opt, _ = made
                fns["Opacus hooks"] = _step(model, opt, x, y)
    return fns


def dp_steps(device: str, quick: bool = False, rounds: int = 7) -> list[dict]:
    """One row per model and variant: µs per step and the ratio to the plain torch.nn step (CPU only)."""
    rows = []
    for name, build, make_x, batch in _cases(quick):
        torch.manual_seed(0)
        x, y = make_x(), torch.randint(0, 10, (batch,))
        with warnings.catch_warnings():  # Opacus's notices (secure mode, hooks on inputs without grad)
            warnings.simplefilter("ignore")
            fns = _variants(build, x, y, batch)
            t = interleaved(fns, device=device, rounds=2 if quick else rounds, warmup=1 if quick else 2)
        for variant, seconds in t.items():
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "variant": variant,
                    "us": seconds * 1e6,
                    "ratio": seconds / t["plain (torch.nn)"],
                    "ours_speedup": t[variant] / t["manualgrad DP"],
                }
            )
    return rows
