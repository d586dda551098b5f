"""Shared fixtures: the devices to run on, and the table of Functions under test."""

from __future__ import annotations

import pytest
import torch

import manualgrad.functional as MF

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

#: Every device the parity and gradcheck tests run on; CUDA skips with a reason when absent.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA)]

#: (name, ours, torch's, keyword arguments, kink): every elementwise activation and its parameter variants.
ACTIVATIONS = [
    ("relu", MF.relu, torch.nn.functional.relu, {}, 0.0),
    ("leaky_relu", MF.leaky_relu, torch.nn.functional.leaky_relu, {}, 0.0),
    ("leaky_relu_0.2", MF.leaky_relu, torch.nn.functional.leaky_relu, {"negative_slope": 0.2}, 0.0),
    ("leaky_relu_negative", MF.leaky_relu, torch.nn.functional.leaky_relu, {"negative_slope": -0.3}, 0.0),
    ("leaky_relu_steep", MF.leaky_relu, torch.nn.functional.leaky_relu, {"negative_slope": 1.5}, 0.0),
    ("sigmoid", MF.sigmoid, torch.sigmoid, {}, None),
    ("tanh", MF.tanh, torch.tanh, {}, None),
    ("gelu", MF.gelu, torch.nn.functional.gelu, {}, None),
    ("gelu_tanh", MF.gelu, torch.nn.functional.gelu, {"approximate": "tanh"}, None),
    ("silu", MF.silu, torch.nn.functional.silu, {}, None),
    ("elu", MF.elu, torch.nn.functional.elu, {}, 0.0),
    ("elu_2", MF.elu, torch.nn.functional.elu, {"alpha": 2.0}, 0.0),
    ("elu_negative", MF.elu, torch.nn.functional.elu, {"alpha": -0.5}, 0.0),
    ("softplus", MF.softplus, torch.nn.functional.softplus, {}, 20.0),
    ("softplus_beta", MF.softplus, torch.nn.functional.softplus, {"beta": 2.0, "threshold": 3.0}, 1.5),
]
ACTIVATION_IDS = [a[0] for a in ACTIVATIONS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
