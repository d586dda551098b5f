"""A real client: the classic PyTorch MNIST network, switched to manualgrad by its import lines alone.

``CLIENT`` is pytorch/examples' ``mnist/main.py`` model and training step, with torch's imports. The test
runs it twice, as written and with ``torch.nn``/``torch.nn.functional`` swapped for ``manualgrad.nn``/
``manualgrad.functional`` in the import lines (nothing else changes), from the same weights and seeds:
every backward node of the swapped model is hand-written, no derivative kernel runs, and the two train
to the same parameters.

One line differs from the example: ``torch.flatten(x, 1)`` is ``self.flatten = nn.Flatten()``. An import
swap cannot reach a ``torch.`` function; :func:`test_the_verbatim_example_leaves_exactly_torch_flatten`
shows what that line costs.
"""

from __future__ import annotations

import pytest
import torch
from support import RecordOps

import manualgrad

CLIENT = """
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.conv1(x)
        x = F.relu(x)
        x = self.conv2(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = self.flatten(x)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.dropout2(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train_step(model, optimizer, data, target):
    model.train()
    optimizer.zero_grad()
    output = model(data)
    loss = F.nll_loss(output, target)
    loss.backward()
    optimizer.step()
    return loss
"""

SWAP = {
    "import torch.nn as nn\n": "import manualgrad.nn as nn\n",
    "import torch.nn.functional as F\n": "import manualgrad.functional as F\n",
}


def load(source: str, swap: bool) -> dict:
    """Run the client's source (with the import lines swapped, or not) and return its namespace."""
    if swap:
        for theirs, ours in SWAP.items():
            assert theirs in source
            source = source.replace(theirs, ours)
    namespace: dict = {}
    exec(compile(source, "<mnist client>", "exec"), namespace)
    return namespace


def _pair():
    torch_client, our_client = load(CLIENT, swap=False), load(CLIENT, swap=True)
    torch.manual_seed(0)
    theirs = torch_client["Net"]().double()
    ours = our_client["Net"]().double()
    ours.load_state_dict(theirs.state_dict())
    return torch_client, our_client, theirs, ours


def _batch(step: int, n: int = 4):
    generator = torch.Generator().manual_seed(100 + step)
    data = torch.randn(n, 1, 28, 28, dtype=torch.float64, generator=generator)
    return data, torch.randint(0, 10, (n,), generator=generator)


def test_the_swap_reaches_every_layer():
    _, our_client, theirs, ours = _pair()
    assert our_client["nn"] is manualgrad.nn and our_client["F"] is manualgrad.functional
    for (name, a), (_, b) in zip(theirs.named_children(), ours.named_children()):
        assert type(b).__module__ == "manualgrad.nn" and isinstance(b, type(a)), name
    data, target = _batch(0)
    loss = our_client["F"].nll_loss(ours(data), target)
    coverage = manualgrad.manual_coverage(loss)
    assert coverage.complete, coverage
    assert coverage.manual["Conv2dFunctionBackward"] == 2 and coverage.manual["MaxPool2dFunctionBackward"] == 1
    assert coverage.manual["ReshapeFunctionBackward"] == 1 and coverage.leaves == 8


def test_training_steps_match_torch_and_run_no_derivative_kernel():
    """A few Adadelta steps (the example's optimizer): the same loss, gradients and parameters as the torch
    twin in float64 (same weights, same dropout masks from the same seed); no derivative kernel in any backward."""
    torch_client, our_client, theirs, ours = _pair()
    pairs = ((torch_client, theirs), (our_client, ours))
    optimizers = [client["optim"].Adadelta(model.parameters(), lr=1.0) for client, model in pairs]
    for step in range(3):
        data, target = _batch(step)
        torch.manual_seed(step)
        ref = torch_client["train_step"](theirs, optimizers[0], data, target)
        torch.manual_seed(step)
        with RecordOps() as kernels:
            loss = our_client["train_step"](ours, optimizers[1], data, target)
        assert kernels.ops and kernels.derivative_kernels == []
        torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_eval_mode_outputs_match():
    _, _, theirs, ours = _pair()
    data, _ = _batch(0, n=3)
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(data), theirs(data), rtol=0, atol=1e-12)


def test_the_verbatim_example_leaves_exactly_torch_flatten():
    """The example as published calls ``torch.flatten(x, 1)``: after the swap, that one view is torch's
    backward node (``ViewBackward0``), and ``manualgrad.convert`` names the call."""
    verbatim = CLIENT.replace("        self.flatten = nn.Flatten()\n", "").replace(
        "x = self.flatten(x)", "x = torch.flatten(x, 1)"
    )
    assert "torch.flatten(x, 1)" in verbatim and "nn.Flatten" not in verbatim
    client = load(verbatim, swap=True)
    torch.manual_seed(0)
    model = client["Net"]().double()
    data, target = _batch(0)
    coverage = manualgrad.manual_coverage(client["F"].nll_loss(model(data), target))
    assert not coverage.complete and dict(coverage.foreign) == {"ViewBackward0": 1}
    with pytest.warns(manualgrad.ConversionWarning, match=r"Net.forward calls torch.flatten"):
        manualgrad.convert(model)
