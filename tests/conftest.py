"""Every test starts from the same seed, on one CPU thread. The shared tables are in ``support.py``.

One thread: the tests' tensors are tiny, and on a shared machine two OpenMP threads can stall each other
(a float64 convolution test ran 2.5x slower on 2 threads than on 1).
"""

from __future__ import annotations

import pytest
import torch
from support import manual_seed

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    manual_seed(0)


@pytest.fixture
def tiny(tmp_path):
    """Tiny MNIST IDX files for the training program's tests (``train_helpers.make_mnist``)."""
    from train_helpers import make_mnist

    return make_mnist(tmp_path / "mnist")
