"""Every test starts from the same seed. The shared tables are in ``support.py``."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
