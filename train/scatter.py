"""ScatterNet features (``--model scatter-cnn``): kymatio's scattering transform (Oyallon & Mallat 2015) at J = 2,
8 orientations, makes every 28x28 image 81 channels of 7x7. It has no parameters, so it costs no privacy (Tramer &
Boneh 2021 train DP-SGD on it); computed once per run, on the run's device."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from .data import MNIST, SIDE
from .errors import ConfigError

CHANNELS, FEATURE_SIDE = 81, SIDE // 4  # J = 2: 1 + 8J + 64 J(J-1)/2 channels, each side halved J times
SHAPE = (CHANNELS, FEATURE_SIDE, FEATURE_SIDE)


def scattering(device) -> torch.nn.Module:
    try:  # the 2-D frontend alone: kymatio.torch also imports its 3-D one, which fails with scipy >= 1.17
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as e:
        raise ConfigError(f"--model scatter-cnn needs kymatio ({e}): pip install -e '.[train]'") from None
    return ScatteringTorch2D(J=2, shape=(SIDE, SIDE)).to(device)


def features(rows: Tensor, transform: torch.nn.Module, chunk: int = 1000) -> Tensor:
    """Normalised pixel rows ``(N, 784)`` -> their scattering features, flattened: ``(N, 81 * 7 * 7)``."""
    flat = CHANNELS * FEATURE_SIDE**2
    parts = [transform(part.reshape(-1, SIDE, SIDE)).reshape(-1, flat) for part in rows.split(chunk) if len(part)]
    return torch.cat(parts) if parts else rows.new_zeros(0, flat)


def transform(mnist: MNIST) -> MNIST:
    scatter = scattering(mnist.train_x.device)
    return dataclasses.replace(mnist, train_x=features(mnist.train_x, scatter), test_x=features(mnist.test_x, scatter))
